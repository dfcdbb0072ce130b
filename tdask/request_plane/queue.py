"""The queue plane, both halves: requests through per-operator queues on the scheduler's broker.

Every requester (a client, or a worker calling operators) and every serving worker keeps one
:class:`BrokerSession`, a Dask comm to the scheduler carrying one-way messages both ways. On the
caller's side, :class:`QueueRequestPlane` submits requests and routes the broker's replies to
their streams; on the worker's side, :class:`QueueServer` registers the operators the worker
hosts, grants *credits* (free slots), receives leased requests and sends responses. A worker's
caller plane and its server share its one session. The scheduler's half is
:class:`tdask.scheduler.broker.RequestBroker`.

Everything passes through the scheduler, so messages carry small tensors and descriptors only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from distributed.comm.core import CommClosedError

from tdask import protocol, transport
from tdask.config import get_seconds
from tdask.exceptions import ClientClosedError, InvalidRequestError, SchedulerLostError, TdaskError
from tdask.protocol import Op, RequestMsg, ResponseMsg, Rpc
from tdask.request_plane.base import Admission, RequestKey, RequestPlane, ResponseStream, ServerPlane
from tdask.request_plane.registry import Registry
from tdask.transport import Transport

logger = logging.getLogger(__name__)

__all__ = ["BrokerSession", "QueueRequestPlane", "QueueServer"]

RequestsHandler = Callable[[str, list[RequestMsg]], None]
WithdrawHandler = Callable[[list[list[str]]], None]
RequesterLeftHandler = Callable[[str], None]
RepliesHandler = Callable[[list[ResponseMsg]], None]


class BrokerSession:
    """The process's one session with the scheduler's broker, opened on first use.

    Parameters
    ----------
    registry
        The scheduler's registry (its RPC is also where the session connects).
    requester
        Names this requester to the broker (a client's id, or a worker's address and a suffix).
    worker
        The serving worker's address, when this session also serves requests.
    connection_args
        The client's or worker's ``connection_args`` (so TLS and UCX work).
    """

    def __init__(
        self,
        registry: Registry,
        requester: str,
        *,
        worker: str | None = None,
        connection_args: dict[str, Any] | None = None,
    ) -> None:
        self.registry = registry
        self.requester = requester
        self.worker = worker
        self.connection_args = connection_args or {}
        self._session: Transport | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        # Who handles what arrives (set by the caller plane and the server sharing the session).
        self.on_replies: RepliesHandler | None = None
        self.on_requests: RequestsHandler | None = None
        self.on_withdraw: WithdrawHandler | None = None
        self.on_requester_left: RequesterLeftHandler | None = None
        self.on_lost: Callable[[], None] | None = None

    @property
    def is_open(self) -> bool:
        """Whether the session is connected now."""
        return self._session is not None and not self._session.closed.is_set()

    async def ensure(self) -> Transport:
        """The open session, connecting (and installing the broker) if needed."""
        if self._closed:
            raise ClientClosedError("this request plane is closed (its client or worker closed)")
        if self._session is not None and not self._session.closed.is_set():
            return self._session
        async with self._connecting:
            if self._session is not None and not self._session.closed.is_set():
                return self._session
            try:
                await self.registry.ensure_broker()
                session = await transport.connect(
                    self.registry.address,
                    Rpc.SESSION,
                    self._on_message,
                    requester=self.requester,
                    connection_args=self.connection_args,
                    timeout=get_seconds("tdask.data-plane.connect-timeout"),
                    kind="scheduler",
                    name=f"tdask-session-{self.requester}",
                    worker=self.worker,
                )
            except OSError as exc:
                raise SchedulerLostError(
                    f"cannot open a session with tdask's broker on the scheduler at {self.registry.address}: {exc}"
                ) from None
            self._session = session
            self._reader = asyncio.create_task(self._read(session))
            return session

    def send(self, message: dict[str, Any]) -> None:
        """Send on the open session; ``CommClosedError`` when there is none."""
        session = self._session
        if session is None or session.closed.is_set():
            raise CommClosedError("the tdask session to the scheduler is closed")
        session.send(message)

    async def _read(self, session: Transport) -> None:
        await session.read_forever()
        logger.debug("tdask session %s to the scheduler closed", self.requester)
        self.registry.broker_lost()  # a scheduler that comes back must get the broker again
        if self.on_lost is not None:
            self.on_lost()

    def _on_message(self, message: dict[str, Any]) -> None:
        op = protocol.check_message(message)
        if op == Op.REPLIES:
            if self.on_replies is not None:
                self.on_replies(message["replies"])
        elif op == Op.REQUESTS:
            if self.on_requests is not None:
                self.on_requests(message["operator"], message["requests"])
        elif op == Op.WITHDRAW:
            if self.on_withdraw is not None:
                self.on_withdraw(message["keys"])
        elif op == Op.REQUESTER_LEFT:
            if self.on_requester_left is not None:
                self.on_requester_left(message["requester"])
        else:
            logger.warning("tdask session %s: unexpected %r from the broker", self.requester, op)

    async def aclose(self) -> None:
        """Close the session (idempotent)."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


