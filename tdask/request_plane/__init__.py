"""The request plane: how requests reach operators and their responses come back.

=============== ==========================================================================
module          role
=============== ==========================================================================
``base``        the contracts: a caller's :class:`RequestPlane`, a worker's :class:`ServerPlane`
``registry``    the caller's side of the scheduler's registry (who hosts what)
``direct``      the direct plane, both halves (default): callers to workers, no scheduler hop
``data_calls``  host tensors fetched, placed and released on the direct plane's wire
``queue``       the queue plane, both halves: requests through the scheduler's queues
=============== ==========================================================================

The scheduler's half of the queue plane (the broker) is :mod:`tdask.scheduler`; the sessions
both planes run on are :mod:`tdask.transport`'s, picked there. Messages are defined in
:mod:`tdask.protocol`; nothing here builds one by hand.
"""

from __future__ import annotations

from typing import Any

import dask.config

from tdask.request_plane.base import RequestPlane, ResponseStream, ServerPlane
from tdask.request_plane.direct import DirectRequestPlane, DirectServer
from tdask.request_plane.queue import BrokerSession, QueueRequestPlane, QueueServer
from tdask.request_plane.registry import Registry

__all__ = [
    "BrokerSession",
    "DirectRequestPlane",
    "DirectServer",
    "QueueRequestPlane",
    "QueueServer",
    "Registry",
    "RequestPlane",
    "ResponseStream",
    "ServerPlane",
    "make_request_plane",
]

PLANES = ("direct", "queue")


def make_request_plane(broker: BrokerSession, *, connection_args: dict[str, Any] | None = None) -> RequestPlane:
    """The caller plane chosen by ``tdask.request.plane`` (``direct`` or ``queue``), over ``broker``."""
    kind = dask.config.get("tdask.request.plane", "direct")
    if kind not in PLANES:
        raise ValueError(f"tdask.request.plane must be one of {PLANES}, got {kind!r}")
    queue = QueueRequestPlane(broker)
    if kind == "queue":
        return queue
    return DirectRequestPlane(queue, connection_args=connection_args)
