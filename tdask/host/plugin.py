"""The worker plugin that hosts operators: its lifecycle, and nothing else.

:class:`OperatorHost` builds a worker's operators at setup (starting the worker's Triton server
on first use), wires the request planes to :class:`~tdask.host.serving.Serving`, registers with
the scheduler's broker, and undoes it all at teardown. Two ways in:

- ``Worker(plugins=[OperatorHost([...])])`` (what :class:`tdask.Deployment` does): a setup
  failure fails the worker's start, so a broken deployment fails loudly.
- ``dask worker ADDR --preload tdask.worker --tdask-operator '{"name": ...}'``
  (:mod:`tdask.host.preload`): distributed only logs preload errors, so failures are also
  recorded in the scheduler's registry, where callers see them as
  :class:`~tdask.exceptions.OperatorUnavailableError` instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.config
from distributed import Worker, WorkerPlugin
from distributed.core import Status

from tdask import metrics
from tdask.config import get_seconds
from tdask.data_plane import RemoteTensor, TensorStore
from tdask.host import readiness
from tdask.host.metrics import TritonMetrics, export_worker
from tdask.host.serving import Hosted, Serving
from tdask.operator import Operator, OperatorConfig, OperatorContext
from tdask.protocol import Rpc
from tdask.protocol.signature import normalize_signature
from tdask.request_plane import (
    BrokerSession,
    DirectServer,
    QueueServer,
    Registry,
    RequestPlane,
    make_request_plane,
)
from tdask.request_plane.registry import _HOSTS_TTL_S

if TYPE_CHECKING:
    from tdask.triton import TritonServerBase

logger = logging.getLogger(__name__)

__all__ = ["PLUGIN_NAME", "OperatorHost", "WorkerEndpoint"]

PLUGIN_NAME = "tdask-operators"

# Worker states in which the plugin stops waiting to register.
_GONE = (Status.closing, Status.closed, Status.failed, Status.closing_gracefully)


def set_gc_threshold(value: Any) -> tuple[int, ...]:
    """Apply ``tdask.worker.gc-threshold`` to this process (``None``: leave it); return the thresholds now.

    Raises
    ------
    ValueError
        The value is not a list of one to three non-negative integers.
    """
    if value is not None:
        if (
            not isinstance(value, (list, tuple))
            or not 1 <= len(value) <= 3
            or not all(type(n) is int and n >= 0 for n in value)
        ):
            raise ValueError(f"tdask.worker.gc-threshold must be null or 1 to 3 non-negative integers, got {value!r}")
        gc.set_threshold(*value)
        logger.debug("garbage-collector thresholds set to %s", gc.get_threshold())
    return gc.get_threshold()


def _signature(hosted: Hosted) -> dict[str, Any] | None:
    """The signature the worker publishes for an operator (its config's, else its own); ``None``: undeclared."""
    config = hosted.config
    try:
        declared = config.declared_signature()
        return declared if declared is not None else normalize_signature(hosted.operator.signature())
    except Exception:
        logger.exception("operator %s declares a malformed signature; publishing none", config.key)
        return None


def _infos(hosted: dict[str, Hosted]) -> list[dict[str, Any]]:
    """What the broker's registry records of each hosted operator."""
    return [
        {
            "key": key,
            "name": h.config.name,
            "version": h.config.version,
            "max_inflight": h.config.max_inflight_requests,
            "routing": h.config.routing,
            "signature": _signature(h),
        }
        for key, h in hosted.items()
    ]


class WorkerEndpoint:
    """What :class:`tdask.RemoteOperator` uses inside an operator: the worker's own planes.

    Large outputs stay descriptors by default (``fetch_default``), so they can be forwarded by
    reference; large inputs an operator sends are kept in this worker's store.
    """

    fetch_default = False
    #: A worker's endpoint serves as long as its operators run.
    closed = False

    def __init__(self, plane: RequestPlane, store: TensorStore) -> None:
        self.plane = plane
        self.peer: TensorStore = store

    async def place(self, key: str, array: Any, wait_s: float) -> RemoteTensor:
        """Keep ``array`` in this worker's store (the operator ``key``'s host pulls it); no wait."""
        return self.peer.put(array)


class OperatorHost(WorkerPlugin):
    """Builds a worker's operators at setup, serves their requests, stops them at teardown.

    Parameters
    ----------
    operators
        The operators this worker hosts (validated here, so bad config fails on the caller).
    log_dir
        Where operator-owned processes (Triton) write their logs; default: the worker's
        local directory.
    log_file
        Copy this worker's ``distributed`` and ``tdask`` log lines into this file.
    log_level
        Level of the worker's ``distributed`` and ``tdask`` loggers.
    stderr_level
        Level of what the worker prints on stderr (its stream handlers only: ``log_file`` keeps
        the loggers' level); ``None``: unchanged.
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(
        self,
        operators: Sequence[OperatorConfig],
        *,
        log_dir: str | Path | None = None,
        log_file: str | Path | None = None,
        log_level: str | int | None = None,
        stderr_level: str | int | None = None,
    ) -> None:
        operators = list(operators)
        if not operators:
            raise ValueError("OperatorHost needs at least one OperatorConfig")
        keys = set()
        for config in operators:
            if not isinstance(config, OperatorConfig):
                raise TypeError(f"expected OperatorConfig, got {type(config).__name__}")
            if config.key in keys:
                raise ValueError(f"operator {config.key} listed twice for one worker")
            keys.add(config.key)
        self.operators = operators
        self.log_dir = str(log_dir) if log_dir is not None else None
        self.log_file = str(log_file) if log_file is not None else None
        self.log_level = log_level.upper() if isinstance(log_level, str) else log_level
        self.stderr_level = stderr_level.upper() if isinstance(stderr_level, str) else stderr_level
        self._reset()

    def _reset(self) -> None:
        self.worker: Worker | None = None
        self.store: TensorStore | None = None
        self.broker: BrokerSession | None = None
        self.queue: QueueServer | None = None
        self.direct: DirectServer | None = None
        self.plane: RequestPlane | None = None
        self.serving: Serving | None = None
        self.failures: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._triton: TritonServerBase | None = None
        self._triton_lock = asyncio.Lock()
        self._closing = False
        self._scheduler_lost = False
        self._restart: asyncio.Task[Any] | None = None
        self._restart_pending: str | None = None  # asked for while the worker was starting
        self._log_handler: logging.Handler | None = None
        self._triton_metrics: TritonMetrics | None = None
        self._metrics_token: int | None = None
        self._context: OperatorContext | None = None
        # A second OperatorHost on a worker that has one joins it (_join): the first one serves
        # its operators too; these are what the second brought, and the first's registration.
        self._primary: OperatorHost | None = None
        self._extra: list[OperatorConfig] = []
        self._joined_keys: list[str] = []
        self._registered = False
        # Operators unregistered ahead of this worker's leaving (scale-down, removal): still
        # served until they have finished what they hold (retire).
        self._retired: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "operators": self.operators,
            "log_dir": self.log_dir,
            "log_file": self.log_file,
            "log_level": self.log_level,
            "stderr_level": self.stderr_level,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.operators = state["operators"]
        self.log_dir = state["log_dir"]
        self.log_file = state.get("log_file")
        self.log_level = state.get("log_level")
        self.stderr_level = state.get("stderr_level")
        self._reset()

    @property
    def hosted(self) -> dict[str, Hosted]:
        """The operators running here, by ``name/version``."""
        return self.serving.hosted if self.serving is not None else {}

    # -- logs ------------------------------------------------------------------------------

    def _start_log_file(self) -> None:
        """Apply ``log_level``; copy this worker's distributed and tdask log lines into ``log_file``."""
        if self.log_level is not None:
            for name in ("distributed", "tdask"):
                logging.getLogger(name).setLevel(self.log_level)
        if self.stderr_level is not None:
            for name in ("distributed", "tdask"):
                for handler in logging.getLogger(name).handlers:
                    if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                        handler.setLevel(self.stderr_level)
        if self.log_file is None:
            return
        Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_file)
        handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
        for name in ("distributed", "tdask"):
            logging.getLogger(name).addHandler(handler)
        self._log_handler = handler

    def _stop_log_file(self) -> None:
        if self._log_handler is not None:
            for name in ("distributed", "tdask"):
                logging.getLogger(name).removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def _log_dir(self) -> Path:
        assert self.worker is not None
        # Not the worker's scratch directory (deleted with the worker): Triton's log must outlive it.
        configured = self.log_dir or dask.config.get("tdask.log-dir", None)
        path = Path(configured) if configured else Path(tempfile.gettempdir()) / "tdask-logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- lifecycle -------------------------------------------------------------------------

    async def setup(self, worker: Worker) -> None:
        """Build every operator; on failure, record it for callers and raise.

        On a worker that already runs an :class:`OperatorHost` (``client.register_plugin`` of
        more operators, under another name), this one joins it: the first host serves these
        operators too, so that those already there keep being served (a second serving loop of
        its own would replace the first's handlers).
        """
        self.worker = worker
        readiness.install(worker)  # /tdask/ready on the worker's HTTP server
        primary = next(
            (
                p
                for p in worker.plugins.values()
                if isinstance(p, OperatorHost) and p is not self and p._primary is None and p.serving is not None
            ),
            None,
        )
        if primary is not None and not primary._closing:
            await self._join(primary)
            return
        self._start_log_file()
        set_gc_threshold(dask.config.get("tdask.worker.gc-threshold", None))
        self.store = TensorStore(worker)
        self.store.install()
        self.broker = BrokerSession(
            Registry(worker.scheduler),
            f"{worker.address}#{uuid.uuid4().hex[:8]}",
            worker=worker.address,
            connection_args=worker.connection_args,
        )
        self.queue = QueueServer(self.broker)
        self.direct = DirectServer(worker, store=self.store)
        self.plane = make_request_plane(self.broker, connection_args=worker.connection_args)
        self.store.shortcut = self.plane.shortcut  # host tensors to and from other workers, where it can
        self.serving = Serving(
            worker_address=worker.address,
            store=self.store,
            endpoint=WorkerEndpoint(self.plane, self.store),
            planes=[self.direct, self.queue],
            keep_unanswered=self._beyond_repair,
            on_execution_timeout=self._execution_timed_out,
        )
        self.plane.on_orphan = self.serving.release_orphan
        worker.handlers[Rpc.HOST_STATS] = self.serving.stats
        worker.handlers[Rpc.RETIRE] = self.retire
        worker.handlers[Rpc.MODEL] = self.model_control
        worker.handle_scheduler = self._handle_scheduler  # type: ignore[method-assign]
        self._metrics_token = export_worker(lambda: str(worker.name), self._live_metrics)
        await self.direct.start()
        context = OperatorContext(
            worker=worker,
            store=self.store,
            log_dir=self._log_dir(),
            triton_server=self._triton_server,
            restart_worker=self.restart_worker,
        )
        self._context = context
        for config in self.operators:
            try:
                self.serving.hosted[config.key] = Hosted(config, await self._build(config, context))
            except Exception as exc:
                self.failures[config.name] = f"{type(exc).__name__}: {exc}"
                logger.exception("operator %s failed to start on %s", config.key, worker.address)
                worker.log_event("tdask", {"action": "operator-failed", "operator": config.key, "error": str(exc)})
        self._tasks.append(asyncio.create_task(self._register_and_report()))
        if self.failures:
            raise RuntimeError(
                f"tdask operators failed to start on {worker.address}: "
                + "; ".join(f"{name}: {msg}" for name, msg in self.failures.items())
            )

    async def _build(self, config: OperatorConfig, context: OperatorContext) -> Operator:
        cls = config.resolve()
        op_logger = logging.getLogger(f"tdask.operator.{config.name}")
        if config.log_level is not None:
            op_logger.setLevel(config.log_level.upper() if isinstance(config.log_level, str) else config.log_level)
        operator = cls(config.name, config.version, dict(config.parameters), config.repository, op_logger, context)
        await operator.setup()
        logger.info("operator %s ready on %s", config.key, context.worker.address)
        return operator

    async def _triton_server(self) -> TritonServerBase:
        """The worker's Triton server, started on first use over all its Triton repositories.

        Of the kind ``tdask.triton.mode`` names (:func:`tdask.triton.start_server`).
        """
        from tdask.triton import TritonOptions, start_server

        async with self._triton_lock:
            if self._triton is None:
                assert self.worker is not None
                configs = [*self.operators, *self._extra]
                repositories = sorted({c.repository for c in configs if c.is_triton and c.repository})
                name = str(self.worker.name).replace("/", "_")
                server = await start_server(
                    TritonOptions(model_repository=repositories, log_dir=self._log_dir(), name=name)
                )
                loop = asyncio.get_running_loop()

                def exited(returncode: int) -> None:  # may run in the server's watcher thread
                    try:
                        on_loop = asyncio.get_running_loop() is loop
                    except RuntimeError:
                        on_loop = False
                    if on_loop:  # at once: no request may reach the broken server meanwhile
                        self._triton_exited(returncode)
                    else:
                        loop.call_soon_threadsafe(self._triton_exited, returncode)

                server.add_exit_callback(exited)
                self._triton = server
                if server.metrics_source is not None:
                    self._triton_metrics = TritonMetrics(server.metrics_source)
            return self._triton

    def _triton_exited(self, returncode: int) -> None:
        server = self._triton
        if not self._closing:
            reason = server.broken if server is not None else None  # why it cannot serve on
            self.restart_worker(reason or f"its Triton server exited (status {returncode})")

    def _beyond_repair(self) -> bool:
        return self._restart is not None or (self._triton is not None and not self._triton.is_alive())

    def restart_worker(self, reason: str) -> None:
        """Close this worker so that its Nanny starts a fresh one (with a fresh Triton server).

        From now on, requests that fail here are not answered with their error: their callers
        (or the broker) serve them again elsewhere once this worker has left.
        """
        if self._closing or self._restart is not None or self.worker is None:
            return
        if self.worker.status not in (Status.running, Status.paused):
            # Still starting: a failed setup reports itself (the worker fails to start); a server
            # that broke after the operators were built restarts the worker once it runs.
            self._restart_pending = self._restart_pending or reason
            return
        logger.error("restarting worker %s: %s", self.worker.address, reason)
        self.worker.log_event("tdask", {"action": "restart", "reason": reason, "operators": list(self.hosted)})
        # Not in self._tasks: teardown (which this close runs) cancels those.
        self._restart = asyncio.create_task(self._close_for_restart(reason))

    async def _close_for_restart(self, reason: str) -> None:
        worker = self.worker
        assert worker is not None
        await worker.close(nanny=False, reason=f"tdask-restart: {reason}")
        if worker.nanny:
            # Its Nanny starts a fresh worker once this process ends: end it now. Left to
            # itself, the process would wait for the Nanny's stop-queue thread (2 s), and exit
            # with Triton's core still in it (a restart does not stop it gracefully).
            for name in ("", "distributed", "tdask"):
                for handler in logging.getLogger(name).handlers:
                    with contextlib.suppress(Exception):
                        handler.flush()
            os._exit(0)

    def _execution_timed_out(self, key: str, request_ids: list[str]) -> None:
        """A batch of ``key`` ran past its execution timeout: tell the scheduler (its counters)."""
        if self.worker is not None:
            self.worker.log_event("tdask", {"action": "execution-timeout", "operator": key, "requests": request_ids})

    async def _register_and_report(self) -> None:
        """Once the worker is registered: announce operators (and failures), then report stats."""
        worker, queue, serving = self.worker, self.queue, self.serving
        assert worker is not None and queue is not None and serving is not None
        while worker.status != Status.running:
            if worker.status in _GONE:
                return
            await asyncio.sleep(0.02)
        if self._restart_pending is not None:
            self.restart_worker(self._restart_pending)
            return
        infos = _infos(serving.hosted)
        self._registered = True  # operators joining from now on register themselves
        await queue.register(infos, self.failures, on_requester_left=self._requester_left)
        interval = get_seconds("tdask.worker.report-interval") or 1.0
        last: tuple[dict[str, Any], dict[str, Any]] | None = None
        while True:
            if self._triton_metrics is not None and self._triton is not None and self._triton.is_alive():
                await self._triton_metrics.refresh()
            report = (serving.stats(), self._host_metrics(per_model=True))
            if report != last:
                queue.report(report[0], {**report[1], "time": time.time(), "interval": interval})
                last = report
            await asyncio.sleep(interval)

    def _host_metrics(self, *, per_model: bool) -> dict[str, Any]:
        """The worker's own counters: the tensor store's, and Triton's (per model only, or all)."""
        host: dict[str, Any] = {"data_plane": self.store.stats() if self.store is not None else {}}
        triton = self._triton_metrics
        if triton is not None:
            host["triton"] = metrics.families_to_msg(triton.per_model() if per_model else triton.families)
        return host

    def _live_metrics(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What this worker's ``/metrics`` shows now (read at scrape time)."""
        return self.stats(), self._host_metrics(per_model=False)

    async def _handle_scheduler(self, comm: Any) -> None:
        """The worker's stream from the scheduler (replaces ``Worker.handle_scheduler``).

        distributed closes a worker whose scheduler connection breaks, and tells its Nanny to
        close too. tdask restarts it instead (``nanny=False``): the Nanny starts a fresh worker,
        which builds its operators and then waits for a scheduler at the same address
        (``death_timeout``), so a scheduler that comes back finds its workers rejoining. Without
        a Nanny the worker closes, as distributed's would. A scheduler that closes in an orderly
        way tells its workers to close first: they do, and are not restarted.
        """
        worker = self.worker
        assert worker is not None
        try:
            await worker.handle_stream(comm)
        finally:
            lost = worker.status in (Status.running, Status.paused) and not self._closing
            if lost and worker.nanny:
                self._scheduler_lost = True
                logger.warning("worker %s lost its scheduler; restarting to rejoin it when it is back", worker.address)
                await worker.close(nanny=False, reason="tdask-scheduler-lost")
            else:
                self._scheduler_lost = lost
                await worker.close(reason="worker-handle-scheduler-connection-broken")

    def _requester_left(self, requester: str) -> None:
        if self.direct is not None:
            self.direct.requester_left(requester)

    async def teardown(self, worker: Worker) -> None:
        """Stop taking requests, let in-flight ones finish briefly, hand back the rest, stop.

        A host that joined another (:meth:`setup`) removes only its own operators, after they
        finished what they hold (:meth:`retire`); the others keep serving.
        """
        if self._primary is not None:
            await self._leave(self._primary)
            return
        self._closing = True
        if self.serving is not None:
            self.serving.closing = True
            # The scheduler is gone, so is every worker: finish what is here (the calls of
            # pipelines in flight included) instead of handing it back to nobody.
            self.serving.finishing = self._scheduler_lost
        if self.direct is not None:
            self.direct.stop_accepting(nested=self._scheduler_lost)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.queue is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.queue.unregister(release_leases=False), 5)
        if self.serving is not None:
            # A worker beyond repair (its Triton died) cannot finish anything: stop at once.
            drain_s = 0.0 if self._beyond_repair() else get_seconds("tdask.worker.drain-timeout") or 0.0
            await self.serving.drain(drain_s)
        if self.queue is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.queue.unregister(release_leases=True), 5)
        if self.plane is not None:
            await self.plane.aclose()
        if self.direct is not None and self._restart is not None:
            # Beyond repair: its direct callers re-serve what it held as soon as its sessions
            # close (now), not after Triton's stop.
            await self.direct.close()
        for key, hosted in self.hosted.items():
            try:
                await hosted.operator.teardown()
            except Exception:
                logger.exception("operator %s failed to tear down", key)
        if self._triton is not None:
            await self._triton.stop(graceful=self._restart is None)
            self._triton = None
        if self.store is not None:
            await self.store.close()
        for handler in (Rpc.HOST_STATS, Rpc.RETIRE, Rpc.MODEL):
            worker.handlers.pop(handler, None)
        if self._metrics_token is not None:
            metrics.remove_source(self._metrics_token)
            self._metrics_token = None
        if self.direct is not None:
            await self.direct.close()
        self._stop_log_file()

    def stats(self) -> dict[str, Any]:
        """In-flight accounting per operator (see :meth:`Serving.stats`)."""
        if self._primary is not None:
            stats = self._primary.stats()
            return {key: stats[key] for key in self._joined_keys if key in stats}
        return self.serving.stats() if self.serving is not None else {}

    # -- operators joining and leaving a running worker; retiring; model control ----------

    async def _join(self, primary: OperatorHost) -> None:
        """Have ``primary`` (the worker's first host) build and serve this host's operators too."""
        worker, serving, queue, context = primary.worker, primary.serving, primary.queue, primary._context
        assert worker is not None and serving is not None and queue is not None and context is not None
        self._primary = primary
        clash = [c.key for c in self.operators if c.key in serving.hosted]
        if clash:
            raise ValueError(f"operators {clash} are already hosted on worker {worker.address}")
        primary._extra.extend(self.operators)  # its Triton server, if not started yet, covers their repositories
        built: dict[str, Hosted] = {}
        for config in self.operators:
            try:
                triton = primary._triton
                if config.is_triton and triton is not None and config.repository:
                    if Path(config.repository).resolve() not in triton.model_repositories:
                        raise ValueError(
                            f"the worker's Triton server runs over {[str(r) for r in triton.model_repositories]}, "
                            f"not {config.repository}; host this model on another worker"
                        )
                built[config.key] = Hosted(config, await primary._build(config, context))
            except Exception as exc:
                self.failures[config.name] = f"{type(exc).__name__}: {exc}"
                logger.exception("operator %s failed to start on %s", config.key, worker.address)
        serving.hosted.update(built)
        self._joined_keys = list(built)
        logger.info("worker %s now also hosts %s", worker.address, self._joined_keys)
        if primary._registered or self.failures:
            await queue.register(_infos(built), self.failures, on_requester_left=primary._requester_left)
        if self.failures:
            raise RuntimeError(
                f"tdask operators failed to start on {worker.address}: "
                + "; ".join(f"{name}: {msg}" for name, msg in self.failures.items())
            )

    async def _leave(self, primary: OperatorHost) -> None:
        """Stop serving this host's operators on ``primary``'s worker; the others go on."""
        keys, self._joined_keys = self._joined_keys, []
        serving = primary.serving
        if primary._closing or serving is None or not keys:
            return  # the worker is closing: its first host stops everything
        await primary.retire(keys)
        for key in keys:
            hosted = serving.hosted.pop(key, None)
            if hosted is None:
                continue
            handed: dict[Any, list[tuple[str, str]]] = {}
            for entry in hosted.waiting:  # none, unless retire gave up waiting
                handed.setdefault(entry.plane, []).append(entry.key)
            for plane, waiting in handed.items():
                plane.hand_back(waiting)
            for task in list(hosted.batches):
                task.cancel()
            await asyncio.gather(*hosted.batches, return_exceptions=True)
            try:
                await hosted.operator.teardown()
            except Exception:
                logger.exception("operator %s failed to tear down", key)
            model = str(hosted.config.parameters.get("model", hosted.config.name))
            if hosted.config.is_triton and primary._triton is not None and primary._triton.is_alive():
                with contextlib.suppress(Exception):
                    await primary._triton.unload_model(model, wait=False)
        if primary.queue is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(primary.queue.unregister(release_leases=True, operators=keys), 5)
        primary._extra = [c for c in primary._extra if c.key not in keys]
        primary._retired.difference_update(keys)
        logger.info("worker %s no longer hosts %s", primary.worker.address if primary.worker else "?", keys)

    async def retire(
        self, operators: list[str] | None = None, timeout: float | None = None, removing: bool = True
    ) -> dict[str, Any]:
        """Stop being given requests of ``operators`` (default: all here) and finish what is held.

        The ``tdask_retire`` handler, called before a worker is closed by a scale-down or an
        update, and before operators are removed from a running worker. The broker forgets this
        worker as their host at once; callers learn it within their hosts cache's second, and
        what reaches this worker meanwhile is still served. Returns once nothing of theirs is in
        flight or waits here, or after ``timeout`` seconds (default ``60``; then what is left is
        handed back at teardown, as a worker closing does). ``removing=False`` (autoscaling):
        an operator left with no host may come back, so its callers wait for one.
        """
        serving, queue = self.serving, self.queue
        if serving is None or queue is None or self.worker is None:
            return {"worker": None, "operators": [], "left": 0}
        keys = [k for k in (operators or list(serving.hosted)) if k in serving.hosted]
        self._retired.update(keys)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(queue.unregister(release_leases=False, operators=keys, removing=removing), 5)
        began = time.monotonic()
        bound = 60.0 if timeout is None else float(timeout)
        quiet_after = _HOSTS_TTL_S + 0.5  # every caller has asked the registry again since

        def held() -> int:
            return sum(serving.hosted[k].inflight + len(serving.hosted[k].waiting) for k in keys if k in serving.hosted)

        while time.monotonic() - began < bound:
            if held() == 0 and time.monotonic() - began >= quiet_after:
                break
            await asyncio.sleep(0.05)
        left = held()
        logger.info(
            "worker %s retired %s in %.1fs (%d requests left)",
            self.worker.address,
            keys,
            time.monotonic() - began,
            left,
        )
        return {"worker": self.worker.address, "operators": keys, "left": left}

    async def model_control(self, name: str, action: str) -> dict[str, Any]:
        """Load, unload or reload the Triton model of operator ``name`` hosted here (``tdask_model``).

        ``action`` is ``"load"``, ``"unload"`` or ``"reload"``. An unloaded model's operator stays
        registered and answers its requests with :class:`~tdask.exceptions.OperatorUnavailableError`
        until it is loaded again. Returns ``{"worker", "operators": {key: state}}``; the state
        also shows in the worker's stats (``/tdask/operators.json``, the dashboard, ``/metrics``).
        """
        if action not in ("load", "unload", "reload"):
            raise ValueError(f"model action must be load, unload or reload, got {action!r}")
        serving = self.serving
        assert serving is not None and self.worker is not None
        states: dict[str, str] = {}
        for key, hosted in serving.hosted.items():
            if hosted.config.name != name:
                continue
            control = getattr(hosted.operator, "model_control", None)
            if control is None:
                raise ValueError(f"operator {key} on {self.worker.address} is not a Triton model: no model control")
            hosted.state = "loading" if action != "unload" else "unloading"
            try:
                await control(action)
            except BaseException as exc:
                hosted.state = f"failed: {type(exc).__name__}: {exc}"
                raise
            hosted.state = "unloaded" if action == "unload" else "ready"
            states[key] = hosted.state
            self.worker.log_event("tdask", {"action": f"model-{action}", "operator": key})
        return {"worker": self.worker.address, "operators": states}
