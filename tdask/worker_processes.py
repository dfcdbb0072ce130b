"""How the processes a :class:`~tdask.deployment.Deployment` starts are made.

Each operator instance is a worker process (a ``Nanny``) named from its operator
(:func:`worker_names`); operators co-located with another run on that one's workers
(:func:`colocated`). Their Dask config (:data:`_WORKER_CONFIG`, the health tick, the event
loop of :func:`worker_event_loop`) and the nannies' pre-spawn environment (the workers' malloc,
:func:`_spawn_config`) are tdask's choices where the user left Dask's defaults, each measured in
docs/performance.md; :class:`_OperatorCluster` is the SpecCluster that waits for a restarting
worker instead of closing its Nanny.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import SpecCluster
from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster
from distributed.security import Security

from tdask.exceptions import OperatorUnavailableError
from tdask.host import OperatorHost
from tdask.operator import OperatorConfig
from tdask.protocol import Rpc
from tdask.request_plane.registry import Registry

__all__ = ["OperatorSpec", "nanny_options", "root_cause", "worker_event_loop", "worker_names"]

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


def colocated(
    operators: Sequence[OperatorSpec], colocate: Mapping[str, str] | None
) -> tuple[list[OperatorSpec], dict[str, list[OperatorConfig]]]:
    """Split ``operators`` into those with workers of their own and the guests of each (by host name).

    ``colocate`` maps a guest operator's name to its host's: every worker of the host runs the
    guest too. Raises ``ValueError`` for a guest or host that is not among ``operators``, a guest
    hosting others, or a guest given a worker count.
    """
    colocate = dict(colocate or {})
    by_name: dict[str, tuple[OperatorConfig, int]] = {}
    for item in operators:
        config, count = item if isinstance(item, tuple) else (item, 1)
        if isinstance(config, OperatorConfig):
            by_name.setdefault(config.name, (config, count))
    own: list[OperatorSpec] = []
    guests: dict[str, list[OperatorConfig]] = {}
    for guest, host in colocate.items():
        if guest not in by_name:
            raise ValueError(f"colocate: {guest!r} is not an operator of this deployment ({sorted(by_name)})")
        if host not in by_name or host in colocate:
            raise ValueError(
                f"colocate: {guest!r} is to run on the workers of {host!r}, which is not an operator of this "
                "deployment with workers of its own"
            )
        if by_name[guest][1] != 1:
            raise ValueError(
                f"colocate: {guest!r} runs on every worker of {host!r}; it takes no worker count of its own "
                f"(got {by_name[guest][1]}): scale {host!r}"
            )
    for item in operators:
        config = item[0] if isinstance(item, tuple) else item
        guest_of = colocate.get(config.name) if isinstance(config, OperatorConfig) else None
        if guest_of is None:
            own.append(item)
        else:
            guests.setdefault(guest_of, []).append(config)
    return own, guests


def worker_names(operators: Sequence[OperatorSpec]) -> dict[str, OperatorConfig]:
    """Each worker's name (``<operator>.<i>``, ``<operator>.v<version>.<i>``) and its operator's config.

    Raises ``ValueError`` or ``TypeError`` for an empty list, a bad count or an operator listed twice.
    """
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


def root_cause(exc: BaseException) -> str:
    """The innermost message of an exception chain (Nanny wraps the worker's real error twice)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc)


def nanny_options(
    name: str,
    config: OperatorConfig,
    *,
    guests: Sequence[OperatorConfig] = (),
    host: str | None,
    protocol: str | None,
    security: Any,
    log_dir: Path | None,
    log_level: str | int | None,
    stderr_level: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The ``Nanny`` options of worker ``name`` hosting ``config``'s operator (and ``guests``, co-located with it).

    One thread, no dashboard, the operator host as its plugin (logging to ``<log_dir>/<name>.log``),
    and the workers' Dask config: :data:`_WORKER_CONFIG`, the tick, the event loop; ``extra`` (the
    user's ``worker_options`` and per-operator options) wins, its ``config`` merged last.
    """
    log_file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = str(log_dir / f"{name}.log")
    options: dict[str, Any] = {
        "name": name,
        "nthreads": 1,
        "host": host,
        "protocol": protocol,
        "security": security,
        "dashboard_address": None,
        "plugins": {
            OperatorHost(
                [config, *guests], log_dir=log_dir, log_file=log_file, log_level=log_level, stderr_level=stderr_level
            )
        },
        "silence_logs": stderr_level,  # the worker process's distributed logger, as LocalCluster's
        "death_timeout": 60,
    }
    extra = dict(extra)
    # Operators do not run as Dask tasks, so the worker's statistical task profiler (100
    # wake-ups a second) would sample nothing; a user's worker config still wins.
    loop = {"distributed.admin.event-loop": worker_event_loop()}
    options["config"] = {**_WORKER_CONFIG, **_tick_config(), **loop, **(extra.pop("config", None) or {})}
    options.update(extra)
    return options


# -- waiting for the workers' operators to be registered --------------------------------------


@contextlib.asynccontextmanager
async def _registry(scheduler_address: str, security: Any) -> AsyncIterator[Registry]:
    """The scheduler's registry, over an RPC closed on leaving."""
    connection_args = (security or Security()).get_connection_args("client")
    scheduler = rpc(scheduler_address, connection_args=connection_args)
    try:
        yield Registry(scheduler)
    finally:
        await scheduler.close_rpc()


async def wait_registered(
    scheduler_address: str,
    security: Any,
    expected: dict[str, int],
    operators: set[str],
    workers: list[str],
    timeout_s: float,
) -> None:
    """Wait until the scheduler's registry lists ``expected`` hosts of each operator key.

    Raises :class:`~tdask.exceptions.OperatorUnavailableError` as soon as one of ``operators``
    (names) failed to start on a worker, or after ``timeout_s``.
    """
    async with _registry(scheduler_address, security) as registry:
        deadline = time.monotonic() + timeout_s
        while True:
            state = await registry.operators()
            hosts = state["hosts"]
            if all(len(hosts.get(k, [])) >= n for k, n in expected.items()):
                return
            failures = {k: v for k, v in state["failures"].items() if k in operators}
            if failures:
                raise OperatorUnavailableError(f"operators failed to start: {failures}")
            if time.monotonic() > deadline:
                raise OperatorUnavailableError(
                    f"operators not registered within {timeout_s:.0f}s: expected {expected}, "
                    f"registered {hosts} (workers {workers})"
                )
            await asyncio.sleep(0.05)


async def wait_workers(scheduler_address: str, security: Any, key: str, names: list[str], timeout_s: float) -> None:
    """Wait until every worker in ``names`` hosts operator ``key`` (their setup failures raise)."""
    async with _registry(scheduler_address, security) as registry:
        deadline = time.monotonic() + timeout_s
        while True:
            answer = await registry._broker_call(Rpc.HOSTS, operator=key, routing=True)
            if all(name in answer["names"] for name in names):
                return
            state = await registry.operators()
            failed = {w: m for w, m in state["failures"].get(key.rsplit("/", 1)[0], {}).items()}
            if failed:
                raise OperatorUnavailableError(f"operator {key} failed to start: {failed}")
            if time.monotonic() > deadline:
                raise OperatorUnavailableError(f"workers {names} did not register {key} within {timeout_s:.0f}s")
            await asyncio.sleep(0.05)
