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
import logging
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
from tdask.host.metrics import TritonMetrics, export_worker
from tdask.host.serving import Hosted, Serving
from tdask.operator import Operator, OperatorConfig, OperatorContext
from tdask.protocol import Rpc
from tdask.request_plane import (
    BrokerSession,
    DirectServer,
    QueueServer,
    Registry,
    RequestPlane,
    make_request_plane,
)

if TYPE_CHECKING:
    from tdask.triton import TritonServerBase

logger = logging.getLogger(__name__)

__all__ = ["PLUGIN_NAME", "OperatorHost", "WorkerEndpoint"]

PLUGIN_NAME = "tdask-operators"

# Worker states in which the plugin stops waiting to register.
_GONE = (Status.closing, Status.closed, Status.failed, Status.closing_gracefully)


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
        self._log_handler: logging.Handler | None = None
        self._triton_metrics: TritonMetrics | None = None
        self._metrics_token: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "operators": self.operators,
            "log_dir": self.log_dir,
            "log_file": self.log_file,
            "log_level": self.log_level,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.operators = state["operators"]
        self.log_dir = state["log_dir"]
        self.log_file = state.get("log_file")
        self.log_level = state.get("log_level")
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
        path = Path(self.log_dir) if self.log_dir else Path(self.worker.local_directory)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- lifecycle -------------------------------------------------------------------------

    async def setup(self, worker: Worker) -> None:
        """Build every operator; on failure, record it for callers and raise."""
        self.worker = worker
        self._start_log_file()
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
        )
        self.plane.on_orphan = self.serving.release_orphan
        worker.handlers[Rpc.HOST_STATS] = self.serving.stats
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
                repositories = sorted({c.repository for c in self.operators if c.is_triton and c.repository})
                name = str(self.worker.name).replace("/", "_")
                server = await start_server(
                    TritonOptions(model_repository=repositories, log_dir=self._log_dir(), name=name)
                )
                loop = asyncio.get_running_loop()

                def exited(returncode: int) -> None:  # may run in the server's watcher thread
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
        logger.error("restarting worker %s: %s", self.worker.address, reason)
        self.worker.log_event("tdask", {"action": "restart", "reason": reason})
        # Not in self._tasks: teardown (which this close runs) cancels those.
        self._restart = asyncio.create_task(self.worker.close(nanny=False, reason=f"tdask-restart: {reason}"))

    async def _register_and_report(self) -> None:
        """Once the worker is registered: announce operators (and failures), then report stats."""
        worker, queue, serving = self.worker, self.queue, self.serving
        assert worker is not None and queue is not None and serving is not None
        while worker.status != Status.running:
            if worker.status in _GONE:
                return
            await asyncio.sleep(0.02)
        infos = [
            {
                "key": key,
                "name": h.config.name,
                "version": h.config.version,
                "max_inflight": h.config.max_inflight_requests,
                "routing": h.config.routing,
            }
            for key, h in serving.hosted.items()
        ]
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
        """Stop taking requests, let in-flight ones finish briefly, hand back the rest, stop."""
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
        worker.handlers.pop(Rpc.HOST_STATS, None)
        if self._metrics_token is not None:
            metrics.remove_source(self._metrics_token)
            self._metrics_token = None
        if self.direct is not None:
            await self.direct.close()
        self._stop_log_file()

    def stats(self) -> dict[str, Any]:
        """In-flight accounting per operator (see :meth:`Serving.stats`)."""
        return self.serving.stats() if self.serving is not None else {}
