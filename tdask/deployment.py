"""Deployment: start (or join) a Dask cluster and place operators on its workers.

Locally, a :class:`distributed.SpecCluster` owns the scheduler and one worker process (a
``Nanny``) per operator instance, named ``<operator>.<i>``, all bound to 127.0.0.1 by default;
SpecCluster then owns start, close and the atexit hook. With ``scheduler_address`` the
deployment starts only its worker processes and joins a running scheduler, leaving the
scheduler up when it closes. Either way, start returns only once every operator is registered
with the request plane, and a broken operator makes start raise instead of leaving a half-up
deployment.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, Nanny, Scheduler, SpecCluster
from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster
from distributed.security import Security
from distributed.utils import LoopRunner, SyncMethodMixin

from tdask.exceptions import OperatorUnavailableError
from tdask.host import OperatorHost
from tdask.operator import OperatorConfig
from tdask.request_plane import Registry

logger = logging.getLogger(__name__)

__all__ = ["Deployment"]

OperatorSpec = OperatorConfig | tuple[OperatorConfig, int]

# Dotted keys: the Nanny merges this shallowly over its own config and the worker applies it
# with dask.config.set, so a nested {"distributed": ...} would replace the whole subtree.
_WORKER_CONFIG: dict[str, Any] = {"distributed.worker.profile.enabled": False}

# Dask's event-loop health tick: 50 wake-ups a second in every server (scheduler, each nanny,
# each worker) by default. Only measures how late the loop runs (a warning past
# distributed.admin.tick.limit, 3 s), so a tenth of a second loses nothing; at 20 ms, an idle
# deployment of three workers spent 8% of a core on it and its other chores, at 100 ms 4%
# (docs/performance.md). Applied where the user left Dask's default.
_TICK_DEFAULT, _TICK = "20ms", "100ms"


def _tick_config() -> dict[str, Any]:
    if dask.config.get("distributed.admin.tick.interval") != _TICK_DEFAULT:
        return {}
    return {"distributed.admin.tick.interval": _TICK}


# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536 (memory back to the OS at once). Setting
# it also switches off glibc's adaptive mmap threshold, so every buffer above 128 KiB is a fresh
# mmap, page-faulted in and unmapped when freed: per tensor, several times per request. A serving
# worker reuses same-sized buffers request after request; tdask.worker.malloc keeps them in the
# heap (docs/performance.md: the 1e5 pipeline's p50 12.3-12.9 -> 9.3-9.7 ms).
_DASK_TRIM_DEFAULT = 65536


def _spawn_config() -> dict[str, Any]:
    """Config for making the scheduler and the nannies: the tick, and the workers' malloc settings."""
    config = _tick_config()
    wanted = dask.config.get("tdask.worker.malloc", None) or {}
    current = dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
    changed = {}
    for key, value in wanted.items():
        key = str(key).upper()  # DASK_TDASK__WORKER__MALLOC__... variables arrive lowercased
        if key not in current or (key == "MALLOC_TRIM_THRESHOLD_" and current[key] == _DASK_TRIM_DEFAULT):
            changed[key] = value  # where the user left Dask's default
    if changed:
        config["distributed.nanny.pre-spawn-environ"] = {**current, **changed}
    return config


def worker_event_loop() -> str:
    """The ``distributed.admin.event-loop`` value for the workers a Deployment starts.

    ``tdask.worker.event-loop``: ``auto`` is ``uvloop`` where uvloop is installed, else
    ``distributed.admin.event-loop``; any other value is passed on as it is (Dask checks it).
    """
    choice = str(dask.config.get("tdask.worker.event-loop", "auto"))
    if choice != "auto":
        return choice
    if importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    return str(dask.config.get("distributed.admin.event-loop"))


