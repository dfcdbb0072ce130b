"""The schema of a deployment file (:mod:`tdask.deployment_file` loads and checks one): what it becomes.

Dataclasses of plain values: the cluster (:class:`ClusterSpec`, its :class:`TLSSpec`), each
operator (:class:`OperatorSpec`, its :class:`AutoscalingSpec`) and the whole
(:class:`DeploymentSpec`), which turns into a :class:`~tdask.Deployment`'s operators and keyword
arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tdask.operator import TRITON, OperatorConfig

__all__ = ["LOG_LEVELS", "PROTOCOLS", "AutoscalingSpec", "ClusterSpec", "DeploymentSpec", "OperatorSpec", "TLSSpec"]


#: The comm protocols a deployment may use.
PROTOCOLS = ("tcp", "tls", "ucxx")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(kw_only=True)
class AutoscalingSpec:
    """Bounds of an operator's autoscaling (consumed by the scaling controller).

    Attributes
    ----------
    minimum, maximum : int
        Fewest and most workers of the operator.
    target_inflight_per_worker : float
        Requests in flight per worker the controller aims at (default: the operator's
        ``max_inflight_requests``).
    up_delay, down_delay : float
        Seconds a need to grow (shrink) must last before workers are added (removed); the file
        takes numbers or durations such as ``"5s"``.
    """

    minimum: int = 1
    maximum: int = 1
    target_inflight_per_worker: float | None = None
    up_delay: float = 5.0
    down_delay: float = 60.0


@dataclass(kw_only=True)
class TLSSpec:
    """TLS files of the cluster (paths relative to the file); ``temporary`` makes a throw-away CA.

    ``cert``/``key`` serve every role; ``scheduler_cert``, ``worker_cert`` and ``client_cert``
    (with their keys) override them per role.
    """

    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    scheduler_cert: str | None = None
    scheduler_key: str | None = None
    worker_cert: str | None = None
    worker_key: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    temporary: bool = False

    def security(self) -> Any:
        """The ``distributed.Security`` these files describe."""
        from distributed.security import Security

        if self.temporary:
            return Security.temporary()
        roles = {}
        for role in ("scheduler", "worker", "client"):
            roles[f"tls_{role}_cert"] = getattr(self, f"{role}_cert") or self.cert
            roles[f"tls_{role}_key"] = getattr(self, f"{role}_key") or self.key
        return Security(tls_ca_file=self.ca_file, require_encryption=True, **roles)


@dataclass(kw_only=True)
class ClusterSpec:
    """Where and how the deployment's processes run (see the module's example)."""

    protocol: str = "tcp"
    host: str = "127.0.0.1"
    scheduler_port: int = 0
    scheduler_address: str | None = None
    dashboard_address: str | None = "127.0.0.1:8787"
    log_dir: str = "tdask-logs"
    log_level: str = "WARNING"
    startup_timeout_s: float = 180.0
    tls: TLSSpec | None = None


@dataclass(kw_only=True)
class OperatorSpec:
    """One operator of a deployment file (an entry without ``name`` is expanded per model)."""

    name: str | None = None
    implementation: str = ""
    repository: str | None = None
    version: int = 1
    workers: int = 1
    max_inflight_requests: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)
    log_level: str | None = None
    routing: str | dict[str, Any] | None = None
    execution_timeout_s: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    autoscaling: AutoscalingSpec | None = None
    #: Run on the workers of this operator (by name) instead of workers of its own.
    colocate_with: str | None = None
    #: The line of the entry in its file (0 when it came from elsewhere).
    line: int = 0

    def config(self) -> OperatorConfig:
        """The :class:`OperatorConfig` of this operator."""
        assert self.name is not None, "an entry without a name is expanded per model first"
        kwargs: dict[str, Any] = {
            "name": self.name,
            "implementation": self.implementation,
            "repository": self.repository,
            "version": self.version,
            "max_inflight_requests": self.max_inflight_requests,
            "parameters": dict(self.parameters),
            "log_level": self.log_level,
            "routing": self.routing,
        }
        if self.execution_timeout_s is not None:
            kwargs["execution_timeout_s"] = self.execution_timeout_s
        return OperatorConfig(**kwargs)


@dataclass(kw_only=True)
class DeploymentSpec:
    """A parsed, validated deployment file.

    Attributes
    ----------
    source : str
        The file it came from (or what built it, e.g. ``--model-repository DIR``).
    cluster : ClusterSpec
    operators : list of OperatorSpec
        One per operator (entries naming no model already expanded to every model).
    """

    source: str
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    operators: list[OperatorSpec] = field(default_factory=list)

    def operator_configs(self) -> list[tuple[OperatorConfig, int]]:
        """``(config, workers)`` per operator, what :class:`tdask.Deployment` takes."""
        return [(op.config(), op.workers) for op in self.operators]

    @property
    def autoscaling(self) -> dict[str, AutoscalingSpec]:
        """Autoscaling bounds by operator key (``name/version``), for those that declare them."""
        return {op.config().key: op.autoscaling for op in self.operators if op.autoscaling is not None}

    def operator_options(self) -> dict[str, dict[str, Any]]:
        """Extra worker options by operator key: the Dask ``resources`` of its workers."""
        return {op.config().key: {"resources": dict(op.resources)} for op in self.operators if op.resources}

    def deployment_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`tdask.Deployment` (everything but the operators)."""
        c = self.cluster
        security = None
        if c.protocol == "tls":
            if c.tls is not None:
                security = c.tls.security()
            else:
                from distributed.security import Security

                security = Security()  # Dask's distributed.comm.tls.* config
        return {
            "scheduler_address": c.scheduler_address,
            "scheduler_port": c.scheduler_port,
            "host": c.host,
            "protocol": c.protocol,
            "dashboard_address": c.dashboard_address,
            "security": security,
            "log_dir": c.log_dir,
            "log_level": c.log_level,
            "startup_timeout_s": c.startup_timeout_s,
            "operator_options": self.operator_options(),
            "colocate": {op.name: op.colocate_with for op in self.operators if op.colocate_with is not None},
        }

    def describe(self) -> str:
        """One line per operator: what would be started (``tdask serve --check``)."""
        workers = sum(o.workers for o in self.operators if o.colocate_with is None)
        lines = [f"{self.source}: {len(self.operators)} operators, {workers} workers"]
        for op in self.operators:
            what = f"model of {op.repository}" if op.implementation == TRITON else op.implementation
            extra = [f"max_inflight_requests={op.max_inflight_requests}"]
            if op.resources:
                extra.append(f"resources={op.resources}")
            if op.autoscaling is not None:
                a = op.autoscaling
                extra.append(f"autoscaling={a.minimum}..{a.maximum}")
            where = f"on the workers of {op.colocate_with}" if op.colocate_with is not None else f"x{op.workers}"
            lines.append(f"  {op.name}/{op.version} {where}: {what} ({', '.join(extra)})")
        return "\n".join(lines)