class QueueRequestPlane(RequestPlane):
    """Caller plane through the scheduler's broker (``tdask.request.plane: queue``).

    Global load balancing (the broker pushes each request to the host with the most free
    slots), at the cost of two more process crossings per hop than the direct plane.

    Parameters
    ----------
    broker
        This process's session with the broker.
    """

    def __init__(self, broker: BrokerSession) -> None:
        self.broker = broker
        self.registry = broker.registry
        self.requester = broker.requester
        self._streams: dict[str, ResponseStream] = {}
        self._answered: set[str] = set()  # operators this caller has been answered by
        self.owner_closing: Callable[[], bool] = lambda: False
        # Replies nobody waits for (their request was cancelled): the worker host releases
        # the tensors they refer to.
        self.on_orphan: Callable[[ResponseMsg], None] | None = None
        broker.on_replies = self._on_replies
        broker.on_lost = self._on_lost

    async def submit(self, request: RequestMsg, stream: ResponseStream | None = None) -> ResponseStream:
        """Queue ``request`` at the broker; its replies arrive on the returned stream."""
        request_id = request["id"]
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if request.get("target") is not None:
            raise InvalidRequestError(
                f"target={request['target']!r}: the queue plane routes by load only and cannot send a request "
                "to a chosen worker (use tdask.request.plane: direct, the default)",
                operator=request["operator"],
                request_id=request_id,
            )
        session = await self.broker.ensure()
        stream = stream or ResponseStream(request_id)
        self._streams[request_id] = stream
        request["requester"] = self.requester
        if request["operator"] in self._answered:
            request["hosted_before"] = True  # after a scheduler restart, wait for its host to rejoin
        session.send(protocol.submit(request))
        return stream

    def _on_replies(self, replies: list[ResponseMsg]) -> None:
        for reply in replies:
            stream = self._streams.get(reply["id"])
            if stream is None:
                if self.on_orphan is not None:
                    self.on_orphan(reply)
                continue
            if reply["final"]:
                del self._streams[reply["id"]]
                if reply["error"] is None and reply["operator"]:
                    self._answered.add(reply["operator"])
            stream.deliver(reply)

    async def cancel(self, request_id: str) -> None:
        """Withdraw the request at the broker (never served if queued, cancelled if leased)."""
        if self._streams.pop(request_id, None) is not None and self.broker.is_open:
            self.broker.send(protocol.cancel([request_id]))

    def _on_lost(self) -> None:
        if self.broker._closed or self.owner_closing():
            self._fail_all(ClientClosedError("the client closed while the request was in flight"))
            return
        if self._streams:
            logger.warning(
                "tdask session %s to the scheduler closed with %d requests in flight",
                self.requester,
                len(self._streams),
            )
        self._fail_all(
            SchedulerLostError(
                f"lost the connection to the scheduler at {self.registry.address}, which held the request"
            )
        )

    def _fail_all(self, error: TdaskError) -> None:
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            stream.deliver(protocol.error_reply(request_id, error))

    async def aclose(self) -> None:
        """Close the session; requests in flight fail with :class:`ClientClosedError`."""
        await self.broker.aclose()
        self._fail_all(ClientClosedError("the request plane closed while the request was in flight"))


class QueueServer(ServerPlane):
    """A worker's serving half of the queue plane: registration, credits, leased requests, answers.

    Requests pushed by the broker go to the worker's serving (:meth:`serve`), never more than
    the credits granted: each operator's ``max_inflight`` at :meth:`register`, then one per
    request that leaves its slot (:meth:`freed`).
    """

    counts_slots = True

    def __init__(self, broker: BrokerSession) -> None:
        if broker.worker is None:
            raise ValueError("a QueueServer needs a worker's broker session")
        self.broker = broker
        self.worker = broker.worker
        self._admission: Admission | None = None

    def serve(self, admission: Admission) -> None:
        """Hand the broker's pushes to ``admission``; withdrawn requests are cancelled there."""
        self._admission = admission
        self.broker.on_requests = self._on_requests
        self.broker.on_withdraw = admission.cancel

    def _on_requests(self, operator_key: str, requests: list[RequestMsg]) -> None:
        # Refused ones (the worker is stopping) stay leased here: handed back at unregister.
        if self._admission is not None:
            self._admission.admit(self, operator_key, requests)

    async def register(
        self,
        operators: list[dict[str, Any]],
        failures: dict[str, str],
        *,
        on_requester_left: RequesterLeftHandler,
    ) -> None:
        """Announce the operators this worker serves (and those whose setup failed here); grant their slots."""
        self.broker.on_requester_left = on_requester_left
        await self.broker.ensure()  # pushes need the session before the first grant
        await self.broker.registry.register(self.worker, self.broker.requester, operators, failures)
        for info in operators:
            self._grant(info["key"], info["max_inflight"])

    def _grant(self, operator_key: str, n: int) -> None:
        """Allow ``n`` more requests of ``operator_key`` to be pushed to this worker."""
        if n > 0 and self.broker.is_open:
            self.broker.send(protocol.credit(operator_key, n))

    def freed(self, operator_key: str, n: int) -> None:
        """``n`` of the broker's requests left their slots: give that many credits back."""
        self._grant(operator_key, n)

    async def answer(self, response: ResponseMsg) -> None:
        """Send a response to the broker (which relays it to its requester)."""
        self.broker.send(protocol.respond([response]))

    def forget(self, keys: list[RequestKey]) -> None:
        """Nothing to forget: the broker dropped the lease of a request it withdrew."""

    def hand_back(self, keys: list[RequestKey] | None = None) -> bool:
        """Keep them: the broker takes its leases back when this worker unregisters."""
        return False

    def report(self, stats: dict[str, Any], host: dict[str, Any] | None = None) -> None:
        """Publish this worker's serving counters and metrics (the scheduler's ``/metrics`` and ``/tdask``)."""
        if self.broker.is_open:
            self.broker.send(protocol.stats(stats, host))

    async def unregister(
        self, *, release_leases: bool, operators: list[str] | None = None, removing: bool = True
    ) -> None:
        """Stop being given requests; with ``release_leases``, hand back what this worker holds.

        ``operators``: only for these keys (the others this worker hosts go on); ``removing``:
        see :meth:`tdask.request_plane.registry.Registry.unregister`.
        """
        await self.broker.registry.unregister(
            self.worker, release_leases=release_leases, operators=operators, removing=removing
        )
