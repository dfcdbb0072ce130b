"""The request plane's contracts: a caller's plane, and a plane's worker half.

A *caller plane* (:class:`RequestPlane`) takes a request message and gives back the stream of its
responses. A plane's *worker half* (:class:`ServerPlane`) brings requests to the worker's serving
and takes their answers back the way they came. :mod:`tdask.request_plane.direct` and
:mod:`tdask.request_plane.queue` implement both. The sessions they run on are
:class:`tdask.transport.Transport` objects; the planes never know which transport they hold.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from tdask.data_plane import Shortcut
from tdask.protocol import RequestMsg, ResponseMsg

__all__ = ["Admission", "RequestKey", "RequestPlane", "ResponseStream", "ServerPlane"]


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
    #: The data plane's quicker route to workers this plane holds sessions with (see
    #: :class:`~tdask.data_plane.Shortcut`), or None. Whoever owns the process's data plane sets
    #: it as the data plane's ``shortcut``, without asking which plane or transport this is.
    shortcut: Shortcut | None = None

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


# -- the worker's half ----------------------------------------------------------------------

#: ``[requester, request_id]``: a request as the worker knows it (ids are unique per requester).
RequestKey = tuple[str, str]


class Admission(Protocol):
    """What a plane's worker half hands requests to: the worker's serving (:class:`tdask.host.serving.Serving`)."""

    def admit(self, plane: ServerPlane, operator_key: str, requests: list[RequestMsg]) -> bool:
        """Run ``requests`` (``requester`` set) or queue them for a slot; False: not hosted here (any more)."""
        ...

    def cancel(self, keys: list[list[str]]) -> None:
        """Cancel requests by ``[requester, request_id]``: waiting ones never run, running ones are told."""
        ...


class ServerPlane(abc.ABC):
    """A plane's worker half, as the worker's serving sees it: requests in, answers back the same way.

    Serving never asks how a request came: it answers, frees slots, forgets cancelled requests
    and hands back what it will not serve through the plane that brought the request. The
    planes' halves: :class:`~tdask.request_plane.direct.DirectServer` (callers' own sessions) and
    :class:`~tdask.request_plane.queue.QueueServer` (the broker's leases and credits).
    """

    #: Whether the plane counts the slots its requests hold (the broker's credits): only then is
    #: it told of each request that leaves its slot (:meth:`freed`).
    counts_slots: bool = False

    @abc.abstractmethod
    def serve(self, admission: Admission) -> None:
        """From now on, hand requests to ``admission``."""

    @abc.abstractmethod
    async def answer(self, response: ResponseMsg) -> None:
        """Send ``response`` back the way its request came (raises when it cannot be delivered)."""

    def freed(self, operator_key: str, n: int) -> None:
        """``n`` requests this plane brought for ``operator_key`` left their slots (or their wait).

        Called only where :attr:`counts_slots`; the queue plane gives the broker that many
        credits back.
        """
        raise NotImplementedError(f"{type(self).__name__} counts no slots")

    @abc.abstractmethod
    def forget(self, keys: list[RequestKey]) -> None:
        """These requests were cancelled: no answer goes back for them."""

    @abc.abstractmethod
    def hand_back(self, keys: list[RequestKey] | None = None) -> bool:
        """The worker is leaving and will not answer these requests (default: every unanswered one).

        Returns True when their callers were told (they serve them elsewhere and the worker drops
        them), False when the plane takes them back by itself later (the broker's leases, at
        unregister) and the worker keeps them until then.
        """
