"""A worker's metrics: what :mod:`tdask.host.serving` observes per request, and Triton's own.

Per operator (:class:`OperatorMetrics`): three latency histograms (waiting for a slot, execute,
total), the final answers by outcome, and the requests re-sent here after a worker loss. They
are observed on the event loop where a request is served (a ``bisect`` and a few additions per
request, no lock, no message); everything else (in flight, limit, waiting, the tensor store's
counters) is read from live state when ``/metrics`` is scraped, as distributed's own
collectors do.

Triton's metrics: the worker's server listens for them on 127.0.0.1 at a free port
(:attr:`tdask.triton.server.TritonServer.metrics_url`), so nobody manages a port per worker;
:class:`TritonMetrics` reads them asynchronously at each stats report and the worker re-exports
them with its ``worker`` label (the per-model families also travel to the scheduler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tdask import metrics
from tdask.metrics import Histogram, WorkerSnapshot

logger = logging.getLogger(__name__)

__all__ = ["OperatorMetrics", "TritonMetrics", "export_worker"]

#: Outcome of a request cancelled by its caller (never answered).
CANCELLED = "cancelled"
#: Outcome of a request this worker left unanswered because it is restarting (served again elsewhere).
NOT_ANSWERED = "not_answered"
#: Outcome of a final answer that could not be delivered to its caller.
UNDELIVERED = "undelivered"


class OperatorMetrics:
    """What a worker measures of one hosted operator, observed as requests are served."""

    __slots__ = ("execute", "last_ok", "outcome_seconds", "outcomes", "retried", "timeouts", "total", "wait")

    def __init__(self) -> None:
        self.wait = Histogram()
        self.execute = Histogram()
        self.total = Histogram()
        self.outcomes: dict[str, int] = {}
        # Per outcome, the summed seconds from arrival to the final answer (the gateway's
        # Triton statistics: success and fail durations), and when the last "ok" answer went.
        self.outcome_seconds: dict[str, float] = {}
        self.last_ok = 0.0
        self.retried = 0
        self.timeouts = 0  # batches that ran past the operator's execution timeout

    def count(self, outcome: str, seconds: float | None = None) -> None:
        """Count one final outcome (``"ok"``, an error's type, :data:`CANCELLED`, ...), ``seconds`` after arrival."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if seconds is not None:
            self.outcome_seconds[outcome] = self.outcome_seconds.get(outcome, 0.0) + seconds
            if outcome == "ok":
                self.last_ok = time.time()

    def snapshot(self) -> dict[str, Any]:
        """Plain copies of the counters and histograms (for stats reports and scrapes)."""
        return {
            "outcomes": dict(self.outcomes),
            "outcome_seconds": dict(self.outcome_seconds),
            "last_ok": self.last_ok,
            "retried": self.retried,
            "timeouts": self.timeouts,
            "latency": {
                "wait": self.wait.snapshot(),
                "execute": self.execute.snapshot(),
                "total": self.total.snapshot(),
            },
        }


class TritonMetrics:
    """Reads a Triton server's Prometheus metrics and keeps the last ones read.

    Parameters
    ----------
    source
        Where they come from: ``host:port`` of a ``tritonserver``'s metrics endpoint (subprocess
        mode), or a function returning the Prometheus text (in-process mode: Triton's C API).
    timeout_s
        Bound on one HTTP read.
    """

    def __init__(self, source: str | Callable[[], str], *, timeout_s: float = 2.0) -> None:
        self._read: Callable[[], str] | None = None
        if callable(source):
            self._read, self.where = source, "in process"
        else:
            host, _, port = source.rpartition(":")
            self.host, self.port = host, int(port)
            self.where = source
        self.timeout_s = timeout_s
        self.families: list[Metric] = []
        self._warned = False

    async def refresh(self) -> None:
        """Read the server's metrics now; on failure keep the previous ones (logged once)."""
        try:
            text = self._read() if self._read is not None else await asyncio.wait_for(self._get(), self.timeout_s)
            self.families = _parse_keeping_names(text)
            self._warned = False
        except (OSError, TimeoutError, ValueError, RuntimeError) as exc:
            if not self._warned:
                logger.warning("could not read Triton's metrics (%s): %r", self.where, exc)
                self._warned = True

    async def _get(self) -> str:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 200" not in status:
            raise ValueError(f"Triton's metrics endpoint answered {status.decode(errors='replace')!r}")
        return body.decode()

    def per_model(self) -> list[Metric]:
        """The families whose samples name a model (inference counts, queue and compute times)."""
        return [f for f in self.families if f.samples and all("model" in s.labels for s in f.samples)]


def _parse_keeping_names(text: str) -> list[Metric]:
    """Parse Prometheus text, keeping counters' sample names as written.

    prometheus_client's parser renames a counter's samples ``x`` to ``x_total`` (OpenMetrics);
    Triton's are ``nv_inference_count`` and so on, and dashboards built for Triton query those.
    """
    written = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}
    families = list(text_string_to_metric_families(text))
    for family in families:
        if family.type == "counter":
            family.samples = [
                s._replace(name=s.name[:-6])
                if s.name.endswith("_total") and s.name not in written and s.name[:-6] in written
                else s
                for s in family.samples
            ]
    return families


def export_worker(name: Callable[[], str], snapshot: Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]]) -> int:
    """Serve a worker's live counters on this process's ``/metrics``; returns the token to remove it.

    ``snapshot()`` returns ``(operators, host)`` as :class:`tdask.metrics.WorkerSnapshot` holds them.
    """

    def source() -> list[WorkerSnapshot]:
        operators, host = snapshot()
        return [WorkerSnapshot(name=name(), operators=operators, host=host, live=True)]

    return metrics.add_source(source)
