"""Autoscaling one operator on Dask's own adaptive machinery: :class:`OperatorAdaptive`.

A :class:`distributed.deploy.Adaptive` per operator, as ``cluster.adapt()`` makes one per
cluster: Dask's periodic loop asks :meth:`~OperatorAdaptive.target` how many workers the operator
should have, :meth:`~distributed.deploy.adaptive_core.AdaptiveCore.recommendations` compares it
with the workers planned, and :meth:`~OperatorAdaptive.scale_up` /
:meth:`~OperatorAdaptive.scale_down` act through the :class:`tdask.Deployment` (whose workers are
a SpecCluster's, one spec per ``<operator>.<i>``, the operator's *worker group*).

What tdask changes:

- **the target** is the load the scheduler's registry sees: the requests in flight and waiting
  on the operator's workers (each worker reports them every ``tdask.worker.report-interval``),
  plus those queued for it at the broker, divided by ``target_inflight_per_worker``;
- **hysteresis** by time rather than by count: the operator grows once the target has been
  above its size for ``up_delay`` seconds and shrinks once it has been below for
  ``down_delay`` (Dask's ``wait_count`` is then 1);
- **which workers close** (:meth:`~OperatorAdaptive.workers_to_close`): the operator's own, the
  least busy first, newest first among equals; and **how** (:meth:`~OperatorAdaptive.scale_down`):
  drained, never retired mid-request (:meth:`tdask.Deployment.scale`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from distributed.deploy import Adaptive

from tdask.request_plane.registry import Registry

if TYPE_CHECKING:
    from tdask.deployment import Deployment

logger = logging.getLogger(__name__)

__all__ = ["AUTOSCALING_FIELDS", "OperatorAdaptive"]

#: The keyword names of :meth:`tdask.Deployment.adapt` (and of a deployment file's ``autoscaling:``).
AUTOSCALING_FIELDS = ("minimum", "maximum", "target_inflight_per_worker", "up_delay", "down_delay")


class OperatorAdaptive(Adaptive):
    """Adaptive scaling of one operator's workers in a :class:`tdask.Deployment`.

    Parameters
    ----------
    deployment
        The running deployment (it owns its scheduler: a SpecCluster).
    operator
        The operator's name.
    minimum, maximum
        Bounds on its number of workers.
    target_inflight_per_worker
        Requests in flight (running or waiting for a slot) per worker the operator is sized for.
    up_delay, down_delay
        Seconds the target must stay above (below) the current size before workers are added
        (removed).
    interval
        Seconds between two looks (Dask's ``interval``).
    """

    def __init__(
        self,
        deployment: Deployment,
        operator: str,
        *,
        minimum: int = 1,
        maximum: int = 4,
        target_inflight_per_worker: float = 1.0,
        up_delay: float = 2.0,
        down_delay: float = 30.0,
        interval: float = 1.0,
    ) -> None:
        self.state = "inactive"  # what Adaptive.__del__ reads, should a check below refuse
        self.periodic_callback = None
        if deployment.cluster is None:
            raise RuntimeError(
                "autoscaling needs a deployment that starts its own workers and scheduler (not one joining a scheduler)"
            )
        if not isinstance(minimum, int) or not isinstance(maximum, int) or not 0 <= minimum <= maximum:
            raise ValueError(f"operator {operator!r}: need 0 <= minimum <= maximum, got {minimum}, {maximum}")
        if maximum < 1:
            raise ValueError(f"operator {operator!r}: maximum must be at least 1, got {maximum}")
        if target_inflight_per_worker <= 0:
            raise ValueError(
                f"operator {operator!r}: target_inflight_per_worker must be > 0, got {target_inflight_per_worker}"
            )
        if up_delay < 0 or down_delay < 0 or interval <= 0:
            raise ValueError(f"operator {operator!r}: delays must be >= 0 and the interval > 0")
        self.deployment = deployment
        self.operator = operator
        self.target_inflight_per_worker = float(target_inflight_per_worker)
        self.up_delay = float(up_delay)
        self.down_delay = float(down_delay)
        self._history: deque[tuple[float, int]] = deque()  # (time, raw target)
        self.last_load = 0
        super().__init__(deployment.cluster, interval=interval, minimum=minimum, maximum=maximum, wait_count=1)

    # -- the operator's worker group --------------------------------------------------------

    def _names(self) -> set[str]:
        return set(self.deployment.operator_workers(self.operator))

    @property
    def plan(self) -> set[str]:  # type: ignore[override]
        """The operator's workers, as the deployment plans them (names)."""
        return self._names()

    @property
    def requested(self) -> set[str]:  # type: ignore[override]
        """The operator's workers the deployment asked for (names)."""
        return self._names()

    @property
    def observed(self) -> set[str]:  # type: ignore[override]
        """The operator's workers the scheduler knows (names)."""
        assert self.cluster is not None
        seen = {str(w["name"]) for w in self.cluster.scheduler_info.get("workers", {}).values()}
        return self._names() & seen

    # -- what it should be ------------------------------------------------------------------

    async def load(self) -> int:
        """Requests of the operator in flight and waiting on its workers, and queued for it at the broker."""
        assert self.cluster is not None
        registry = Registry(self.cluster.scheduler_comm)
        state = await registry.operators()
        mine = lambda key: key.rsplit("/", 1)[0] == self.operator  # noqa: E731
        load = sum(n for key, n in state.get("queued", {}).items() if mine(key))
        for stats in state.get("workers", {}).values():
            for key, s in stats.items():
                if mine(key):
                    load += int(s.get("inflight", 0)) + int(s.get("waiting", 0))
        return load

    async def target(self) -> int:
        """Workers wanted: the load over ``target_inflight_per_worker``, with the up/down delays."""
        self.last_load = load = await self.load()
        raw = math.ceil(load / self.target_inflight_per_worker)
        now = time.monotonic()
        self._history.append((now, raw))
        keep = max(self.up_delay, self.down_delay) + 2 * (self.interval or 1.0)
        while self._history and now - self._history[0][0] > keep:
            self._history.popleft()
        current = len(self.plan)
        if raw > current:
            window = [t for when, t in self._history if now - when <= self.up_delay]
            held = self._history[0][0] <= now - self.up_delay  # seen long enough
            return max(current, min(window)) if held or self.up_delay == 0 else current
        if raw < current:
            window = [t for when, t in self._history if now - when <= self.down_delay]
            held = self._history[0][0] <= now - self.down_delay
            return min(current, max(window)) if held or self.down_delay == 0 else current
        return current

    async def workers_to_close(self, target: int) -> list[str]:
        """The operator's workers to close to come down to ``target``: least busy first, newest first."""
        assert self.cluster is not None
        names = sorted(self.plan, key=_index, reverse=True)
        extra = len(names) - target
        if extra <= 0:
            return []
        state = await Registry(self.cluster.scheduler_comm).operators()
        by_name = {str(w["name"]): a for a, w in self.cluster.scheduler_info.get("workers", {}).items()}

        def busy(name: str) -> int:
            stats = state.get("workers", {}).get(by_name.get(name, ""), {})
            return sum(int(s.get("inflight", 0)) + int(s.get("waiting", 0)) for s in stats.values())

        return sorted(names, key=busy)[:extra]  # sorted() is stable: newest first among equals

    # -- acting -----------------------------------------------------------------------------

    async def scale_up(self, n: int) -> None:  # type: ignore[override]
        """Bring the operator to ``n`` workers (started, ready, registered)."""
        logger.info("autoscaling %s up to %d workers (load %d)", self.operator, n, self.last_load)
        await self.deployment._scale(self.operator, n, adaptive=True)

    async def scale_down(self, workers: list[str]) -> None:  # type: ignore[override]
        """Drain and close these workers of the operator."""
        logger.info("autoscaling %s down: closing %s (load %d)", self.operator, sorted(workers), self.last_load)
        await self.deployment._remove_workers(list(workers), removing=False)  # it may grow again

    def describe(self) -> dict[str, Any]:
        """The settings and the last load seen."""
        return {
            "operator": self.operator,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "target_inflight_per_worker": self.target_inflight_per_worker,
            "up_delay": self.up_delay,
            "down_delay": self.down_delay,
            "interval": self.interval,
            "state": self.state,
            "last_load": self.last_load,
            "workers": len(self.plan),
        }


def _index(name: str) -> int:
    """The instance number ``i`` of a worker named ``<operator>.<i>`` (or ``<operator>.v<n>.<i>``)."""
    try:
        return int(name.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return -1
