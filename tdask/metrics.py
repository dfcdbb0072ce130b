"""What tdask measures, defined once: the latency histogram, the snapshot shape, the Prometheus families.

Workers measure (:mod:`tdask.host.metrics`: observed where requests are served) and report a
snapshot of their counters to the scheduler with their periodic stats
(``tdask.worker.report-interval``); the scheduler keeps the latest snapshot of every worker
(:mod:`tdask.scheduler.cluster_metrics`). Both export the *same* Prometheus families, built here from
the same snapshot shape, so a query works unchanged on a worker's ``/metrics`` (that worker) and
on the scheduler's (the whole cluster)::

    tdask_requests_total{operator, version, worker, outcome}   final answers: "ok", the error's
                                                                type, "cancelled", ...
    tdask_requests_started_total{operator, version, worker}
    tdask_requests_retried_total{operator, version, worker}    re-sent after a worker loss
    tdask_execution_timeouts_total{operator, version, worker}  batches past the execution timeout
    tdask_request_wait_seconds{...}      histogram: arrival on the worker to its batch's start
    tdask_request_execute_seconds{...}   histogram: batch start to the final answer
    tdask_request_seconds{...}           histogram: arrival to the final answer
    tdask_requests_inflight{...}, tdask_requests_inflight_limit{...}, tdask_requests_waiting{...}
    tdask_data_plane_served_bytes_total{worker}, tdask_data_plane_pulled_bytes_total{worker},
    tdask_data_plane_served_total{worker}, tdask_data_plane_pulled_total{worker},
    tdask_data_plane_host_copy_bytes_total{worker}   device bytes staged through host memory
    tdask_tensors_stored{worker}, tdask_tensors_stored_bytes{worker}
    nv_inference_*{model, version, worker}                      Triton's own, re-exported (counters' samples as *_total)

Exporting is done by one process-wide :class:`prometheus_client` collector (registered in
``prometheus_client.REGISTRY``, which Dask's ``/metrics`` serves), fed by *sources* that read
live state at scrape time; a worker's own (live) snapshot wins over a reported copy of it when
a scheduler and its workers share a process.

The histogram is tdask's own: a list of bucket counts and a sum, observed on the event loop
without a lock (``bisect`` and two additions, ~0.2 us), and shipped as plain numbers.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "LATENCY_BUCKETS",
    "Histogram",
    "WorkerSnapshot",
    "add_source",
    "merge_histograms",
    "quantile",
    "remove_source",
    "worker_families",
]

#: Upper bounds (seconds) of the latency histograms' buckets: five per decade (1, 1.6, 2.5, 4,
#: 6.3), 100 us to 100 s; +Inf is implicit. A quantile read from them is within a bucket's
#: width (x1.6) of the truth.
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    round(m * 10.0**e, 10) for e in range(-4, 2) for m in (1.0, 1.6, 2.5, 4.0, 6.3)
) + (100.0,)

_BUCKET_LABELS = tuple(f"{b:g}" for b in LATENCY_BUCKETS) + ("+Inf",)


class Histogram:
    """Latency histogram: bucket counts (``le`` :data:`LATENCY_BUCKETS`, then +Inf) and a sum.

    Not thread-safe, by design: it is observed and read on one event loop.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation of ``seconds``."""
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """How many observations were made."""
        return sum(self.counts)

    def snapshot(self) -> list[float]:
        """A copy as plain numbers: the bucket counts (not cumulative), then the sum."""
        return [*self.counts, self.sum]


def merge_histograms(snapshots: Iterable[Sequence[float]]) -> list[float]:
    """Add up histogram snapshots (as made by :meth:`Histogram.snapshot`)."""
    total = [0.0] * (len(LATENCY_BUCKETS) + 2)
    for snapshot in snapshots:
        if len(snapshot) == len(total):
            for i, value in enumerate(snapshot):
                total[i] += value
    return total


def quantile(snapshot: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of a histogram snapshot, interpolated inside its bucket; ``None`` if empty.

    Same estimate as Prometheus's ``histogram_quantile``: linear within the bucket; a quantile
    in the +Inf bucket is reported as the highest finite bound.
    """
    counts = snapshot[: len(LATENCY_BUCKETS) + 1]
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if count > 0 and seen + count >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
            high = LATENCY_BUCKETS[i]
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


# -- snapshots and their families -------------------------------------------------------------