class _OperatorCluster(SpecCluster):
    """A SpecCluster that gives up on a lost worker only once its Nanny has given up.

    SpecCluster closes a worker's Nanny for good when no worker of that name is back
    ``distributed.deploy.lost-worker-timeout`` (15 s) after one was removed. tdask workers
    restart themselves (a dead Triton server or stub, a lost scheduler) and a restart with
    Triton takes seconds: the timer of an earlier removal could fire while a later restart was
    under way, and the Nanny, with the fresh worker it had just started, was closed (the soak
    lost two of six workers that way). Here the Nanny is closed only if it is no longer running.
    """

    def _update_worker_status(self, op: str, msg: Any) -> None:
        if op == "remove":
            name = self.scheduler_info["workers"][msg]["name"]

            def give_up() -> None:
                nanny = self.workers.get(name)
                back = any(d["name"] == name for d in self.scheduler_info["workers"].values())
                if nanny is not None and not back and getattr(nanny, "status", None) not in _RUNNING:
                    self._futures.add(asyncio.ensure_future(nanny.close()))
                    del self.workers[name]

            delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay, give_up)
        Cluster._update_worker_status(self, op, msg)  # what SpecCluster's own does besides


_RUNNING = (Status.init, Status.starting, Status.running)


class Deployment(SyncMethodMixin):
    """A set of operators running on Dask workers; a context manager, sync or async.

    Parameters
    ----------
    operators
        Each an :class:`OperatorConfig` (one worker) or ``(config, n)`` for ``n`` workers.
    scheduler_address
        Join this running scheduler instead of starting one.
    host
        Address every process binds (default 127.0.0.1; set it to serve other machines).
    protocol
        ``"tcp"``, ``"tls"`` or ``"ucxx"`` (with distributed-ucxx installed). With ``"ucxx"``,
        ``UCXPY_PROGRESS_MODE`` defaults to ``blocking`` in this process and its workers: UCX
        contexts in ucxx's ``thread`` mode crashed processes with SIGSEGV (docs/design.md,
        "Dependencies"). UCX's context outlives the deployment (its listeners included).
    dashboard_address
        The scheduler's dashboard (``":0"``-style; ``None`` to disable).
    security
        A ``distributed.Security`` for TLS.
    log_dir
        Where each worker writes ``<worker>.log`` and Triton its logs.
    log_level
        Level of the ``tdask`` and ``distributed`` loggers in the workers.
    worker_options
        Extra keyword arguments for every worker (``memory_limit``, ``env``, ...).
    startup_timeout_s
        How long start may wait for every operator to be registered.
    """

    def __init__(
        self,
        operators: Sequence[OperatorSpec],
        *,
        scheduler_address: str | None = None,
        host: str = "127.0.0.1",
        protocol: str = "tcp",
        dashboard_address: str | None = "127.0.0.1:0",
        security: Security | None = None,
        log_dir: str | Path | None = None,
        log_level: str | int | None = None,
        worker_options: dict[str, Any] | None = None,
        startup_timeout_s: float = 180.0,
        asynchronous: bool = False,
    ) -> None:
        self.workers_spec = self._worker_specs(operators)
        self.scheduler_address_given = scheduler_address
        self.host = host
        self.protocol = protocol
        if protocol == "ucxx":
            os.environ.setdefault("UCXPY_PROGRESS_MODE", "blocking")
        self.dashboard_address = dashboard_address
        self.security = security
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_level = log_level
        self.worker_options = dict(worker_options or {})
        self.startup_timeout_s = startup_timeout_s
        self._asynchronous = asynchronous
        self._loop_runner = LoopRunner(asynchronous=asynchronous)
        self.cluster: SpecCluster | None = None
        self.nannies: dict[str, Nanny] = {}
        self.client: Client | None = None
        self.status = "created"
        self._lock: asyncio.Lock | None = None

    @staticmethod
    def _worker_specs(operators: Sequence[OperatorSpec]) -> dict[str, OperatorConfig]:
        specs: dict[str, OperatorConfig] = {}
        if not operators:
            raise ValueError("a Deployment needs at least one operator")
        for item in operators:
            config, count = item if isinstance(item, tuple) else (item, 1)
            if not isinstance(config, OperatorConfig):
                raise TypeError(f"expected OperatorConfig or (OperatorConfig, count), got {item!r}")
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"operator {config.name!r}: instance count must be an int >= 1, got {count!r}")
            for i in range(count):
                name = f"{config.name}.{i}" if config.version == 1 else f"{config.name}.v{config.version}.{i}"
                if name in specs:
                    raise ValueError(f"operator {config.key} listed twice")
                specs[name] = config
        return specs

    # -- properties --
    @property
    def loop(self) -> Any:
        """The event loop the deployment runs on."""
        return self._loop_runner.loop

    @property
    def scheduler_address(self) -> str:
        """The scheduler's address (started here, or the one joined)."""
        if self.cluster is not None:
            return self.cluster.scheduler_address
        if self.scheduler_address_given is None:
            raise RuntimeError("the deployment is not started")
        return self.scheduler_address_given

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL, when the deployment started a scheduler with one."""
        if self.cluster is not None and self.dashboard_address is not None:
            try:
                return self.cluster.dashboard_link
            except Exception:
                return None
        return None

    def worker_addresses(self) -> dict[str, str]:
        """Worker name -> address, as the scheduler knows them now."""
        if self.client is None:
            raise RuntimeError("the deployment is not started")
        info = self.client.scheduler_info(n_workers=-1)["workers"] if not self.client.asynchronous else None
        if info is None:
            raise RuntimeError("use `await deployment.client.scheduler_info()` in async code")
        return {str(w["name"]): addr for addr, w in info.items()}

    def describe(self) -> str:
        """A few lines telling where everything runs (for CLIs)."""
        lines = [f"scheduler: {self.scheduler_address}"]
        if self.dashboard_link:
            base = self.dashboard_link.rsplit("/status", 1)[0]
            lines.append(f"dashboard: {self.dashboard_link}")
            lines.append(f"tdask page: {base}/tdask (live: rates, latency, errors, queues, in flight per worker)")
            lines.append(f"metrics: {base}/metrics (Prometheus, whole cluster; every worker serves its own /metrics)")
        by_name = self.worker_addresses()
        for name, config in self.workers_spec.items():
            lines.append(
                f"worker {name:<22} {by_name.get(name, '?'):<24} operator {config.key} "
                f"(max_inflight_requests={config.max_inflight_requests})"
            )
        return "\n".join(lines)

    # -- lifecycle --
    def start(self) -> Any:
        """Start everything (a coroutine when asynchronous); ``client`` is then connected."""
        if self.asynchronous:
            return self._start()
        self._loop_runner.start()
        self.sync(self._start)
        self.client = Client(self.scheduler_address, loop=self.loop, security=self.security)
        return self

    async def _start(self) -> Deployment:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.status == "running":
                return self
            if self.status != "created":
                raise RuntimeError(f"a Deployment cannot be started again once {self.status}")
            self.status = "starting"
            try:
                await self._start_processes()
                await self._wait_registered()
                if self._asynchronous:
                    self.client = await Client(self.scheduler_address, asynchronous=True, security=self.security)
            except BaseException as exc:
                await self._close()
                if isinstance(exc, (OperatorUnavailableError, asyncio.CancelledError)):
                    raise
                raise RuntimeError(f"the tdask deployment failed to start: {_root_cause(exc)}") from exc
            self.status = "running"
            return self

    def _worker_options(self, name: str, config: OperatorConfig) -> dict[str, Any]:
        options: dict[str, Any] = {
            "name": name,
            "nthreads": 1,
            "host": self.host,
            "protocol": self.protocol,
            "security": self.security,
            "dashboard_address": None,
            "plugins": {
                OperatorHost([config], log_dir=self.log_dir, log_file=self._log_file(name), log_level=self.log_level)
            },
            "death_timeout": 60,
        }
        extra = dict(self.worker_options)
        # Operators do not run as Dask tasks, so the worker's statistical task profiler (100
        # wake-ups a second) would sample nothing; a user's worker config still wins.
        loop = {"distributed.admin.event-loop": worker_event_loop()}
        options["config"] = {**_WORKER_CONFIG, **_tick_config(), **loop, **(extra.pop("config", None) or {})}
        options.update(extra)
        return options

    def _log_file(self, name: str) -> str | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return str(self.log_dir / f"{name}.log")

    async def _start_processes(self) -> None:
        specs: dict[str, dict[str, Any]] = {
            name: {"cls": Nanny, "options": self._worker_options(name, config)}
            for name, config in self.workers_spec.items()
        }
        if self.scheduler_address_given is None:
            scheduler = {
                "cls": Scheduler,
                "options": {
                    "host": self.host,
                    "port": 0,
                    "protocol": self.protocol,
                    "security": self.security,
                    # Without an address, distributed would bind its HTTP server (health,
                    # metrics) to 0.0.0.0:8787; keep it on our host even with no dashboard.
                    "dashboard_address": self.dashboard_address or f"{self.host}:0",
                    "dashboard": self.dashboard_address is not None,
                },
            }
            # Keep the object before awaiting it, so a failed start still gets closed by us
            # (not by distributed's atexit hook, after logging has been torn down).
            self.cluster = _OperatorCluster(
                workers=specs,
                scheduler=scheduler,
                asynchronous=True,
                security=self.security,
                name="tdask",
            )
            with dask.config.set(_spawn_config()):  # read by the scheduler and nannies as they are made
                await self.cluster
            return
        with dask.config.set(_spawn_config()):
            for name, spec in specs.items():
                nanny = Nanny(self.scheduler_address_given, **spec["options"])
                self.nannies[name] = nanny
        await asyncio.gather(*(n.start() for n in self.nannies.values()))

    async def _wait_registered(self) -> None:
        connection_args = (self.security or Security()).get_connection_args("client")
        scheduler = rpc(self.scheduler_address, connection_args=connection_args)
        try:
            await self._poll_registry(Registry(scheduler))
        finally:
            await scheduler.close_rpc()

    async def _poll_registry(self, registry: Registry) -> None:
        expected: dict[str, int] = {}
        for config in self.workers_spec.values():
            expected[config.key] = expected.get(config.key, 0) + 1
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            state = await registry.operators()
            names = set(self.workers_spec)
            hosts = state["hosts"]
            if all(len(hosts.get(k, [])) >= n for k, n in expected.items()):
                return
            failures = {
                k: v for k, v in state["failures"].items() if any(c.name == k for c in self.workers_spec.values())
            }
            if failures:
                raise OperatorUnavailableError(f"operators failed to start: {failures}")
            if time.monotonic() > deadline:
                raise OperatorUnavailableError(
                    f"operators not registered within {self.startup_timeout_s:.0f}s: expected {expected}, "
                    f"registered {hosts} (workers {sorted(names)})"
                )
            await asyncio.sleep(0.05)

    def close(self) -> Any:
        """Stop everything this deployment started (safe to call twice)."""
        if self.status in ("created", "closed"):
            self.status = "closed"
            return None if not self.asynchronous else _done()
        if self.asynchronous:
            return self._close()
        if self.client is not None:
            self.client.close()
            self.client = None
        self.sync(self._close)
        self._loop_runner.stop()
        return None

    async def _close(self) -> None:
        if self.status == "closed":
            return
        self.status = "closing"
        if self.client is not None:
            if self.client.asynchronous:
                await self.client.close()
            self.client = None
        if self.nannies:
            await asyncio.gather(
                *(n.close(reason="tdask-deployment-close") for n in self.nannies.values()),
                return_exceptions=True,
            )
            self.nannies.clear()
        if self.cluster is not None:
            closing = self.cluster.close()  # an awaitable: the cluster is asynchronous
            assert closing is not None
            await closing
            self.cluster = None
        self.status = "closed"

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    async def __aenter__(self) -> Deployment:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._close()

    def __await__(self) -> Any:
        return self._start().__await__()


def _root_cause(exc: BaseException) -> str:
    """The innermost message of an exception chain (Nanny wraps the worker's real error twice)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc)


async def _done() -> None:
    return None
