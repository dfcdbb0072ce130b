"""The gateway's own Prometheus metrics (``GET /metrics`` on its HTTP port).

Families, per model, version and protocol (``http``, ``grpc``; ``status`` is ``OK`` or the
KServe error's gRPC code name, e.g. ``INVALID_ARGUMENT``, ``NOT_FOUND``)::

    tdask_gateway_requests_total{model, version, protocol, endpoint, status}
    tdask_gateway_request_seconds{model, version, protocol, endpoint}   histogram, arrival to answer
    tdask_gateway_requests_inflight{protocol}

``endpoint`` is ``infer``, ``stream`` (gRPC ``ModelStreamInfer``, each request of the stream),
``generate`` or ``generate_stream``. A model nobody hosts is counted as ``model="_unknown"``,
so that names made up by clients add no series. They live in a registry of the gateway's own
(not prometheus_client's global one, where tdask's worker families are).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tdask.gateway.kserve import status_of
from tdask.metrics import LATENCY_BUCKETS

__all__ = ["GatewayMetrics", "UNKNOWN_MODEL"]

#: The ``model`` label of requests to a model nobody hosts.
UNKNOWN_MODEL = "_unknown"


class GatewayMetrics:
    """Counters and latency of the requests one gateway served.

    Parameters
    ----------
    known
        Whether a ``name/version`` key is a model the gateway has served (else its requests are
        labelled :data:`UNKNOWN_MODEL`).
    """

    def __init__(self, known: Callable[[str, str], bool]) -> None:
        self.known = known
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version", "protocol", "endpoint"]
        self.requests = Counter(
            "tdask_gateway_requests", "Requests the gateway answered", [*labels, "status"], registry=self.registry
        )
        self.seconds = Histogram(
            "tdask_gateway_request_seconds",
            "Seconds from a request's arrival at the gateway to its answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "tdask_gateway_requests_inflight",
            "Requests in progress in the gateway",
            ["protocol"],
            registry=self.registry,
        )
        # The labelled children, looked up once (prometheus_client's labels() takes a lock each time).
        self._children: dict[tuple[str, ...], tuple[Any, dict[str, Any]]] = {}
        self._inflight: dict[str, Any] = {}

    @contextmanager
    def observe(self, model: str, version: str | None, protocol: str, endpoint: str = "infer") -> Iterator[None]:
        """Count the request run inside the block: its status (from the exception, if one escapes) and time."""
        began = time.perf_counter()
        status = "OK"
        inflight = self._inflight.get(protocol)
        if inflight is None:
            inflight = self._inflight[protocol] = self.inflight.labels(protocol)
        inflight.inc()
        try:
            yield
        except BaseException as exc:
            status = "CANCELLED" if not isinstance(exc, Exception) else status_of(exc)[1]
            raise
        finally:
            inflight.dec()
            number = version or "1"
            label = model if self.known(model, number) else UNKNOWN_MODEL
            if label == UNKNOWN_MODEL:
                number = ""
            key = (label, number, protocol, endpoint)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (self.seconds.labels(*key), {})
            counter = children[1].get(status)
            if counter is None:
                counter = children[1][status] = self.requests.labels(*key, status)
            counter.inc()
            children[0].observe(time.perf_counter() - began)

    def exposition(self) -> bytes:
        """The Prometheus text of every family."""
        return bytes(generate_latest(self.registry))