@dataclass
class WorkerSnapshot:
    """One worker's counters, as its host measured them (``live``) or as it last reported them.

    ``operators`` maps ``name/version`` to what :meth:`tdask.host.serving.Serving.stats` returns
    for it; ``host`` has ``data_plane`` (the tensor store's counters) and ``triton`` (Triton's
    per-model families, as :func:`families_to_msg` encodes them).
    """

    name: str
    operators: Mapping[str, Mapping[str, Any]]
    host: Mapping[str, Any] = field(default_factory=dict)
    live: bool = False


_OPERATOR = ("operator", "version", "worker")

# (family, help, key in the operator's stats) for the per-operator gauges and counters.
_OPERATOR_GAUGES = (
    ("tdask_requests_inflight", "Requests of this operator running on this worker now.", "inflight"),
    ("tdask_requests_inflight_limit", "max_inflight_requests of this operator on this worker.", "limit"),
    ("tdask_requests_waiting", "Requests on this worker waiting for a free slot.", "waiting"),
)
_OPERATOR_COUNTERS = (
    ("tdask_requests_started", "Requests whose execution started on this worker.", "started"),
    ("tdask_requests_retried", "Requests this worker received again after the worker serving them died.", "retried"),
    ("tdask_execution_timeouts", "Batches that ran past the operator's execution timeout here.", "timeouts"),
)
_HISTOGRAMS = (
    ("tdask_request_wait_seconds", "Time a request waited on the worker for a free slot.", "wait"),
    ("tdask_request_execute_seconds", "Time from the start of a request's batch to its final answer.", "execute"),
    ("tdask_request_seconds", "Time from a request's arrival on the worker to its final answer.", "total"),
)
# (family, help, key of TensorStore.stats()) for the data plane, per worker.
_DATA_PLANE_COUNTERS = (
    ("tdask_data_plane_served_bytes", "Bytes of stored tensors this worker served to others.", "served_bytes"),
    ("tdask_data_plane_served", "Tensors this worker served to others.", "served"),
    ("tdask_data_plane_pulled_bytes", "Bytes of tensors this worker pulled from others.", "pulled_bytes"),
    ("tdask_data_plane_pulled", "Tensors this worker pulled from others.", "pulls"),
    (
        "tdask_data_plane_host_copy_bytes",
        "Bytes of device tensors this worker copied through host memory on the data path (0: device to device).",
        "host_copy_bytes",
    ),
)
_DATA_PLANE_GAUGES = (
    ("tdask_tensors_stored", "Tensors held in this worker's store now.", "tensors"),
    ("tdask_tensors_stored_bytes", "Bytes of the tensors held in this worker's store now.", "bytes"),
)


def split_key(key: str) -> tuple[str, str]:
    """``"encoder/1"`` -> ``("encoder", "1")``."""
    name, _, version = key.rpartition("/")
    return (name, version) if name else (key, "")


def worker_families(workers: Iterable[WorkerSnapshot]) -> list[Metric]:
    """The Prometheus families of these workers' snapshots (each family once, every worker in it)."""
    requests = CounterMetricFamily(
        "tdask_requests",
        "Requests answered on this worker, by outcome: ok, or the error's type.",
        labels=[*_OPERATOR, "outcome"],
    )
    gauges = [GaugeMetricFamily(name, doc, labels=_OPERATOR) for name, doc, _ in _OPERATOR_GAUGES]
    loaded = GaugeMetricFamily(
        "tdask_operator_loaded",
        "1 while the operator serves on this worker; 0 while its model is unloaded (model control) or failed.",
        labels=_OPERATOR,
    )
    counters = [CounterMetricFamily(name, doc, labels=_OPERATOR) for name, doc, _ in _OPERATOR_COUNTERS]
    histograms = [HistogramMetricFamily(name, doc, labels=_OPERATOR) for name, doc, _ in _HISTOGRAMS]
    store_counters = [CounterMetricFamily(name, doc, labels=["worker"]) for name, doc, _ in _DATA_PLANE_COUNTERS]
    store_gauges = [GaugeMetricFamily(name, doc, labels=["worker"]) for name, doc, _ in _DATA_PLANE_GAUGES]
    triton: dict[str, Metric] = {}
    for worker in workers:
        for key, stats in sorted(worker.operators.items()):
            labels = [*split_key(key), worker.name]
            for outcome, n in sorted((stats.get("outcomes") or {}).items()):
                requests.add_metric([*labels, outcome], n)
            for gauge, (_, _, field_name) in zip(gauges, _OPERATOR_GAUGES, strict=True):
                gauge.add_metric(labels, stats.get(field_name, 0))
            loaded.add_metric(labels, 1 if stats.get("state", "ready") == "ready" else 0)
            for counter, (_, _, field_name) in zip(counters, _OPERATOR_COUNTERS, strict=True):
                counter.add_metric(labels, stats.get(field_name, 0))
            latency = stats.get("latency") or {}
            for histogram, (_, _, field_name) in zip(histograms, _HISTOGRAMS, strict=True):
                snapshot = latency.get(field_name)
                if snapshot:
                    cumulative = list(itertools.accumulate(snapshot[:-1]))
                    histogram.add_metric(labels, list(zip(_BUCKET_LABELS, cumulative, strict=True)), snapshot[-1])
        store = worker.host.get("data_plane")
        if store:
            for counter, (_, _, field_name) in zip(store_counters, _DATA_PLANE_COUNTERS, strict=True):
                counter.add_metric([worker.name], store.get(field_name, 0))
            for gauge, (_, _, field_name) in zip(store_gauges, _DATA_PLANE_GAUGES, strict=True):
                gauge.add_metric([worker.name], store.get(field_name, 0))
        for encoded in worker.host.get("triton") or ():
            _add_triton_family(triton, encoded, worker.name)
    return [requests, *counters, *gauges, loaded, *histograms, *store_counters, *store_gauges, *triton.values()]


