"""One real Triton Inference Server process, owned by one tdask worker process.

:class:`TritonServer` finds a ``tritonserver`` binary (:mod:`tdask.triton.binary`), starts it in
explicit model-control mode with gRPC and HTTP bound to 127.0.0.1 on free ports, health-checks
it with a bounded deadline, notices when it dies, loads and unloads models (optionally with a
config override, :mod:`tdask.triton.model_config`) and stops it together with every
python-backend stub it started (:mod:`tdask.triton.process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from tdask.config import get_seconds
from tdask.triton.base import Status, TritonServerBase, TritonServerError
from tdask.triton.binary import TritonBinary, find_tritonserver, prepare_bundle_backends, server_args, server_env
from tdask.triton.interface import InferClient, MetricsSource, StreamClient
from tdask.triton.options import TritonOptions
from tdask.triton.process import (
    POLL_INTERVAL_S,
    WORKDIR_PREFIX,
    ProcessWatch,
    Reaper,
    free_port,
    make_pdeathsig,
    remove_shm_regions,
    sweep_stale_leftovers,
    terminate_at_exit,
    terminate_group,
)

logger = logging.getLogger(__name__)

__all__ = ["Status", "TritonServer", "TritonServerError"]

#: Log fragments that mean "the port we picked was taken meanwhile"; start retries then.
_PORT_IN_USE_MARKERS = ("already in use", "failed to listen", "failed to bind")
_START_ATTEMPTS = 3
# gRPC would route 127.0.0.1 through $http_proxy/$grpc_proxy unless told not to.
_CONTROL_CHANNEL_ARGS = [("grpc.enable_http_proxy", 0)]


class TritonServer(TritonServerBase):
    """A ``tritonserver`` process in explicit model-control mode, on 127.0.0.1.

    One per worker process. Start it with ``await server.start()`` (or ``async with``), talk to
    it at :attr:`grpc_url`, and stop it with ``await server.stop()``: that stops the server and
    every python-backend stub it spawned (they share its process group). A finalizer stops a
    server whose owner is collected or exits without stopping it, and the server gets SIGKILL
    if the owning process dies.

    Parameters
    ----------
    model_repository
        The Triton model repository served, or several (models load only on
        :meth:`load_model`; a model name must be unique across them).
    log_dir
        Directory for ``<name>.triton.log`` (server stdout and stderr, appended). ``None``: a
        temporary file, removed by :meth:`stop`.
    log_verbose
        Triton's ``--log-verbose`` level; default ``tdask.triton.log-verbose``.
    startup_timeout_s
        Bound on the wait for the server to report ready; default ``tdask.triton.startup-timeout``.
    stop_timeout_s
        Bound on a graceful stop; after it everything left is killed with SIGKILL.
    name
        Names the log file and the log lines (e.g. the worker name).
    binary
        A ``tritonserver`` to use instead of the lookup of :func:`find_tritonserver`.
    backend_directory
        Overrides ``--backend-directory`` (the bundle otherwise gets one assembled).
    extra_args
        More ``tritonserver`` flags, appended last.
    env
        Variables added to the server's environment.
    metrics
        Serve Triton's Prometheus metrics on 127.0.0.1 at a free port (:attr:`metrics_url`);
        default ``tdask.triton.metrics``.
    """

    def __init__(
        self,
        *,
        model_repository: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        log_dir: str | os.PathLike[str] | None = None,
        log_verbose: int | None = None,
        startup_timeout_s: float | None = None,
        stop_timeout_s: float = 10.0,
        name: str = "triton",
        binary: str | os.PathLike[str] | TritonBinary | None = None,
        backend_directory: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        metrics: bool | None = None,
    ) -> None:
        if startup_timeout_s is None:
            startup_timeout_s = get_seconds("tdask.triton.startup-timeout")
            if startup_timeout_s is None:
                raise ValueError(
                    "tdask.triton.startup-timeout must be a duration (a start is always bounded), not null"
                )
        if binary is not None and not isinstance(binary, TritonBinary):
            binary = TritonBinary(path=Path(binary))
        from_config: dict[str, Any] = {}  # left out: TritonOptions reads tdask.triton.* config
        if log_verbose is not None:
            from_config["log_verbose"] = log_verbose
        if metrics is not None:
            from_config["metrics"] = metrics
        options = TritonOptions(
            model_repository=model_repository,
            name=name,
            log_dir=log_dir,
            stop_timeout_s=stop_timeout_s,
            backend_directory=backend_directory,
            startup_timeout_s=float(startup_timeout_s),
            binary=binary,
            extra_args=tuple(extra_args),
            env=dict(env) if env else None,
            **from_config,
        )
        super().__init__(options)
        self.startup_timeout_s = float(startup_timeout_s)
        self._binary = binary
        self._backend_directory = Path(backend_directory) if backend_directory is not None else None
        self.extra_args = list(extra_args)
        self._extra_env = dict(env) if env else None

        self._process: subprocess.Popen[bytes] | None = None
        self._watch: ProcessWatch | None = None
        self._reaper: Reaper | None = None
        self._finalizer: weakref.finalize | None = None
        self._workdir: Path | None = None
        self._grpc_port: int | None = None
        self._http_port: int | None = None
        self._metrics_port: int | None = None
        self._stopping = False
        self._broken: str | None = None

    @classmethod
    def from_options(cls, options: TritonOptions) -> Self:
        """A ``tritonserver`` subprocess run with ``options``."""
        return cls(
            model_repository=options.model_repository,
            log_dir=options.log_dir,
            log_verbose=options.log_verbose,
            startup_timeout_s=options.startup_timeout_s,
            stop_timeout_s=options.stop_timeout_s,
            name=options.name,
            binary=options.binary,
            backend_directory=options.backend_directory,
            extra_args=options.extra_args,
            env=options.env,
            metrics=options.metrics,
        )

    # ------------------------------------------------------------------ properties

    def __repr__(self) -> str:
        """Name, state, pid and gRPC address."""
        where = f" grpc={self.grpc_url}" if self._grpc_port else ""
        return f"<TritonServer {self.name!r} {self.status.value} pid={self.pid}{where}>"

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:<port>`` of the gRPC endpoint (what ``tritonclient.grpc`` takes)."""
        if self._grpc_port is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        return f"127.0.0.1:{self._grpc_port}"

    @property
    def http_url(self) -> str:
        """``127.0.0.1:<port>`` of the HTTP endpoint."""
        if self._http_port is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        return f"127.0.0.1:{self._http_port}"

    @property
    def metrics_url(self) -> str | None:
        """``127.0.0.1:<port>`` of Triton's Prometheus metrics (``/metrics``), or ``None`` when off."""
        if self._metrics_port is None:
            return None
        return f"127.0.0.1:{self._metrics_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id), once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the server has exited, else ``None``."""
        return self._watch.returncode if self._watch is not None else None

    @property
    def model_repository(self) -> Path:
        """The (first) model repository."""
        return self.model_repositories[0]

    @property
    def address(self) -> str:
        """Where requests go: :attr:`http_url`."""
        return self.http_url

    @property
    def metrics_source(self) -> MetricsSource | None:
        """Triton's metrics endpoint, :attr:`metrics_url` (``None`` when off)."""
        return self.metrics_url

    @property
    def broken(self) -> str | None:
        """Why the server cannot serve on: it exited (or was killed) without :meth:`stop`; else ``None``."""
        return self._broken

    def is_alive(self) -> bool:
        """Whether the server process is running (it may still be starting)."""
        return self._watch is not None and not self._watch.exited.is_set()

    def client(self) -> InferClient:
        """A new HTTP client of this server (:class:`~tdask.triton.http_client.TritonHttpClient`)."""
        from tdask.triton.http_client import TritonHttpClient

        return TritonHttpClient.from_url(self.http_url)

    def stream_client(self) -> StreamClient:
        """A new gRPC stream client of this server (:class:`~tdask.triton.grpc_stream.TritonStreamClient`)."""
        from tdask.triton.grpc_stream import TritonStreamClient

        return TritonStreamClient(self.grpc_url)

    # ------------------------------------------------------------------ death notification

    def add_exit_callback(self, callback: Callable[[int], object]) -> None:
        """Call ``callback(returncode)`` once the server process exits.

        It runs in a watcher thread (use ``loop.call_soon_threadsafe`` to reach a loop), after
        the callbacks added before it, or right away in the caller's thread if the server has
        exited and every callback has been called.
        """
        if self._watch is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        self._watch.add_callback(callback)

    def remove_exit_callback(self, callback: Callable[[int], object]) -> None:
        """Forget a callback given to :meth:`add_exit_callback`."""
        if self._watch is not None:
            self._watch.remove_callback(callback)

    async def wait(self) -> int:
        """Wait until the server process exits.

        Returns
        -------
        int
            Its exit status (negative: killed by that signal).

        Raises
        ------
        RuntimeError
            The server has not been started.
        """
        watch = self._watch
        if watch is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()

        def notify(returncode: int) -> None:
            def resolve() -> None:
                if not future.done():
                    future.set_result(returncode)

            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(resolve)

        watch.add_callback(notify)
        try:
            return await future
        finally:
            watch.remove_callback(notify)

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        began = time.monotonic()
        binary = self._binary or find_tritonserver()
        tmp = Path(tempfile.gettempdir())
        sweep_stale_leftovers(tmp)
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-{self._safe_name}-"))
        backends = self._backend_directory
        if backends is None and binary.bundle_root is not None:
            try:
                backends = prepare_bundle_backends(binary, self._workdir)
            except FileNotFoundError as exc:  # no python-backend stub for this Python
                raise TritonServerError(str(exc)) from exc
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log_path = self.log_dir / f"{self._safe_name}.triton.log"
        else:
            self._log_path = self._workdir / "triton.log"
        env = server_env(binary, self._extra_env)
        deadline = time.monotonic() + self.startup_timeout_s

        for attempt in range(1, _START_ATTEMPTS + 1):
            self._grpc_port, self._http_port = free_port(), free_port()
            while self._http_port == self._grpc_port:
                self._http_port = free_port()
            if self.metrics:
                self._metrics_port = free_port()
                while self._metrics_port in (self._grpc_port, self._http_port):
                    self._metrics_port = free_port()
            args = self._command(binary, backends)
            self._launch(args, env)
            try:
                await self._wait_ready(deadline)
            except TritonServerError as exc:
                port_race = exc.returncode is not None and any(
                    marker in exc.log_tail.lower() for marker in _PORT_IN_USE_MARKERS
                )
                # Killed by a signal while starting (seen: SIGABRT from gRPC's epoll poller on an
                # overloaded host) is not a configuration error, which exits with a status: retry.
                crashed = exc.returncode is not None and exc.returncode < 0
                if not (port_race or crashed) or attempt == _START_ATTEMPTS:
                    raise
                logger.warning(
                    "Triton server %r %s during start-up; starting it again (attempt %d of %d)",
                    self.name,
                    "lost a port race" if port_race else f"died by signal {-(exc.returncode or 0)}",
                    attempt + 1,
                    _START_ATTEMPTS,
                )
                await self._end_process()
                continue
            break
        logger.info(
            "Triton server %r ready in %.2fs: pid=%s grpc=%s http=%s binary=%s log=%s",
            self.name,
            time.monotonic() - began,
            self.pid,
            self.grpc_url,
            self.http_url,
            binary.path,
            self._log_path,
        )

    def _command(self, binary: TritonBinary, backends: Path | None) -> list[str]:
        assert self._grpc_port is not None and self._http_port is not None
        return server_args(
            self.options,
            binary,
            shm_prefix=self._shm_prefix,
            backends=backends,
            grpc_port=self._grpc_port,
            http_port=self._http_port,
            metrics_port=self._metrics_port,
        )

    def _launch(self, args: list[str], env: dict[str, str]) -> None:
        assert self._log_path is not None
        with open(self._log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            log_file.write(f"--- tdask: starting Triton server {self.name!r}: {' '.join(args)}\n".encode())
            log_file.flush()
            logger.debug("Starting Triton server %r: %s", self.name, " ".join(args))
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._workdir,
                start_new_session=True,  # its own process group: stop() signals it with its stubs
                preexec_fn=make_pdeathsig(),
            )
        # Ends the stubs and removes the shared memory if this process or the server is killed.
        self._reaper = Reaper(self._process.pid, self._shm_prefix)
        # A weak reference: the watcher thread must not keep this object (and its finalizer) alive.
        on_exit = weakref.WeakMethod(self._on_exit)

        def notify(returncode: int) -> None:
            method = on_exit()
            if method is not None:
                method(returncode)

        self._watch = ProcessWatch(self._process, notify)
        self._finalizer = weakref.finalize(
            self,
            terminate_at_exit,
            self._process,
            str(self._workdir),
            self._shm_prefix,
            self._grpc_port,
            min(self.stop_timeout_s, 5.0),
            self._reaper,
        )

    def _stub_died(self, model: str, pid: int) -> None:
        """A stub died: Triton 2.5x neither restarts it nor unloads its model cleanly; end the server.

        Its exit then restarts the worker (the exit callbacks), without waiting for Triton's
        own health check to fail a request first.
        """
        process = self._process
        if process is None or self._stopping:
            return
        self._broken = f"the python-backend stub (pid {pid}) of model {model!r} died"
        logger.error("Triton server %r: %s; killing it", self.name, self._broken)
        with contextlib.suppress(OSError):
            process.kill()

    def _on_exit(self, returncode: int) -> None:
        """Log an unexpected exit, and mark the server broken (in the watcher thread, first of the callbacks)."""
        if self._stopping or self.status is not Status.running:
            # stop() asked for it, or start() reports it (with the log) by raising.
            logger.debug("Triton server %r exited with %s", self.name, returncode)
            return
        if self._broken is None:
            self._broken = f"its Triton server exited (status {returncode})"
        logger.error(
            "Triton server %r (pid %s) exited unexpectedly with status %s; log %s ends with:\n%s",
            self.name,
            self.pid,
            returncode,
            self._log_path,
            self.log_tail(),
        )

    async def _wait_ready(self, deadline: float) -> None:
        """Poll the server's readiness until ``deadline``, failing fast if it exits."""
        from tritonclient.grpc import aio as grpcclient
        from tritonclient.utils import InferenceServerException

        assert self._watch is not None
        last_error: Exception | None = None
        client = grpcclient.InferenceServerClient(self.grpc_url, channel_args=_CONTROL_CHANNEL_ARGS)
        try:
            while True:
                if self._watch.exited.is_set():
                    returncode = self._watch.returncode
                    tail = self.log_tail()
                    raise TritonServerError(
                        f"Triton server {self.name!r} exited with status {returncode} during start-up; "
                        f"log {self._log_path} ends with:\n{tail}",
                        returncode=returncode,
                        log_tail=tail,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = self.log_tail()
                    raise TritonServerError(
                        f"Triton server {self.name!r} was not ready within {self.startup_timeout_s:g}s "
                        f"(last check: {last_error}); log {self._log_path} ends with:\n{tail}",
                        log_tail=tail,
                    )
                try:
                    if await client.is_server_ready(client_timeout=min(1.0, max(remaining, 0.05))):
                        return
                except InferenceServerException as exc:
                    last_error = exc
                await asyncio.sleep(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0)))
        finally:
            await client.close()

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the server and its stubs; safe to call more than once.

        SIGTERM first (Triton unloads models and ends its stubs), then, after
        ``stop_timeout_s``, SIGKILL for whatever is left of the process group. Returns once no
        process of the group is left.

        Parameters
        ----------
        graceful
            ``False`` sends SIGKILL at once (for a server that is broken anyway, e.g. after one
            of its stubs died).

        Raises
        ------
        TritonServerError
            Processes of the group survived SIGKILL.
        """
        async with self._lock:
            if self.status is Status.stopped:
                return
            self.status = Status.stopping
            try:
                await self._shutdown(graceful=graceful)
            finally:
                self.status = Status.stopped

    async def _shutdown(self, graceful: bool = True) -> None:
        """End the process (if any) and remove what start() created."""
        self._unwatch_stubs()
        try:
            await self._end_process(graceful)
        finally:
            if self._workdir is not None:
                if self.log_dir is None:
                    self._log_path = None  # the temporary log goes with the workdir
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    async def _end_process(self, graceful: bool = True) -> None:
        process, watch = self._process, self._watch
        self._stopping = True
        try:
            if process is not None and watch is not None:
                await self._terminate(process, watch, graceful)
                remove_shm_regions(self._shm_prefix)
        finally:
            self._stopping = False
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            if self._reaper is not None:
                reaper, self._reaper = self._reaper, None
                await asyncio.to_thread(reaper.release)

    async def _terminate(self, process: subprocess.Popen[bytes], watch: ProcessWatch, graceful: bool = True) -> None:
        stopped = await terminate_group(
            process, watch, name=self.name, timeout_s=self.stop_timeout_s, grpc_port=self._grpc_port, graceful=graceful
        )
        if not stopped:
            raise TritonServerError(
                f"Triton server {self.name!r}: processes of group {process.pid} survived SIGKILL",
                returncode=watch.returncode,
            )
        logger.info("Triton server %r stopped (status %s)", self.name, watch.returncode)

    # ------------------------------------------------------------------ models

    def _client(self) -> Any:
        from tritonclient.grpc import aio as grpcclient

        if self.status is not Status.running:
            raise RuntimeError(f"Triton server {self.name!r} is {self.status.value}, not running")
        return grpcclient.InferenceServerClient(self.grpc_url, channel_args=_CONTROL_CHANNEL_ARGS)

    def _request_failed(self, what: str, exc: Exception) -> TritonServerError:
        if not self.is_alive():
            tail = self.log_tail()
            return TritonServerError(
                f"{what} failed: Triton server {self.name!r} exited with status {self.returncode}; "
                f"log ends with:\n{tail}",
                returncode=self.returncode,
                log_tail=tail,
            )
        return TritonServerError(f"{what} failed: {exc}")

    async def load_model(
        self, model: str, config: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Load (or reload) ``model``, optionally with a config override merged into its config.

        Parameters
        ----------
        model
            The model's directory name in the repository.
        config
            Triton JSON config keys to override, e.g.
            ``{"instance_group": [{"kind": "KIND_CPU", "count": 2}], "parameters": {"delay": "0.001"}}``;
            see :func:`merge_model_config`.
        timeout_s
            Bound on the load; ``None`` waits as long as Triton takes.

        Raises
        ------
        TritonServerError
            Triton refused or failed the load (its message says why), or the server is gone.
        """
        from tritonclient.utils import InferenceServerException

        self.check_model(model)
        payload = None
        if config:
            payload = json.dumps(self.model_config(model, config))
        began = time.monotonic()
        client = self._client()
        self._unwatch_stubs(model)  # a reload ends the model's current stubs
        try:
            await client.load_model(model, config=payload, client_timeout=timeout_s)
        except InferenceServerException as exc:
            process = self._process
            if "DEADLINE_EXCEEDED" in str(exc.status()) and process is not None and self.is_alive():
                # Triton cannot interrupt a load (see InProcessServer.load_model): give the
                # server up; its exit restarts the worker, the reaper ends its stubs.
                reason = f"loading model {model!r} took longer than {timeout_s:g}s and cannot be interrupted"
                logger.error("Triton server %r: %s; killing it (log %s)", self.name, reason, self._log_path)
                process.kill()
                raise TritonServerError(f"{reason}; the server was killed", log_tail=self.log_tail()) from exc
            failed = self._request_failed(f"loading model {model!r} on Triton server {self.name!r}", exc)
            if self.is_alive():
                failed = TritonServerError(f"{failed}{self.explain_load_failure(model)}")
            raise failed from exc
        finally:
            await client.close()
        self._watch_stubs(model)
        self._log_loaded(model, began, bool(payload))

    async def unload_model(self, model: str, *, wait: bool = True, timeout_s: float = 30.0) -> None:
        """Unload ``model``; with ``wait``, return only once Triton reports it unloaded.

        Triton's unload returns as soon as the unload starts, while in-flight requests finish
        and the stubs exit; ``wait`` polls the repository index so the caller knows it is gone.

        Parameters
        ----------
        model
            The model's name.
        wait
            Whether to wait until the repository index no longer shows it loaded.
        timeout_s
            Bound on the unload and the wait.

        Raises
        ------
        TritonServerError
            Triton refused the unload, the model was still loaded after ``timeout_s``, or the
            server is gone.
        """
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout_s
        client = self._client()
        self._unwatch_stubs(model)
        try:
            await client.unload_model(model, client_timeout=timeout_s)
            while wait:
                index = await client.get_model_repository_index(
                    as_json=True, client_timeout=max(deadline - time.monotonic(), 0.1)
                )
                states = [m.get("state", "") for m in index.get("models", []) if m.get("name") == model]
                if not any(state in ("READY", "UNLOADING", "LOADING") for state in states):
                    break
                if time.monotonic() >= deadline:
                    raise TritonServerError(f"model {model!r} still {states} {timeout_s:g}s after unload")
                await asyncio.sleep(POLL_INTERVAL_S)
        except InferenceServerException as exc:
            raise self._request_failed(f"unloading model {model!r} on Triton server {self.name!r}", exc) from exc
        finally:
            await client.close()
        logger.info("Triton server %r unloaded model %r", self.name, model)
