"""The request plane's two contracts: a caller's plane, and the transport a session runs on.

A *caller plane* (:class:`RequestPlane`) takes a request message and gives back the stream of its
responses; :mod:`tdask.request_plane.direct` and :mod:`tdask.request_plane.queue` implement it.
A *transport* (:class:`Transport`) carries one-way messages both ways between two processes;
:class:`tdask.request_plane.session.Session` (a Dask comm) and
:class:`tdask.request_plane.wire.WireSession` (tdask's wire) implement it. The planes never
know which transport they hold.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from tdask.protocol import RequestMsg, ResponseMsg

__all__ = ["MessageHandler", "RequestPlane", "ResponseStream", "Transport"]

MessageHandler = Callable[[dict[str, Any]], None]


@runtime_checkable
class Transport(Protocol):
    """One connection carrying one-way messages (dicts, see :mod:`tdask.protocol`) both ways.

    Incoming messages are checked with :func:`tdask.protocol.check_message` and handed to the
    handler the transport was opened with; a peer that sends anything else is disconnected.
    """

    name: str
    closed: asyncio.Event

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message``; raises ``CommClosedError`` once the connection is closed."""

    async def drain(self) -> None:
        """Wait while the peer reads slower than this side writes (backpressure)."""

    async def read_forever(self) -> None:
        """Return once the connection is closed (messages are delivered as they arrive)."""

    async def close(self) -> None:
        """Close after writing what is queued."""

    def abort(self) -> None:
        """Close at once, dropping what is queued."""


class ResponseStream:
    """Responses of one request, in order; ends after the final one."""

    __slots__ = ("request_id", "_ready", "_waiter", "done")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._ready: deque[ResponseMsg] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.done = False

    def deliver(self, response: ResponseMsg) -> None:
        """Hand a response to whoever waits on :meth:`next` (called by the plane)."""
        self._ready.append(response)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float | None = None) -> ResponseMsg:
        """The next response (raises ``StopAsyncIteration`` after the final one).

        ``timeout``: seconds to wait at most (``TimeoutError`` then; the stream stays usable).
        One timer handle, not ``asyncio.timeout``: this is on every request's path, and the
        context manager costs several times as much (measured in docs/performance.md).
        """
        if self.done:
            raise StopAsyncIteration
        if not self._ready:
            loop = asyncio.get_running_loop()
            timer = None
            try:
                while not self._ready:
                    # A bare future, not a queue: this is on every request's path.
                    self._waiter = waiter = loop.create_future()
                    if timer is None and timeout is not None:
                        timer = loop.call_later(timeout, self._expire)
                    await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        response = self._ready.popleft()
        if response.get("final"):
            self.done = True
        return response

    def _expire(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def __aiter__(self) -> AsyncIterator[ResponseMsg]:
        return self

    async def __anext__(self) -> ResponseMsg:
        return await self.next()


class RequestPlane(abc.ABC):
    """How a caller's requests reach operators and their responses come back.

    One object per caller process and client (a ``Client``, or a worker calling operators from
    inside an operator). Implementations: :class:`~tdask.request_plane.direct.DirectRequestPlane`
    (default) and :class:`~tdask.request_plane.queue.QueueRequestPlane`; chosen with
    ``tdask.request.plane``.
    """

    #: The scheduler's registry of who hosts what (see :class:`~tdask.request_plane.registry.Registry`).
    registry: Any
    #: Set by a Client's endpoint: once its client closes, lost sessions are not retried.
    owner_closing: Callable[[], bool]
    #: Called with replies nobody waits for any more (their request was cancelled), so that
    #: the tensors they refer to can be released.
    on_orphan: Callable[[ResponseMsg], None] | None

    @abc.abstractmethod
    async def submit(self, request: RequestMsg, stream: ResponseStream | None = None) -> ResponseStream:
        """Send ``request``; its responses arrive on the returned stream, the last one final.

        ``stream``: deliver to this existing stream (a request handed from one plane to another).
        Raises ``ValueError`` when a request with the same id is in flight from this caller.
        """

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None:
        """Withdraw a request: never served if still waiting, the operator told if running."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the plane's sessions; requests still in flight fail."""
