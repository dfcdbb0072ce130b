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
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client, Nanny, Scheduler, SpecCluster
from distributed.core import rpc
from distributed.security import Security
from distributed.utils import LoopRunner, SyncMethodMixin, silence_logging_cmgr

from tdask.config import get_seconds
from tdask.control import answer_command, model_control
from tdask.deployment_file import DeploymentSpec, load_deployment_file
from tdask.exceptions import MainGuardError, OperatorUnavailableError
from tdask.main_guard import check_main_guard, watch_for_spawned_start
from tdask.operator import OperatorConfig
from tdask.protocol import Rpc
from tdask.request_plane.registry import _HOSTS_TTL_S
from tdask.scaling import AUTOSCALING_FIELDS, OperatorAdaptive, _index
from tdask.worker_processes import (
    OperatorSpec,
    _OperatorCluster,
    _spawn_config,
    colocated,
    nanny_options,
    root_cause,
    wait_registered,
    wait_workers,
    worker_names,
)

logger = logging.getLogger(__name__)

__all__ = ["Deployment"]

# How long a rolling update waits, once the new workers are registered, before the old ones go:
# every caller has asked the registry for hosts (and the latest version) again since.
_CALLER_CACHE_S = _HOSTS_TTL_S + 0.5


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
        "Dependencies"); on a host without a GPU, ``UCX_TLS`` defaults to ``^sm`` (UCX's
        shared-memory transports crashed them too). UCX's context outlives the deployment
        (its listeners included).
    dashboard_address
        The scheduler's dashboard (``":0"``-style; ``None`` to disable).
    security
        A ``distributed.Security`` for TLS.
    log_dir
        Where each worker writes ``<worker>.log`` and Triton its logs.
    log_level
        Level of the ``tdask`` and ``distributed`` loggers in the workers, and of what this
        process and the workers print on stderr. Default: stderr as quiet as Dask's
        ``LocalCluster`` (warnings and errors only); log files (``log_dir``) keep tdask's INFO lines.
    worker_options
        Extra keyword arguments for every worker (``memory_limit``, ``env``, ...).
    startup_timeout_s
        How long start may wait for every operator to be registered.
    scheduler_port
        The port of the scheduler this deployment starts (0: any free port).
    operator_options
        Extra worker options for the workers of one operator, by its key (``name/version``) or
        name, e.g. ``{"encoder": {"resources": {"GPU": 1}}}``.
    colocate
        Operators that run on the workers of another instead of workers of their own, by name:
        ``{"decoder": "encoder", "encoder_decoder": "encoder"}`` puts all three of the hello
        world on each encoder worker (one Triton server for both models; the orchestrator's
        calls stay in process, ``tdask.request.in-process-calls``). A guest scales, updates and
        restarts with its host's workers (scaling or updating it alone is refused).
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
        scheduler_port: int = 0,
        operator_options: dict[str, dict[str, Any]] | None = None,
        colocate: dict[str, str] | None = None,
    ) -> None:
        check_main_guard()  # a script without `if __name__ == "__main__":` would hang: say so now
        own, guests = colocated(operators, colocate)
        #: Each worker's name and the config of the operator it runs workers for.
        self.workers_spec = worker_names(own)
        #: Operators co-located on the workers of another, by that one's name.
        self.guests: dict[str, list[OperatorConfig]] = guests
        self.scheduler_address_given = scheduler_address
        self.host = host
        self.protocol = protocol
        if protocol == "ucxx":
            os.environ.setdefault("UCXPY_PROGRESS_MODE", "blocking")
            if not Path("/dev/nvidiactl").exists():
                # No GPU here: UCX's shared-memory transports (posix/sysv) crashed processes with
                # SIGSEGV on CPU hosts (docs/design.md, "Dependencies"); TCP and self carry it all.
                os.environ.setdefault("UCX_TLS", "^sm")
        self.dashboard_address = dashboard_address
        self.security = security
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_level = log_level
        #: What stderr shows, here and in the workers (LocalCluster's default: warnings).
        self.stderr_level: str | int = log_level.upper() if isinstance(log_level, str) else (log_level or "WARNING")
        self._quiet = contextlib.ExitStack()  # this process's stderr handlers, quieted while running
        self.worker_options = dict(worker_options or {})
        self.startup_timeout_s = startup_timeout_s
        self.scheduler_port = scheduler_port
        self.operator_options = {k: dict(v) for k, v in (operator_options or {}).items()}
        #: The deployment file's spec, when made by :meth:`from_file` (autoscaling bounds and all).
        self.spec: DeploymentSpec | None = None
        self._asynchronous = asynchronous
        self._loop_runner = LoopRunner(asynchronous=asynchronous)
        self.cluster: SpecCluster | None = None
        self.nannies: dict[str, Nanny] = {}
        self.client: Client | None = None
        self.status = "created"
        self._lock: asyncio.Lock | None = None
        #: Autoscaling per operator name (:meth:`adapt`).
        self.adaptive: dict[str, OperatorAdaptive] = {}
        self._scale_locks: dict[str, asyncio.Lock] = {}
        self._configs: dict[str, OperatorConfig] = {}  # the last config of each operator (scaled to 0 too)
        self._next_index: dict[str, int] = {}

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Deployment:
        """A deployment described by a deployment file (``tdask serve FILE``), not yet started.

        Parameters
        ----------
        path
            The YAML file (schema in :mod:`tdask.deployment_file`); it is validated before
            anything starts.
        **overrides
            Keyword arguments of :class:`Deployment` that replace the file's (``asynchronous``,
            ``log_dir``, ...).

        Raises
        ------
        tdask.exceptions.DeploymentFileError
            The file is invalid; the message names the file, the line and the field of every problem.
        """
        return cls.from_spec(load_deployment_file(path), **overrides)

    @classmethod
    def from_spec(cls, spec: DeploymentSpec, **overrides: Any) -> Deployment:
        """A deployment made from a parsed deployment file (:class:`tdask.deployment_file.DeploymentSpec`)."""
        deployment = cls(spec.operator_configs(), **{**spec.deployment_kwargs(), **overrides})
        deployment.spec = spec
        return deployment

    # -- properties --
    @property
    def colocate(self) -> dict[str, str]:
        """Each co-located operator's name and the name of the operator on whose workers it runs."""
        return {guest.name: host for host, configs in self.guests.items() for guest in configs}

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
            also = "".join(f", {g.key}" for g in self.guests.get(config.name, ()))
            lines.append(
                f"worker {name:<22} {by_name.get(name, '?'):<24} operator {config.key}{also} "
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
            for logger_name in ("distributed", "tdask"):
                self._quiet.enter_context(silence_logging_cmgr(self.stderr_level, root=logger_name))
            try:
                await watch_for_spawned_start(self._start_processes())  # fails fast without a main guard
                await self._wait_registered()
                if self._asynchronous:
                    self.client = await Client(self.scheduler_address, asynchronous=True, security=self.security)
            except BaseException as exc:
                await self._close()
                if isinstance(exc, (OperatorUnavailableError, MainGuardError, asyncio.CancelledError)):
                    raise
                raise RuntimeError(f"the tdask deployment failed to start: {root_cause(exc)}") from exc
            self.status = "running"
            scheduler = self.cluster.scheduler if self.cluster is not None else None
            if scheduler is not None:  # commands from `tdask scale/adapt/update` reach us here
                scheduler.handlers[Rpc.CONTROL] = self._control
            if self.spec is not None and self.cluster is not None:  # a deployment file's autoscaling
                for key, auto in self.spec.autoscaling.items():
                    self.adapt(key.rsplit("/", 1)[0], **{f: getattr(auto, f) for f in AUTOSCALING_FIELDS})
            return self

    def _worker_options(self, name: str, config: OperatorConfig) -> dict[str, Any]:
        return nanny_options(
            name,
            config,
            guests=self.guests.get(config.name, ()),
            host=self.host,
            protocol=self.protocol,
            security=self.security,
            log_dir=self.log_dir,
            log_level=self.log_level,
            stderr_level=self.stderr_level,
            extra={
                **self.worker_options,
                **self.operator_options.get(config.name, {}),
                **self.operator_options.get(config.key, {}),
            },
        )

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
                    "port": self.scheduler_port,
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
        expected: dict[str, int] = {}
        for config in self.workers_spec.values():
            for hosted in (config, *self.guests.get(config.name, ())):
                expected[hosted.key] = expected.get(hosted.key, 0) + 1
        ours = {c.name for c in self.workers_spec.values()} | set(self.colocate)
        await wait_registered(
            self.scheduler_address, self.security, expected, ours, sorted(self.workers_spec), self.startup_timeout_s
        )

    # -- operating it while it serves: scale, adapt, update, model control ------------------

    def operator_workers(self, operator: str) -> list[str]:
        """The names of the workers this deployment runs ``operator`` on (any version; a guest: its host's)."""
        operator = self.colocate.get(operator, operator)
        return [name for name, config in self.workers_spec.items() if config.name == operator]

    def _operator_config(self, operator: str) -> OperatorConfig:
        host = self.colocate.get(operator)
        if host is not None:
            raise ValueError(
                f"operator {operator!r} runs on the workers of {host!r} (colocate): scale, adapt or update {host!r}"
            )
        configs = [c for c in self.workers_spec.values() if c.name == operator]
        if configs:
            self._configs[operator] = config = max(configs, key=lambda c: c.version)
            return config
        known = self._configs.get(operator)
        if known is None:
            running = sorted({c.name for c in self.workers_spec.values()})
            raise OperatorUnavailableError(
                f"this deployment runs no operator {operator!r}; it runs {running}", operator=operator
            )
        return known

    def scale(self, operator: str, n: int) -> Any:
        """Run ``n`` workers of ``operator``; returns their names (a coroutine when asynchronous).

        New workers are ready (their operator registered) when this returns. Workers that go
        are drained first: they stop being given requests, finish what they hold, then close
        (nothing is lost or failed). Stops the operator's autoscaling, if any (as a Dask
        cluster's ``scale`` after ``adapt``).
        """
        return self.sync(self._scale, operator, n)

    async def _scale(self, operator: str, n: int, *, adaptive: bool = False) -> list[str]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"operator {operator!r}: the number of workers must be an int >= 0, got {n!r}")
        if self.status != "running":
            raise RuntimeError(f"the deployment is {self.status}, not running")
        config = self._operator_config(operator)
        if not adaptive and operator in self.adaptive:
            self.adaptive.pop(operator).stop(reason="tdask-scale")
        async with self._scale_lock(operator):
            names = sorted(self.operator_workers(operator), key=_index)
            if n > len(names):
                await self._add_workers(config, n - len(names))
            elif n < len(names):
                await self._remove_workers(names[n:])
        return sorted(self.operator_workers(operator), key=_index)

    def _scale_lock(self, operator: str) -> asyncio.Lock:
        return self._scale_locks.setdefault(operator, asyncio.Lock())

    async def _add_workers(self, config: OperatorConfig, count: int) -> list[str]:
        """Start ``count`` more workers of ``config``; return once each has registered it."""
        self._configs[config.name] = config
        names = []
        for _ in range(count):
            i = self._next_index.get(config.name, 0)
            i = max([i, *(_index(n) + 1 for n in self.operator_workers(config.name))])
            self._next_index[config.name] = i + 1
            name = f"{config.name}.{i}" if config.version == 1 else f"{config.name}.v{config.version}.{i}"
            self.workers_spec[name] = config
            names.append(name)
        try:
            with dask.config.set(_spawn_config()):
                if self.cluster is not None:
                    for name in names:
                        self.cluster.worker_spec[name] = {"cls": Nanny, "options": self._worker_options(name, config)}
                    await self.cluster._correct_state()
                else:
                    nannies = {
                        name: Nanny(self.scheduler_address, **self._worker_options(name, config)) for name in names
                    }
                    self.nannies.update(nannies)
                    await asyncio.gather(*(nanny.start() for nanny in nannies.values()))
            await wait_workers(self.scheduler_address, self.security, config.key, names, self.startup_timeout_s)
        except BaseException as exc:
            logger.error("starting workers %s of %s failed: %s", names, config.key, root_cause(exc))
            await self._close_workers(names)
            raise
        logger.info("operator %s: started workers %s", config.key, names)
        return names

    async def _remove_workers(self, names: list[str], *, retire_timeout_s: float = 60.0, removing: bool = True) -> None:
        """Drain these workers (they finish what they hold, callers move elsewhere), then close them."""
        addresses = await self._addresses()
        connection_args = (self.security or Security()).get_connection_args("client")

        async def retire(name: str) -> None:
            address = addresses.get(name)
            if address is None:
                return
            worker = rpc(address, connection_args=connection_args)
            try:
                result = await getattr(worker, Rpc.RETIRE)(timeout=retire_timeout_s, removing=removing)
                logger.info("worker %s drained: %s", name, result)
            except Exception as exc:  # gone already: the broker and callers handle a lost worker
                logger.warning("worker %s could not be drained (%s); closing it", name, exc)
            finally:
                await worker.close_rpc()

        await asyncio.gather(*(retire(name) for name in names))
        await self._close_workers(names)

    async def _close_workers(self, names: list[str]) -> None:
        for name in names:
            self.workers_spec.pop(name, None)
        if self.cluster is not None:
            for name in names:
                self.cluster.worker_spec.pop(name, None)
            await self.cluster._correct_state()
        else:
            nannies = [self.nannies.pop(name) for name in names if name in self.nannies]
            await asyncio.gather(*(n.close(reason="tdask-scale-down") for n in nannies), return_exceptions=True)

    async def _addresses(self) -> dict[str, str]:
        """Worker name -> address, as the scheduler knows them now."""
        connection_args = (self.security or Security()).get_connection_args("client")
        scheduler = rpc(self.scheduler_address, connection_args=connection_args)
        try:
            info = await scheduler.identity(n_workers=-1)
        finally:
            await scheduler.close_rpc()
        return {str(w["name"]): address for address, w in info["workers"].items()}

    def adapt(
        self,
        operator: str,
        *,
        minimum: int = 1,
        maximum: int = 4,
        target_inflight_per_worker: float | None = None,
        up_delay: float = 2.0,
        down_delay: float = 30.0,
        interval: float = 1.0,
    ) -> OperatorAdaptive:
        """Autoscale ``operator`` between ``minimum`` and ``maximum`` workers (Dask's ``Adaptive``).

        Sized for ``target_inflight_per_worker`` requests in flight or waiting per worker (the
        scheduler's view; default: the operator's ``max_inflight_requests``); grows once that
        has held ``up_delay`` seconds, shrinks (draining) once it has held ``down_delay``
        seconds. Replaces the operator's earlier autoscaling; the same names as a deployment
        file's ``autoscaling:`` block (:data:`tdask.scaling.AUTOSCALING_FIELDS`). Returns the
        :class:`tdask.scaling.OperatorAdaptive` (``.stop()`` ends it).
        """
        config = self._operator_config(operator)  # an operator this deployment runs
        if target_inflight_per_worker is None:
            target_inflight_per_worker = float(config.max_inflight_requests)
        old = self.adaptive.pop(operator, None)
        if old is not None:
            old.stop(reason="tdask-adapt-replaced")
        adaptive = OperatorAdaptive(
            self,
            operator,
            minimum=minimum,
            maximum=maximum,
            target_inflight_per_worker=target_inflight_per_worker,
            up_delay=up_delay,
            down_delay=down_delay,
            interval=interval,
        )
        self.adaptive[operator] = adaptive
        return adaptive

    def update(self, operator: str, new_config: OperatorConfig | dict[str, Any]) -> Any:
        """Replace ``operator``'s workers by workers of ``new_config``, under traffic (rolling).

        As many new workers as there are now start and register; once callers have seen them
        (a second), the old ones are drained (they finish what they hold; callers move to the
        new ones) and closed. ``new_config``: an :class:`OperatorConfig` of the same name, or a
        dict of the fields to change (``{"version": 2, "parameters": {...}}``). Callers that
        name no version follow to a new version; callers that pin the old one lose it. Returns
        the new workers' names (a coroutine when asynchronous).
        """
        return self.sync(self._update, operator, new_config)

    async def _update(self, operator: str, new_config: OperatorConfig | dict[str, Any]) -> list[str]:
        if self.status != "running":
            raise RuntimeError(f"the deployment is {self.status}, not running")
        current = self._operator_config(operator)
        if isinstance(new_config, dict):
            fields = {f: getattr(current, f) for f in current.__dataclass_fields__}
            unknown = set(new_config) - set(fields)
            if unknown:
                raise ValueError(f"operator {operator!r}: no such OperatorConfig fields {sorted(unknown)}")
            new_config = OperatorConfig(**{**fields, **new_config})
        if new_config.name != operator:
            raise ValueError(f"update of {operator!r} with a config named {new_config.name!r}")
        async with self._scale_lock(operator):
            old = sorted(self.operator_workers(operator), key=_index)
            new = await self._add_workers(new_config, max(1, len(old)))
            # Every caller's cache of hosts (and of the latest version) has turned over.
            await asyncio.sleep(_CALLER_CACHE_S)
            await self._remove_workers(old)
        logger.info("operator %s updated to %s: workers %s replaced %s", operator, new_config.key, new, old)
        return new

    def update_from_file(self, path: str | Path) -> Any:
        """Bring the running deployment to what the deployment file ``path`` says, operator by operator.

        An operator whose config changed is replaced by a rolling update (:meth:`update`); a new
        one is started; then each gets the file's number of workers, or its autoscaling. Operators
        the file does not list are left as they are. Returns ``{operator: its workers' names}``.
        """
        return self.sync(self._update_file, str(path))

    async def _update_file(self, path: str) -> dict[str, list[str]]:
        spec = load_deployment_file(path)  # validated before anything changes
        colocate = spec.deployment_kwargs()["colocate"]
        guests = {g.key: g for configs in self.guests.values() for g in configs}
        if colocate != self.colocate or any(
            guests.get(c.key) != c for c, _ in spec.operator_configs() if c.name in colocate
        ):
            raise ValueError(
                f"{path}: co-located operators (colocate_with) or their configs differ from the running "
                f"deployment's ({self.colocate}); they change only with a new deployment"
            )
        done: dict[str, list[str]] = {}
        autoscaling = spec.autoscaling
        for config, count in spec.operator_configs():
            if config.name in colocate:
                continue  # rides with its host's workers
            running = [c for c in self.workers_spec.values() if c.name == config.name]
            if not running:
                async with self._scale_lock(config.name):
                    await self._add_workers(config, count)
            elif any(c != config for c in running):
                await self._update(config.name, config)
            auto = autoscaling.get(config.key)
            if auto is not None:
                self.adapt(config.name, **{f: getattr(auto, f) for f in AUTOSCALING_FIELDS})
            elif len(self.operator_workers(config.name)) != count:
                await self._scale(config.name, count)
            done[config.name] = sorted(self.operator_workers(config.name), key=_index)
        if self.spec is not None:
            self.spec = spec
        return done

    def load_model(self, operator: str) -> Any:
        """Load ``operator``'s Triton model on the workers hosting it (see :func:`tdask.control.model_control`)."""
        return self.sync(self._model, operator, "load")

    def unload_model(self, operator: str) -> Any:
        """Unload ``operator``'s Triton model on its workers; its requests fail until it is loaded."""
        return self.sync(self._model, operator, "unload")

    def reload_model(self, operator: str) -> Any:
        """Reload ``operator``'s Triton model on its workers (a changed repository takes effect)."""
        return self.sync(self._model, operator, "reload")

    async def _model(self, operator: str, action: str) -> dict[str, Any]:
        connection_args = (self.security or Security()).get_connection_args("client")
        return await model_control(self.scheduler_address, operator, action, connection_args=connection_args)

    async def _control(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The scheduler's ``tdask_control`` handler (:func:`tdask.control.answer_command`)."""
        return await answer_command(self, command, arguments)

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
        for adaptive in self.adaptive.values():
            adaptive.stop(reason="tdask-deployment-close")
        self.adaptive.clear()
        if self.client is not None:
            if self.client.asynchronous:
                await self.client.close()
            self.client = None
        # Time for each worker to drain (tdask.worker.drain-timeout) and stop its Triton server:
        # a Nanny closed with Dask's default (5 s) kills its worker after 4 s, mid-drain.
        close_s = (get_seconds("tdask.worker.drain-timeout") or 0.0) + 20.0
        if self.nannies:
            await asyncio.gather(
                *(n.close(timeout=close_s, reason="tdask-deployment-close") for n in self.nannies.values()),
                return_exceptions=True,
            )
            self.nannies.clear()
        if self.cluster is not None:
            # The workers first, with that time; SpecCluster's close then finds them closed.
            await asyncio.gather(
                *(
                    n.close(timeout=close_s, reason="tdask-deployment-close")
                    for n in list(self.cluster.workers.values())
                    if isinstance(n, Nanny)
                ),
                return_exceptions=True,
            )
            closing = self.cluster.close()  # an awaitable: the cluster is asynchronous
            assert closing is not None
            await closing
            self.cluster = None
        self.status = "closed"
        self._quiet.close()

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


async def _done() -> None:
    return None