# Triton's families travel as [name, type, help, [[sample name, labels, value], ...]].


def families_to_msg(families: Iterable[Metric]) -> list[list[Any]]:
    """Encode parsed Prometheus families as plain lists (for a stats report)."""
    return [
        [f.name, f.type, f.documentation, [[s.name, dict(s.labels), float(s.value)] for s in f.samples]]
        for f in families
    ]


def _add_triton_family(out: dict[str, Metric], encoded: Sequence[Any], worker: str) -> None:
    try:
        name, typ, documentation, samples = encoded
        family = out.get(name)
        if family is None:
            family = out[name] = Metric(name, documentation, typ)
        for sample_name, labels, value in samples:
            if typ == "counter" and sample_name == name:
                # prometheus_client's exposition types a counter `<name>_total`: its samples must
                # carry that name too, or parsers read them as another, untyped family.
                sample_name = f"{name}_total"
            family.add_sample(sample_name, {**labels, "worker": worker}, value)
    except (ValueError, TypeError):  # a malformed report: skip it rather than fail the scrape
        return


# -- the process-wide exporter ----------------------------------------------------------------

Source = Callable[[], Iterable[WorkerSnapshot]]
ExtraSource = Callable[[], Iterable[Metric]]


class _Exporter(Collector):
    """The one collector of tdask in ``prometheus_client.REGISTRY``, reading its sources at scrape time."""

    def __init__(self) -> None:
        self.sources: dict[int, Source] = {}
        self.extras: dict[int, ExtraSource] = {}
        self._ids = itertools.count()
        self.registered = False

    def collect(self) -> Iterator[Metric]:
        chosen: dict[str, WorkerSnapshot] = {}
        for source in list(self.sources.values()):
            for snapshot in source():
                known = chosen.get(snapshot.name)
                if known is None or (snapshot.live and not known.live):
                    chosen[snapshot.name] = snapshot
        yield from worker_families(sorted(chosen.values(), key=lambda s: s.name))
        for extra in list(self.extras.values()):
            yield from extra()

    def describe(self) -> list[Metric]:
        return []  # the names vary with what is hosted: reserve none in the registry


_EXPORTER = _Exporter()


def add_source(source: Source | None = None, *, extra: ExtraSource | None = None) -> int:
    """Export what ``source`` (worker snapshots) or ``extra`` (ready families) returns at each scrape.

    Returns a token for :func:`remove_source`. The exporter joins ``prometheus_client.REGISTRY``
    on first use, so Dask's ``/metrics`` (scheduler and workers) serves it.
    """
    token = next(_EXPORTER._ids)
    if source is not None:
        _EXPORTER.sources[token] = source
    if extra is not None:
        _EXPORTER.extras[token] = extra
    if not _EXPORTER.registered:
        REGISTRY.register(_EXPORTER)
        _EXPORTER.registered = True
    return token


def remove_source(token: int) -> None:
    """Stop exporting a source added with :func:`add_source`."""
    _EXPORTER.sources.pop(token, None)
    _EXPORTER.extras.pop(token, None)
