"""The cluster-wide view of tdask's metrics, on the scheduler: its ``/metrics`` and the dashboard's history.

Workers report their counters every ``tdask.worker.report-interval`` with their stats (the
message they already send, :func:`tdask.protocol.stats`); :class:`ClusterMetrics` keeps the
latest report of each worker and exports it on the scheduler's ``/metrics`` under the worker's
name (the same families a worker serves itself, :mod:`tdask.metrics`), next to what only the
scheduler knows: the broker's queues and leases, the errors it answered itself, the workers
lost while hosting an operator, and the setup failures.

For the dashboard it also keeps a short history (one point a second, ``HISTORY_S``): per
operator the request and error rates, p50/p99 latency, queue depth and in-flight requests, and
per worker the data-plane throughput. Rates come from each worker's own report times (no
jitter from when reports happen to arrive); a worker that stopped reporting (nothing changed)
counts as idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tdask import metrics
from tdask.config import get_seconds
from tdask.metrics import WorkerSnapshot, merge_histograms, quantile, split_key

logger = logging.getLogger(__name__)

__all__ = ["ClusterMetrics", "Sample"]

#: How much history the dashboard can show (seconds, one point a second).
HISTORY_S = 900
#: Outcomes that are not errors.
NOT_ERRORS = frozenset({"ok", "cancelled", "not_answered"})


@dataclass
class Sample:
    """One point of the dashboard's history (rates over the last few seconds).

    ``operators`` maps ``name/version`` to ``rate`` and ``errors`` (per second), ``p50`` and
    ``p99`` (seconds, ``None`` with no answers), ``queued`` (broker queue plus waiting on
    workers), ``inflight`` and ``limit`` (summed over workers), ``timeouts`` and ``recoveries``
    (totals: execution timeouts, restarts of its workers to recover it); ``workers`` maps a worker's name
    to its data-plane ``served`` and ``pulled`` bytes per second.
    """

    index: int
    time: float
    operators: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class _Reported:
    """What one worker last reported, and its recent reports (for rates)."""

    name: str
    operators: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    host: Mapping[str, Any] = field(default_factory=dict)
    received: float = 0.0
    interval: float = 1.0
    # (worker's report time, {key: (answered, errors, total-latency buckets)}, (served, pulled bytes))
    recent: deque[tuple[float, dict[str, tuple[int, int, list[float]]], tuple[int, int]]] = field(default_factory=deque)


class ClusterMetrics:
    """The scheduler's view of every worker's metrics, kept by the request broker.

    Parameters
    ----------
    broker
        The :class:`~tdask.scheduler.broker.RequestBroker` (its queues, leases, counts, hosts
        and failures are read live at scrape time).
    """

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.workers: dict[str, _Reported] = {}  # worker address -> its reports
        self.losses: dict[tuple[str, str], int] = defaultdict(int)  # (key, worker name) -> lost
        self.queue_errors: dict[tuple[str, str], int] = defaultdict(int)  # (key, error type) -> n
        self.timeouts: dict[str, int] = defaultdict(int)  # key -> batches past the execution timeout
        self.recoveries: dict[str, int] = defaultdict(int)  # key -> restarts of workers hosting it
        self.history: deque[Sample] = deque(maxlen=HISTORY_S)
        self.interval_s = get_seconds("tdask.worker.report-interval") or 1.0
        self.window_s = max(5.0, 4 * self.interval_s)
        self._queue_errors_seen: deque[tuple[float, dict[str, int]]] = deque()
        self._samples = 0
        self._token: int | None = None
        self._sampler: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Export on this process's ``/metrics`` and start keeping the dashboard's history."""
        self.interval_s = get_seconds("tdask.worker.report-interval") or 1.0  # the scheduler's config
        self.window_s = max(5.0, 4 * self.interval_s)
        if self._token is None:
            self._token = metrics.add_source(self.snapshots, extra=self.families)
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_forever())

    async def close(self) -> None:
        """Stop exporting and sampling."""
        if self._token is not None:
            metrics.remove_source(self._token)
            self._token = None
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    # -- what the broker tells it ----------------------------------------------------------

    def on_report(self, worker: str, stats: Mapping[str, Any], host: Mapping[str, Any]) -> None:
        """A worker's periodic report (``stats`` per operator, ``host``: data plane, Triton, time)."""
        now = time.time()
        reported = self.workers.get(worker)
        if reported is None:
            reported = self.workers[worker] = _Reported(name=self.name_of(worker))
        reported.operators, reported.host, reported.received = stats, host, now
        reported.interval = interval = float(host.get("interval", self.interval_s))
        at = float(host.get("time", now))
        operators = {}
        for key, s in stats.items():
            outcomes = s.get("outcomes") or {}
            answered = sum(outcomes.values())
            errors = sum(n for outcome, n in outcomes.items() if outcome not in NOT_ERRORS)
            total = list((s.get("latency") or {}).get("total") or ())
            operators[key] = (answered, errors, total)
        store = host.get("data_plane") or {}
        recent = reported.recent
        if recent and at - recent[-1][0] > 1.5 * interval:
            # It did not report for a while: nothing changed until its check one interval ago.
            _, before, bytes_before = recent[-1]
            recent.clear()
            recent.append((at - interval, before, bytes_before))
        recent.append((at, operators, (int(store.get("served_bytes", 0)), int(store.get("pulled_bytes", 0)))))
        while len(recent) > 2 and recent[1][0] <= at - self.window_s:
            recent.popleft()

    def worker_removed(self, worker: str, hosted: Iterable[str]) -> None:
        """A worker left; ``hosted``: the operators it was still registered for (so it was lost)."""
        reported = self.workers.pop(worker, None)
        name = reported.name if reported is not None else self.name_of(worker)
        for key in hosted:
            self.losses[(key, name)] += 1

    def worker_event(self, msg: Mapping[str, Any]) -> None:
        """A worker's ``"tdask"`` event: an execution timeout, or a restart (a recovery) of its operators.

        Counted here, since the worker's own counters go with it when it restarts.
        """
        action = msg.get("action")
        if action == "execution-timeout":
            self.timeouts[str(msg.get("operator"))] += 1
        elif action == "restart":
            for key in msg.get("operators") or ():
                self.recoveries[str(key)] += 1

    def queue_error(self, key: str, error: BaseException) -> None:
        """The broker answered a request of ``key`` with ``error`` itself (no worker did)."""
        self.queue_errors[(key, type(error).__name__)] += 1

    def name_of(self, worker: str) -> str:
        """A worker's name, from its address (the address itself when the scheduler does not know it)."""
        reported = self.workers.get(worker)
        if reported is not None:
            return reported.name
        state = getattr(self.broker.scheduler, "workers", {}).get(worker)
        name = getattr(state, "name", None)
        return str(name) if name is not None else worker

    # -- Prometheus ------------------------------------------------------------------------

    def snapshots(self) -> list[WorkerSnapshot]:
        """Every reporting worker's latest counters, by name (the families of :mod:`tdask.metrics`)."""
        return [WorkerSnapshot(name=r.name, operators=r.operators, host=r.host) for r in self.workers.values()]

    def families(self) -> list[Metric]:
        """What only the scheduler knows: queues, leases, broker events, losses, hosts, failures."""
        broker = self.broker
        queued = GaugeMetricFamily(
            "tdask_requests_queued",
            "Requests in the scheduler's queue (queue plane), waiting for a worker.",
            labels=["operator", "version"],
        )
        leased = GaugeMetricFamily(
            "tdask_requests_leased",
            "Requests the scheduler's broker handed to a worker and not yet answered.",
            labels=["operator", "version"],
        )
        events = CounterMetricFamily(
            "tdask_broker_requests", "Requests through the scheduler's broker, by event.", labels=["event"]
        )
        errors = CounterMetricFamily(
            "tdask_broker_errors",
            "Requests the broker answered with an error itself (no host, deadline passed while queued, "
            "worker lost and retries used up), by error type.",
            labels=["operator", "version", "error"],
        )
        losses = CounterMetricFamily(
            "tdask_worker_losses",
            "Workers that left while still hosting an operator (died, or were killed).",
            labels=["operator", "version", "worker"],
        )
        hosts = GaugeMetricFamily(
            "tdask_operator_workers", "Workers hosting the operator now.", labels=["operator", "version"]
        )
        timeouts = CounterMetricFamily(
            "tdask_operator_execution_timeouts",
            "Executions that ran past the operator's execution timeout (answered ExecutionTimeoutError).",
            labels=["operator", "version"],
        )
        recoveries = CounterMetricFamily(
            "tdask_operator_recoveries",
            "Workers hosting the operator that restarted to recover it (a hung or dead Triton model or server).",
            labels=["operator", "version"],
        )
        failures = GaugeMetricFamily(
            "tdask_operator_setup_failures",
            "Workers on which the operator failed to start (1 per worker).",
            labels=["operator", "worker"],
        )
        keys = set(broker.hosts) | {key for key, q in broker.queues.items() if q}
        lease_counts: dict[str, int] = defaultdict(int)
        for lease in list(broker.leases.values()):
            lease_counts[lease.request.get("operator", "")] += 1
        for key in sorted(keys | set(lease_counts)):
            labels = list(split_key(key))
            queued.add_metric(labels, len(broker.queues.get(key, ())))
            leased.add_metric(labels, lease_counts.get(key, 0))
            hosts.add_metric(labels, len(broker.hosts.get(key, {})))
        for event, n in sorted(broker.counts.items()):
            events.add_metric([event], n)
        for (key, error), n in sorted(self.queue_errors.items()):
            errors.add_metric([*split_key(key), error], n)
        for (key, name), n in sorted(self.losses.items()):
            losses.add_metric([*split_key(key), name], n)
        for operator, by_worker in sorted(broker.failures.items()):
            for worker in sorted(by_worker):
                failures.add_metric([operator, self.name_of(worker)], 1)
        for key, n in sorted(self.timeouts.items()):
            timeouts.add_metric(list(split_key(key)), n)
        for key, n in sorted(self.recoveries.items()):
            recoveries.add_metric(list(split_key(key)), n)
        return [queued, leased, events, errors, losses, hosts, failures, timeouts, recoveries]

    # -- the dashboard's history -----------------------------------------------------------

    async def _sample_forever(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:
                logger.exception("sampling tdask's metrics failed")
            await asyncio.sleep(1.0)

    def sample(self) -> Sample:
        """Add one point to :attr:`history` (and return it)."""
        now = time.time()
        self._samples += 1
        point = Sample(index=self._samples, time=now)
        rates: dict[str, list[Any]] = defaultdict(lambda: [0.0, 0.0, []])
        gauges: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # waiting, inflight, limit
        for reported in self.workers.values():
            for key, s in reported.operators.items():
                g = gauges[key]
                g[0] += int(s.get("waiting", 0))
                g[1] += int(s.get("inflight", 0))
                g[2] += int(s.get("limit", 0))
            recent = reported.recent
            served = pulled = 0.0
            # Silent for longer than its interval: nothing changed there, it is idle.
            if len(recent) >= 2 and reported.received >= now - 1.5 * reported.interval - 0.5:
                (t0, first, bytes0), (t1, last, bytes1) = recent[0], recent[-1]
                span = max(t1 - t0, 1e-3)
                for key, (answered, errors, total) in last.items():
                    before = first.get(key, (0, 0, []))
                    r = rates[key]
                    r[0] += max(0, answered - before[0]) / span
                    r[1] += max(0, errors - before[1]) / span
                    if total:
                        r[2].append([a - b for a, b in zip(total, before[2] or [0] * len(total), strict=True)])
                served = max(0, bytes1[0] - bytes0[0]) / span
                pulled = max(0, bytes1[1] - bytes0[1]) / span
            point.workers[reported.name] = {"served": served, "pulled": pulled}
        queue_errors = self._queue_error_rates(now)
        queues = self.broker.queues
        for key in sorted(set(gauges) | set(rates) | {k for k, q in queues.items() if q}):
            rate, error_rate, deltas = rates.get(key, (0.0, 0.0, []))
            merged = merge_histograms(deltas)
            waiting, inflight, limit = gauges.get(key, (0, 0, 0))
            point.operators[key] = {
                "rate": rate,
                "errors": error_rate + queue_errors.get(key, 0.0),
                "p50": quantile(merged, 0.5),
                "p99": quantile(merged, 0.99),
                "queued": waiting + len(queues.get(key, ())),
                "inflight": inflight,
                "limit": limit,
                "timeouts": self.timeouts.get(key, 0),
                "recoveries": self.recoveries.get(key, 0),
            }
        self.history.append(point)
        return point

    def _queue_error_rates(self, now: float) -> dict[str, float]:
        """Errors the broker answered itself, per second over the window, per operator."""
        totals: dict[str, int] = defaultdict(int)
        for (key, _), n in self.queue_errors.items():
            totals[key] += n
        seen = self._queue_errors_seen
        seen.append((now, dict(totals)))
        while len(seen) > 2 and seen[1][0] <= now - self.window_s:
            seen.popleft()
        t0, first = seen[0]
        span = max(now - t0, 1.0)
        return {key: (n - first.get(key, 0)) / span for key, n in totals.items() if n > first.get(key, 0)}
