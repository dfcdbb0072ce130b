"""The serving context: what the code running inside an operator's ``execute`` is serving.

One context variable, set by the worker host (:mod:`tdask.host.serving`) for each batch it runs,
read by the caller side (:class:`tdask.RemoteOperator` calls made inside an operator go through
the operator's own worker and inherit the request's deadline) and by the data plane (fetches use
the worker's store; descriptors received are released when the request finishes).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tdask.config import RequestSettings
    from tdask.data_plane import DataPlanePeer, RemoteTensor, TensorScope, TensorStore
    from tdask.request_plane import RequestPlane

__all__ = ["Endpoint", "ServingContext", "current"]


class Endpoint(Protocol):
    """What :class:`tdask.RemoteOperator` sends through: a request plane and a data plane.

    Two implementations: a client's (``tdask.remote``, one per ``Client``) and, inside an
    operator, its worker's (:class:`tdask.host.plugin.WorkerEndpoint`).
    """

    #: Whether large outputs are fetched by default (a client: yes; inside an operator: no, so
    #: that descriptors can be forwarded by reference).
    fetch_default: bool
    #: The caller plane requests go through.
    plane: RequestPlane
    #: Fetches, places and releases tensors.
    peer: DataPlanePeer

    @property
    def closed(self) -> bool:
        """Whether no request can be sent through it any more."""
        ...

    async def place(self, key: str, array: Any, wait_s: float) -> RemoteTensor:
        """Store a large input where the operator ``key`` can pull it (waiting ``wait_s`` for a host)."""
        ...


@dataclass(frozen=True, slots=True)
class ServingContext:
    """What one running batch serves.

    Attributes
    ----------
    endpoint
        The request and data plane that :class:`tdask.RemoteOperator` uses from inside an
        operator (the worker's own, see :class:`tdask.host.plugin.WorkerEndpoint`).
    store
        The worker's tensor store.
    scope
        The descriptors received while serving this batch (released when it finishes, unless
        handed on in a response).
    deadline
        The latest deadline of the batch's requests (epoch seconds; ``None``: no deadline);
        calls made while serving inherit it.
    settings
        The request settings read when the batch started; calls made while serving use them
        instead of reading ``dask.config`` again (``None``: read them).
    """

    endpoint: Endpoint
    store: TensorStore
    scope: TensorScope
    deadline: float | None
    settings: RequestSettings | None = None


current: contextvars.ContextVar[ServingContext | None] = contextvars.ContextVar("tdask_serving", default=None)
