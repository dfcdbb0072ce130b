"""Triton in the worker's own process (``tdask.triton.mode: in-process``), over its C API.

:class:`InProcessServer` stands in for :class:`~tdask.triton.server.TritonServer`: the same
model repository, model loading with a config override (:mod:`tdask.triton.model_config`), the
log in ``<log-dir>/<name>.triton.log`` and a clean stop (``TRITONSERVER_ServerStop`` then
``ServerDelete``), but no ``tritonserver`` process, no port and no HTTP: a request is a
``TRITONSERVER_InferenceRequest`` handed to ``ServerInferAsync``. Its clients
(:class:`~tdask.triton.inprocess_client.InProcessClient`) answer the operator's calls through the
interfaces of :mod:`tdask.triton.interface`, with the errors the HTTP and gRPC endpoints give the
same failures, so :class:`~tdask.triton.operator.TritonCoreOperator` serves both modes alike.

Threads and the GIL, per request: the event loop's thread builds the request (about ten short
C calls, GIL kept: :attr:`TritonCApi.hot`) and submits it. Triton's threads then run the model,
call the response allocator (pooled host buffers) and the two completion callbacks; with the C
shim (:mod:`tdask.triton.shim`) none of these takes the GIL: they queue an event and, when the
queue was idle, write an eventfd once. The loop drains every queued event per wake-up, copies
the outputs out, deletes the response and, on the release event, the request. So a request
costs no GIL hand-off from a Triton thread, and a burst of completions costs one loop wake-up.

Python-backend stubs are the worker's children: a :class:`~tdask.triton.process.Reaper` ends
them and removes their shared memory if the worker dies without stopping the server.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from ctypes import byref, c_int64, c_size_t, c_void_p
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from tdask.triton import capi, shim
from tdask.triton.base import Status, TritonServerBase, TritonServerError
from tdask.triton.inprocess_setup import prepare_process, server_options
from tdask.triton.interface import InferResult, MetricsSource, TritonInferError
from tdask.triton.options import TritonOptions
from tdask.triton.process import WORKDIR_PREFIX, Reaper, remove_shm_regions, sweep_stale_leftovers
from tdask.triton.responses import ResponseReader

if TYPE_CHECKING:
    from tdask.triton.inprocess_client import InProcessClient

logger = logging.getLogger(__name__)

__all__ = ["InProcessServer"]

_FINAL = capi.RESPONSE_FINAL
#: How long a released request of a one-response model may still wait for its answer.
_UNANSWERED_GRACE_S = 0.05


class _Inflight:
    """One submitted request until Triton has both answered it (final flag) and released it."""

    __slots__ = ("request", "keep", "future", "responses", "waiter", "final", "released", "decoupled", "timer")

    def __init__(self, request: int, keep: list[Any], future: asyncio.Future[Any] | None) -> None:
        self.request = request
        self.keep: list[Any] | None = keep  # input buffers Triton reads until the release
        self.future = future  # one-response models
        self.responses: collections.deque[Any] = collections.deque()  # decoupled models
        self.waiter: asyncio.Future[None] | None = None
        self.final = False
        self.released = False
        self.decoupled = future is None
        self.timer: asyncio.TimerHandle | None = None


class InProcessServer(TritonServerBase):
    """Triton's core in this process, in explicit model-control mode; one per process.

    Parameters
    ----------
    model_repository
        The model repository, or several.
    log_dir
        Directory of ``<name>.triton.log`` (appended); ``None``: a temporary file, removed at stop.
    log_verbose
        Triton's verbose log level; default ``tdask.triton.log-verbose``.
    stop_timeout_s
        How long the stop waits for in-flight requests (Triton's exit timeout).
    name
        Names the log file and the log lines (the worker's name).
    use_shim
        Use the C shim for Triton's callbacks when it can be built; default
        ``tdask.triton.in-process-shim``.
    metrics
        Collect Triton's Prometheus metrics (:meth:`metrics_text`); default ``tdask.triton.metrics``.
    backend_directory
        Triton's backend directory; default: the nvidia-pytriton bundle's (assembled), or the
        install's.
    """

    def __init__(
        self,
        *,
        model_repository: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        log_dir: str | os.PathLike[str] | None = None,
        log_verbose: int | None = None,
        stop_timeout_s: float = 10.0,
        name: str = "triton",
        use_shim: bool | None = None,
        metrics: bool | None = None,
        backend_directory: str | os.PathLike[str] | None = None,
    ) -> None:
        from_config: dict[str, Any] = {}  # left out: TritonOptions reads tdask.triton.* config
        for key, value in (("log_verbose", log_verbose), ("use_shim", use_shim), ("metrics", metrics)):
            if value is not None:
                from_config[key] = value
        super().__init__(
            TritonOptions(
                model_repository=model_repository,
                name=name,
                log_dir=log_dir,
                stop_timeout_s=stop_timeout_s,
                backend_directory=backend_directory,
                **from_config,
            )
        )
        self.use_shim = self.options.use_shim
        self._api: capi.TritonCApi | None = None
        self._server: int | None = None
        self._allocator: int | None = None
        self.completions: shim.Completions | None = None
        self._inflight: dict[int, _Inflight] = {}
        self._next_token = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workdir: Path | None = None
        self._reaper: Reaper | None = None
        self._stopped = asyncio.Event()
        self._broken: str | None = None  # why the server cannot serve on (a load that never returns)
        self._exit_callbacks: list[Callable[[int], object]] = []
        self._decoupled: dict[str, bool] = {}
        self._reader = ResponseReader()  # all responses are read on the loop's thread

    @classmethod
    def from_options(cls, options: TritonOptions) -> Self:
        """Triton's core in this process, run with ``options`` (the subprocess-only ones are unused)."""
        return cls(
            model_repository=options.model_repository,
            log_dir=options.log_dir,
            log_verbose=options.log_verbose,
            stop_timeout_s=options.stop_timeout_s,
            name=options.name,
            use_shim=options.use_shim,
            metrics=options.metrics,
            backend_directory=options.backend_directory,
        )

    # ------------------------------------------------------------------ what the operator and plugin read

    def __repr__(self) -> str:
        """Name and state."""
        return f"<InProcessServer {self.name!r} {self.status.value} pid={os.getpid()}>"

    @property
    def pid(self) -> int:
        """Return this process id (Triton runs in it)."""
        return os.getpid()

    @property
    def returncode(self) -> int | None:
        """``None``, or 1 once the server is :attr:`broken` (it cannot exit apart from this process)."""
        return 1 if self.broken else None

    @property
    def address(self) -> str:
        """Where requests go, for log lines."""
        return f"in-process (pid {os.getpid()})"

    @property
    def broken(self) -> str | None:
        """Why the server cannot serve on in this process (a load that never returned), or ``None``."""
        return self._broken

    @property
    def metrics_source(self) -> MetricsSource | None:
        """:meth:`metrics_text` (``None`` when metrics are off)."""
        return self.metrics_text if self.metrics else None

    @property
    def native_callbacks(self) -> bool:
        """Whether Triton's callbacks run in the C shim (no GIL) rather than in Python."""
        return self.completions is not None and self.completions.native

    def is_alive(self) -> bool:
        """Whether the server is running and not :attr:`broken`."""
        return self.status is Status.running and self.broken is None

    def add_exit_callback(self, callback: Callable[[int], object]) -> None:
        """Call ``callback(1)`` if the server breaks (the only way it "exits" apart from this process).

        As with the subprocess mode, the owner restarts the worker then (a fresh process, a
        fresh Triton core).
        """
        self._exit_callbacks.append(callback)

    def remove_exit_callback(self, callback: Callable[[int], object]) -> None:
        """Forget a callback given to :meth:`add_exit_callback`."""
        if callback in self._exit_callbacks:
            self._exit_callbacks.remove(callback)

    def _break(self, reason: str) -> None:
        """Mark the server beyond repair in this process and tell the exit callbacks."""
        if self._broken is not None:
            return
        self._broken = reason
        logger.error("Triton server %r (in process) is broken: %s", self.name, reason)
        for callback in list(self._exit_callbacks):
            try:
                callback(1)
            except Exception:
                logger.exception("an exit callback of Triton server %r failed", self.name)

    def _stub_died(self, model: str, pid: int) -> None:
        """A stub died: the model's instance is gone for good in this process (Triton 2.5x)."""
        self._break(f"the python-backend stub (pid {pid}) of model {model!r} died")

    async def wait(self) -> int:
        """Wait until the server is stopped; returns 0."""
        await self._stopped.wait()
        return 0

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        began = time.monotonic()
        try:
            api = self._api = capi.TritonCApi.load()
        except (OSError, RuntimeError) as exc:
            raise TritonServerError(f"cannot load Triton's library for the in-process mode: {exc}") from exc
        sweep_stale_leftovers(Path(tempfile.gettempdir()))
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-{self._safe_name}-"))
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log_path = self.log_dir / f"{self._safe_name}.triton.log"
        else:
            self._log_path = self._workdir / "triton.log"
        with open(self._log_path, "ab") as log:
            self._log_offset = log.tell()  # log_tail reads this server's part of an appended log
            log.write(f"--- tdask: starting Triton in process {os.getpid()} ({api.path})\n".encode())
        backends = prepare_process(api, self._workdir)
        if self.options.backend_directory is not None:
            backends = Path(self.options.backend_directory)
        options = server_options(
            api, self.options, shm_prefix=self._shm_prefix, backends=backends, log_path=self._log_path
        )
        fn = api.fn
        try:
            server = c_void_p()
            err = await asyncio.to_thread(fn.ServerNew, byref(server), options)
            if err:
                error = api.error(err)
                tail = self.log_tail()
                raise TritonServerError(
                    f"Triton failed to start in process {os.getpid()}: {error.message}; log {self._log_path} "
                    f"ends with:\n{tail}",
                    log_tail=tail,
                )
            self._server = server.value
        finally:
            fn.ServerOptionsDelete(options)
        self._reaper = Reaper(os.getpid(), self._shm_prefix, kill_group=False)
        # In a thread: a shim still to be built is waited for (bounded) off the worker's event loop.
        self.completions = await asyncio.to_thread(shim.Completions, api, use_shim=self.use_shim)
        self._reader = ResponseReader(self.completions.buffers)  # outputs without a copy, with the shim
        allocator = c_void_p()
        api.check(
            fn.ResponseAllocatorNew(byref(allocator), self.completions.alloc_fn, self.completions.release_fn, None)
        )
        self._allocator = allocator.value
        self._loop = asyncio.get_running_loop()
        self.completions.start(self._loop, self._on_events)
        logger.info(
            "Triton server %r ready in process %d in %.2fs (C API %d.%d, %s callbacks, log %s)",
            self.name,
            os.getpid(),
            time.monotonic() - began,
            *api.version,
            "native" if self.completions.native else "Python",
            self._log_path,
        )

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the server (``ServerStop``, ``ServerDelete``); safe to call more than once.

        Requests still in flight after the exit timeout are answered with an UNAVAILABLE error.
        ``graceful=False`` (a server broken anyway, a hung model, a worker restarting) neither
        stops nor deletes Triton's core: ``ServerStop`` would wait its exit timeout for requests
        that will never finish, ``ServerDelete`` for the model that cannot unload. Requests in
        flight are answered with an UNAVAILABLE error at once, the stubs are ended (the reaper)
        and their shared memory removed; the core is left to this process's exit, which follows
        (the worker restarts).
        """
        async with self._lock:
            if self.status is Status.stopped:
                return
            self.status = Status.stopping
            try:
                await self._shutdown(graceful=graceful)
            finally:
                self.status = Status.stopped
                self._stopped.set()

    async def _shutdown(self, graceful: bool = True) -> None:
        api = self._api
        self._unwatch_stubs()
        if not graceful and self._server is not None:
            # Left to the process's exit (see stop): no wait here.
            logger.info("Triton server %r left to this process's exit (not stopped gracefully)", self.name)
            self._server = None
            self._allocator = None
            self._broken = self._broken or "stopped without a graceful stop"
        try:
            if api is not None and self._server is not None:
                server, self._server = self._server, None
                # Requests in flight are waited for here (their events still reach the loop),
                # then every model is unloaded and its stubs end: Triton's own stop, which looks
                # once a second (>= 1 s; 2 s with python models), then finds nothing to wait for,
                # its exit timeout set to 0 (to what is left of it, if something is left).
                # A broken server's Delete would wait for ever on the load that never returned
                # (it holds the model's lifecycle): it is left to this process's exit, which the
                # reaper below follows by ending the stubs and removing their shared memory.
                quick = False
                if not self._broken:
                    try:
                        left = await self._unload_all(api, server)
                    except (capi.TritonCError, TimeoutError) as exc:  # Triton's own stop waits then
                        logger.warning("Triton server %r: unloading its models at stop: %s", self.name, exc)
                        left = 0.0
                    quick = left is None
                    err = api.fn.ServerSetExitTimeout(server, 0 if left is None else max(1, math.ceil(left)))
                    if err:
                        quick = False
                        logger.warning("Triton server %r: setting its exit timeout: %s", self.name, api.error(err))
                calls = (api.fn.ServerStop,) if self._broken else (api.fn.ServerStop, api.fn.ServerDelete)
                for call in calls:
                    err = await capi.call_in_daemon_thread(call, server, timeout_s=self.stop_timeout_s + 30)
                    if err:
                        message = api.error(err)
                        # With nothing left, a zero exit timeout is reported as expired: expected.
                        expired = quick and call is api.fn.ServerStop and "Exit timeout expired" in str(message)
                        (logger.debug if expired else logger.warning)("Triton server %r: %s", self.name, message)
                logger.info("Triton server %r stopped (in process%s)", self.name, ", broken" if self._broken else "")
            if api is not None and self._allocator is not None and not self._broken:
                api.fn.ResponseAllocatorDelete(self._allocator)
                self._allocator = None
        finally:
            if self.completions is not None and graceful:  # else Triton's threads may still call it
                self.completions.stop()
            for entry in self._inflight.values():
                self._fail(entry, capi.TritonCError(capi.ERROR_UNAVAILABLE, "the in-process Triton server stopped"))
            self._inflight.clear()
            remove_shm_regions(self._shm_prefix)
            if self._reaper is not None:
                reaper, self._reaper = self._reaper, None
                await asyncio.to_thread(reaper.release)
            if self._workdir is not None:
                if self.log_dir is None:
                    self._log_path = None
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    # ------------------------------------------------------------------ models

    async def _unload_all(self, api: capi.TritonCApi, server: int) -> float | None:
        """Wait for the requests in flight, unload every model and wait until none is left.

        The requests get the exit timeout (:attr:`TritonOptions.exit_timeout_s`), the whole
        within :attr:`stop_timeout_s`, polled every 10 ms. Returns None once nothing is left (no
        request unanswered, no model loaded or unloading), else the seconds of the exit timeout
        still left, for Triton's own stop to wait.
        """
        began = time.monotonic()
        drained_by, deadline = began + self.options.exit_timeout_s, began + self.stop_timeout_s
        while any(not entry.final for entry in self._inflight.values()):
            if time.monotonic() >= drained_by:
                return 0.0
            await asyncio.sleep(0.01)
        live = ("READY", "LOADING", "UNLOADING")
        index = self._json(api.fn.ServerModelIndex, server, 0)
        for model in sorted({m["name"] for m in index if m.get("state") in live}):
            unload, timeout_s = api.fn.ServerUnloadModel, max(deadline - time.monotonic(), 1.0)
            err = await capi.call_in_daemon_thread(unload, server, model.encode(), timeout_s=timeout_s)
            if err:
                logger.warning("Triton server %r: unloading %r at stop: %s", self.name, model, api.error(err))
                return max(drained_by - time.monotonic(), 0.0)
        while any(m.get("state") in live for m in self._json(api.fn.ServerModelIndex, server, 0)):
            if time.monotonic() >= deadline:
                return 0.0
            await asyncio.sleep(0.01)
        return None

    def _running(self) -> tuple[capi.TritonCApi, int]:
        if self.status is not Status.running or self._api is None or self._server is None:
            raise RuntimeError(f"Triton server {self.name!r} is {self.status.value}, not running")
        if self._broken is not None:
            raise TritonServerError(f"Triton server {self.name!r} is broken: {self._broken}")
        return self._api, self._server

    async def load_model(
        self, model: str, config: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Load (or reload) ``model``, with ``config`` merged into its config.

        Raises
        ------
        TritonServerError
            Triton refused or failed the load (its message says why).
        """
        api, server = self._running()
        self.check_model(model)
        payload = json.dumps(self.model_config(model, config)).encode() if config else None
        self._unwatch_stubs(model)  # a reload ends the model's current stubs
        began = time.monotonic()
        parameters = (c_void_p * 1)()
        count = 0
        if payload is not None:
            parameters[0] = api.fn.ParameterNew(b"config", capi.PARAM_STRING, payload)
            count = 1
        try:
            err = await capi.call_in_daemon_thread(
                api.fn.ServerLoadModelWithParameters, server, model.encode(), parameters, count, timeout_s=timeout_s
            )
        except TimeoutError:
            # Triton cannot interrupt a load: its 2.51 python backend waits without a bound for a
            # stub's initialize (even a dead stub's), and ServerDelete then waits for the load.
            # Left so, the worker would hang at its stop; it restarts instead, as the subprocess
            # mode does for a server that died. (The parameter stays with the stuck thread.)
            count = 0
            reason = (
                f"loading model {model!r} took longer than {timeout_s:g}s and cannot be interrupted in process; "
                f"the worker restarts (log {self._log_path})"
            )
            self._break(reason)
            raise TritonServerError(reason, log_tail=self.log_tail()) from None
        finally:
            if count:
                api.fn.ParameterDelete(parameters[0])
        if err:
            raise TritonServerError(
                f"loading model {model!r} on Triton server {self.name!r} failed: {api.error(err)}"
                f"{self.explain_load_failure(model)}"
            )
        decoupled = (self.model_config(model, config).get("model_transaction_policy") or {}).get("decoupled")
        self._decoupled[model] = bool(decoupled)
        self._watch_stubs(model)
        self._log_loaded(model, began, bool(payload))

    async def unload_model(self, model: str, *, wait: bool = True, timeout_s: float = 30.0) -> None:
        """Unload ``model``; with ``wait``, return once the repository index no longer shows it loaded."""
        api, server = self._running()
        self._unwatch_stubs(model)
        err = await asyncio.to_thread(api.fn.ServerUnloadModel, server, model.encode())
        if err:
            raise TritonServerError(f"unloading model {model!r} failed: {api.error(err)}")
        deadline = time.monotonic() + timeout_s
        while wait:
            states = [
                m.get("state", "") for m in self._json(api.fn.ServerModelIndex, server, 0) if m.get("name") == model
            ]
            if not any(s in ("READY", "UNLOADING", "LOADING") for s in states):
                break
            if time.monotonic() >= deadline:
                raise TritonServerError(f"model {model!r} still {states} {timeout_s:g}s after unload")
            await asyncio.sleep(0.05)
        logger.info("Triton server %r unloaded model %r", self.name, model)

    def _json(self, call: Callable[..., int], *args: Any) -> Any:
        api = self._api
        assert api is not None
        message = c_void_p()
        api.check(call(*args, byref(message)))
        try:
            base, size = c_void_p(), c_size_t()
            api.check(api.fn.MessageSerializeToJson(message, byref(base), byref(size)))
            return json.loads(ctypes.string_at(base.value or 0, size.value) if size.value else b"null")
        finally:
            api.fn.MessageDelete(message)

    def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        """The model's metadata, as Triton's HTTP endpoint answers it.

        Raises
        ------
        TritonInferError
            Triton refused (``status`` as its HTTP endpoint gives it: 404 for an unknown model).
        """
        api, server = self._running()
        try:
            return dict(self._json(api.fn.ServerModelMetadata, server, model.encode(), int(version or -1)))
        except capi.TritonCError as exc:
            raise TritonInferError(exc.message, status=exc.http_status) from None

    def metrics_text(self) -> str:
        """Triton's Prometheus metrics, as text (what its ``/metrics`` endpoint serves); empty when off.

        Raises
        ------
        RuntimeError
            The server is not running.
        """
        api, server = self._running()
        if not self.metrics:
            return ""
        metrics = c_void_p()
        api.check(api.fn.ServerMetrics(server, byref(metrics)))
        try:
            base, size = c_void_p(), c_size_t()
            api.check(api.fn.MetricsFormatted(metrics, capi.METRIC_PROMETHEUS, byref(base), byref(size)))
            return ctypes.string_at(base.value or 0, size.value).decode() if size.value else ""
        finally:
            api.fn.MetricsDelete(metrics)

    def client(self) -> InProcessClient:
        """A client of this server for unary calls (what the HTTP client is to a ``tritonserver``)."""
        from tdask.triton.inprocess_client import InProcessClient

        return InProcessClient(self)

    def stream_client(self) -> InProcessClient:
        """A client of this server for decoupled models (what the gRPC stream client is to a ``tritonserver``)."""
        from tdask.triton.inprocess_client import InProcessClient

        return InProcessClient(self)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        model_version: str,
        request_id: str,
        parameters: Mapping[str, str | bool | int | float] | None,
        *,
        decoupled: bool,
    ) -> _Inflight:
        """Build one request and hand it to Triton; the returned entry receives its answer(s).

        Raises
        ------
        TritonCError
            Triton refused the request at once (unknown model, bad input...).
        """
        api, server = self._running()
        fn = api.hot if self.native_callbacks else api.fn
        check = api.check
        completions = self.completions
        assert completions is not None and self._loop is not None
        request = c_void_p()
        check(fn.InferenceRequestNew(byref(request), server, model.encode(), int(model_version or -1)))
        keep: list[Any] = []
        token = self._next_token
        self._next_token += 1
        try:
            if request_id:
                check(fn.InferenceRequestSetId(request, request_id.encode()))
            for name, (array, datatype) in inputs.items():
                encoded = name.encode()
                shape = (c_int64 * array.ndim)(*array.shape)
                check(fn.InferenceRequestAddInput(request, encoded, capi.DATATYPE_CODE[datatype], shape, array.ndim))
                if datatype == "BYTES":
                    serialized = serialize_byte_tensor(array)
                    data = np.frombuffer(serialized.item() if serialized.size else b"", dtype=np.uint8)
                else:
                    data = array
                if data.nbytes:
                    check(fn.InferenceRequestAppendInputData(request, encoded, data.ctypes.data, data.nbytes, 0, 0))
                else:
                    check(fn.InferenceRequestAppendInputData(request, encoded, None, 0, 0, 0))
                keep.append(data)
            for key, value in (parameters or {}).items():
                k = key.encode()
                if isinstance(value, bool):
                    check(fn.InferenceRequestSetBoolParameter(request, k, value))
                elif isinstance(value, int):
                    check(fn.InferenceRequestSetIntParameter(request, k, value))
                elif isinstance(value, float):
                    check(fn.InferenceRequestSetDoubleParameter(request, k, value))
                else:
                    check(fn.InferenceRequestSetStringParameter(request, k, str(value).encode()))
            check(fn.InferenceRequestSetReleaseCallback(request, completions.request_release_fn, token))
            check(
                fn.InferenceRequestSetResponseCallback(request, self._allocator, None, completions.complete_fn, token)
            )
            entry = _Inflight(request.value or 0, keep, None if decoupled else self._loop.create_future())
            self._inflight[token] = entry
            check(fn.ServerInferAsync(server, request, None))
        except BaseException:
            self._inflight.pop(token, None)
            fn.InferenceRequestDelete(request)  # refused: the request stays ours
            raise
        return entry

    def cancel(self, entry: _Inflight) -> None:
        """Ask Triton to cancel a request not answered in full yet (its answer is then dropped)."""
        if not entry.final and self._api is not None and self._server is not None:
            err = self._api.fn.InferenceRequestCancel(entry.request)
            if err:
                logger.debug("cancelling a Triton request: %s", self._api.error(err))

    def _on_events(self, events: list[tuple[int, int, int | None, int]]) -> None:
        """On the loop: deliver responses and delete what Triton released."""
        api = self._api
        assert api is not None
        fn = api.hot if self.native_callbacks else api.fn
        inflight = self._inflight
        for kind, flags, pointer, token in events:
            entry = inflight.get(token)
            if kind == capi.KIND_RELEASE:
                if entry is None:
                    fn.InferenceRequestDelete(pointer)
                    continue
                entry.released = True
                entry.keep = None
                if entry.final:
                    fn.InferenceRequestDelete(pointer)
                    del inflight[token]
                elif entry.future is not None and self._loop is not None:
                    # Released with no answer: the model's execute() gave none for it (a None
                    # in its list), and Triton never will. Its answer precedes its release
                    # (measured); the grace only guards against another ordering.
                    self._loop.call_later(_UNANSWERED_GRACE_S, self._released_unanswered, token)
                # else: kept until the final response, so that cancelling still reaches the
                # response factory the backend shares with it (a decoupled python model's
                # request is released as soon as its execute() returns).
                continue
            result: Any = None
            if pointer:
                try:
                    result = self._read_response(api, fn, pointer)
                except capi.TritonCError as exc:
                    result = exc
                finally:
                    fn.InferenceResponseDelete(pointer)
            if entry is None:
                continue
            final = bool(flags & _FINAL)
            if final:
                entry.final = True
                if entry.timer is not None:
                    entry.timer.cancel()
                if entry.released:
                    fn.InferenceRequestDelete(entry.request)
                    del inflight[token]
            if entry.future is not None:
                if not entry.future.done():
                    if isinstance(result, BaseException):
                        entry.future.set_exception(result)
                    elif result is None:
                        entry.future.set_exception(capi.TritonCError(capi.ERROR_INTERNAL, "Triton sent no response"))
                    else:
                        entry.future.set_result(result)
            else:
                entry.responses.append((result, final))
                if entry.waiter is not None and not entry.waiter.done():
                    entry.waiter.set_result(None)

    def _released_unanswered(self, token: int) -> None:
        entry = self._inflight.get(token)
        if entry is None or entry.final or entry.future is None or entry.future.done():
            return
        message = "Triton released the request without a response: the model's execute() returned None for it"
        self._fail(entry, capi.TritonCError(capi.ERROR_INTERNAL, message))
        del self._inflight[token]
        if self._api is not None:
            self._api.fn.InferenceRequestDelete(entry.request)

    def _fail(self, entry: _Inflight, error: BaseException) -> None:
        entry.final = True
        if entry.future is not None:
            if not entry.future.done():
                entry.future.set_exception(error)
        else:
            entry.responses.append((error, True))
            if entry.waiter is not None and not entry.waiter.done():
                entry.waiter.set_result(None)

    def _read_response(self, api: capi.TritonCApi, fn: Any, response: int) -> InferResult:
        outputs, datatypes, parameters = self._reader.read(api, fn, response)
        return InferResult(outputs=outputs, datatypes=datatypes, parameters=parameters)
