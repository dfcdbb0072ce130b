"""The request plane: per-operator request queues on the scheduler, with leases.

Callers never see this module; they use :class:`tdask.RemoteOperator`, which talks to a
:class:`RequestPlane`. The one implementation today, :class:`QueueRequestPlane`, keeps one queue
per operator ``name/version`` in a scheduler extension (:class:`RequestBroker`), in the spirit of
``distributed.Queue``, consumed only by the workers hosting that operator.

Why not ``distributed.Queue`` itself: its ``get`` is not cancelled when the consumer's connection
drops, so a worker that dies while waiting still takes the next item, which is then lost; and it
does not know which worker holds which item. The broker adds exactly that: a request handed to a
worker is *leased* to it until its final response; when the worker leaves, its leases are
re-queued (bounded retries) or answered with :class:`~tdask.exceptions.WorkerLostError`.

Transport: every requester (a client, or a worker calling operators) and every serving worker
keeps one *session*, a long-lived Dask comm to the scheduler carrying one-way messages both ways
(written as soon as they are queued, several per write when they pile up). Workers grant
*credits* (free request slots) per operator; the broker pushes queued requests to the host with
the most credits, and pushes responses to their requester. A hop thus costs four one-way messages
instead of four request/response RPCs with long-poll re-arming (measured: about half the CPU).
Registry calls (register, hosts, ...) stay plain RPCs.

Everything passes through the scheduler, so messages carry small tensors and descriptors only
(see :mod:`tdask.data_plane`), never large tensors.

Message shapes (msgpack-friendly dicts):

- request: ``id, requester, operator (name/version key), name, parameters, inputs, deadline
  (epoch seconds or None), attempt, max_retries, host_wait_s, rehost_wait_s``
- response: ``id, requester, operator, worker, outputs, parameters, error (dict or None), final``
- session messages (``op``): to the broker ``submit``, ``cancel``, ``credit``, ``respond``; from
  it ``requests`` (to a worker), ``replies`` (to a requester), ``cancel`` (to a worker).
"""

from __future__ import annotations

import abc
import asyncio
import html
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from distributed.comm import connect
from distributed.comm.core import CommClosedError
from distributed.core import rpc
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from tornado import web

from tdask.config import get_seconds
from tdask.data_plane import DataPlanePeer, RemoteTensor
from tdask.exceptions import OperatorUnavailableError, RequestTimeoutError, TdaskError, WorkerLostError, error_to_msg
from tdask.wire import MessageTooLargeError, WireSession, open_session, wire_ssl_context, wire_wanted

logger = logging.getLogger(__name__)

BROKER_NAME = "tdask-request-broker"

RequestsHandler = Callable[[str, list[dict[str, Any]]], None]
CancelHandler = Callable[[list[list[str]]], None]
RequesterLeftHandler = Callable[[str], None]


class RequestPlane(abc.ABC):
    """How requests reach operators and responses come back; one object per requester."""

    # -- caller side --
    @abc.abstractmethod
    async def submit(self, request: dict[str, Any]) -> ResponseStream:
        """Send ``request``; its responses arrive on the returned stream, the last one final."""

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None:
        """Withdraw a request: never served if still queued, operator told if running."""

    @abc.abstractmethod
    async def hosts(self, operator_key: str) -> list[str]:
        """Addresses of the workers hosting ``operator_key`` now."""

    # -- serving side --
    @abc.abstractmethod
    async def register(
        self,
        worker: str,
        operators: list[dict[str, Any]],
        failures: dict[str, str],
        *,
        on_requests: RequestsHandler,
        on_cancel: CancelHandler,
        on_requester_left: RequesterLeftHandler | None = None,
    ) -> None:
        """Announce the operators ``worker`` serves (and those whose setup failed there).

        Requests for them arrive through ``on_requests(operator_key, requests)``, never more
        than granted with :meth:`grant`; cancellations through ``on_cancel([[requester, id]])``;
        ``on_requester_left(requester)`` when the scheduler saw a client close.
        """

    @abc.abstractmethod
    def grant(self, operator_key: str, n: int) -> None:
        """Allow ``n`` more requests of ``operator_key`` to be handed to this worker."""

    @abc.abstractmethod
    def respond(self, responses: list[dict[str, Any]]) -> None:
        """Deliver responses to their requesters; a final one ends the request's lease."""

    @abc.abstractmethod
    async def unregister(self, worker: str, *, release_leases: bool) -> None:
        """Stop giving ``worker`` requests; with ``release_leases``, re-queue what it holds."""

    def report(self, stats: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Publish this worker's serving counters (for the scheduler's ``/tdask`` page)."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Close the session; requests still in flight fail."""


def error_reply(
    request_id: str,
    error: BaseException | dict[str, Any],
    *,
    requester: str | None = None,
    operator: str | None = None,
    worker: str | None = None,
) -> dict[str, Any]:
    """A final response carrying only ``error`` (an exception, or an already encoded one)."""
    return {
        "id": request_id,
        "requester": requester,
        "operator": operator,
        "worker": worker,
        "outputs": {},
        "parameters": {},
        "error": error if isinstance(error, dict) else error_to_msg(error),
        "final": True,
    }


class ResponseStream:
    """Responses of one request, in order; ends after the final one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._ready: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.done = False

    def _deliver(self, response: dict[str, Any]) -> None:
        self._ready.append(response)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> dict[str, Any]:
        """The next response (raises ``StopAsyncIteration`` after the final one)."""
        if self.done:
            raise StopAsyncIteration
        while not self._ready:
            # A bare future, not a queue: this is on every request's path.
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        response = self._ready.popleft()
        if response.get("final"):
            self.done = True
        return response

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self.next()


class Session:
    """One comm carrying one-way messages both ways: a writer task batches what is queued,
    a reader task hands every incoming message to ``on_message``."""

    def __init__(self, comm: Any, on_message: Callable[[dict[str, Any]], None], name: str) -> None:
        self.comm = comm
        self.name = name
        self._on_message = on_message
        self._outbox: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self.closed = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def send(self, message: dict[str, Any]) -> None:
        if self.closed.is_set():
            raise CommClosedError(f"tdask session {self.name} is closed")
        self._outbox.append(message)
        self._wake.set()

    async def _write_forever(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._outbox = self._outbox, []
                if batch:
                    # Packed here, once: handed a nested message, distributed would walk it
                    # with sizeof to decide on offloading (35 us per reply, measured) and
                    # again to encode it; a bytes message costs it neither.
                    await self.comm.write(msgpack.packb(batch, use_bin_type=True))
        except (CommClosedError, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("tdask session %s: writing failed", self.name)
        finally:
            self.closed.set()

    async def read_forever(self) -> None:
        """Deliver incoming messages until the comm closes."""
        try:
            while not self.closed.is_set():
                messages = await self.comm.read()
                if isinstance(messages, bytes):
                    messages = msgpack.unpackb(messages, raw=False, use_list=False, strict_map_key=False)
                for message in messages if isinstance(messages, (list, tuple)) else [messages]:
                    try:
                        self._on_message(message)
                    except Exception:
                        logger.exception("tdask session %s: handling %s failed", self.name, message.get("op"))
        except (CommClosedError, OSError):
            pass
        finally:
            await self.close()

    async def drain(self) -> None:
        """Nothing to wait for: the writer task awaits Dask's comm itself."""

    def abort(self) -> None:
        self.closed.set()
        self._writer.cancel()
        self.comm.abort()

    async def close(self) -> None:
        self.closed.set()
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        if not self.comm.closed():
            await self.comm.close()


# What carries a direct-plane caller's messages to one worker: a Dask comm, or tdask's wire.
DirectSession = Session | WireSession


class QueueRequestPlane(RequestPlane):
    """Request plane over the scheduler's :class:`RequestBroker`.

    ``scheduler`` is an RPC to the scheduler (``client.scheduler`` or ``worker.scheduler``),
    used for registry calls; the session is a comm of its own, opened on first use with
    ``connection_args`` (the client's or worker's, so TLS works). ``requester`` names this
    requester; ``worker`` is the serving worker's address, when there is one.
    """

    def __init__(
        self,
        scheduler: Any,
        requester: str,
        *,
        worker: str | None = None,
        connection_args: dict[str, Any] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.requester = requester
        self.worker = worker
        self.connection_args = connection_args or {}
        self._streams: dict[str, ResponseStream] = {}
        self._session: Session | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._broker_ready = False
        self._closed = False
        # Set by a Client's endpoint: once its client closes, nothing is sent again.
        self.owner_closing: Callable[[], bool] = lambda: False
        self._on_requests: RequestsHandler | None = None
        self._on_cancel: CancelHandler | None = None
        self._on_requester_left: RequesterLeftHandler | None = None
        self.on_orphan_response: Callable[[dict[str, Any]], None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._hosts: dict[str, tuple[float, list[str]]] = {}

    async def ensure_broker(self) -> None:
        """Install the broker on the scheduler once (idempotent across clients and workers)."""
        if not self._broker_ready:
            await self.scheduler.register_scheduler_plugin(
                plugin=dumps(RequestBroker()), name=BROKER_NAME, idempotent=True
            )
            self._broker_ready = True

    async def _ensure_session(self) -> Session:
        if self._closed:
            raise RuntimeError("this request plane is closed")
        if self._session is not None and not self._session.closed.is_set():
            return self._session
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._session is not None and not self._session.closed.is_set():
                return self._session
            await self.ensure_broker()
            comm = await connect(self.scheduler.address, **self.connection_args)
            comm.name = f"tdask-session-{self.requester}"
            await comm.write(
                {"op": "tdask_session", "requester": self.requester, "worker": self.worker, "reply": False}
            )
            session = Session(comm, self._on_message, self.requester)
            self._session = session
            self._reader = asyncio.create_task(self._read(session))
            return session

    async def _read(self, session: Session) -> None:
        await session.read_forever()
        if not self._closed and self._streams:
            logger.warning(
                "tdask session %s to the scheduler closed with %d requests in flight",
                self.requester,
                len(self._streams),
            )
        else:
            logger.debug("tdask session %s closed", self.requester)
        self._fail_all("lost the connection to the scheduler")

    def _on_message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "replies":
            for reply in message["replies"]:
                stream = self._streams.get(reply["id"])
                if stream is None:
                    if self.on_orphan_response is not None:
                        self.on_orphan_response(reply)
                    continue
                if reply.get("final"):
                    del self._streams[reply["id"]]
                stream._deliver(reply)
        elif op == "requests" and self._on_requests is not None:
            self._on_requests(message["operator"], message["requests"])
        elif op == "cancel" and self._on_cancel is not None:
            self._on_cancel(message["keys"])
        elif op == "requester-left" and self._on_requester_left is not None:
            self._on_requester_left(message["requester"])

    async def submit(self, request: dict[str, Any]) -> ResponseStream:
        session = await self._ensure_session()
        request_id = request["id"]
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = ResponseStream(request_id)
        self._streams[request_id] = stream
        request["requester"] = self.requester
        session.send({"op": "submit", "request": request})
        return stream

    def forget(self, request_id: str) -> None:
        """Stop routing responses of ``request_id`` (after its final one, or when abandoned)."""
        self._streams.pop(request_id, None)

    async def cancel(self, request_id: str) -> None:
        self.forget(request_id)
        session = self._session
        if session is not None and not session.closed.is_set():
            session.send({"op": "cancel", "request_ids": [request_id]})

    async def hosts(self, operator_key: str) -> list[str]:
        """Hosts of ``operator_key``, as the registry said at most a second ago."""
        now = time.monotonic()
        cached = self._hosts.get(operator_key)
        if cached is not None and now - cached[0] <= 1.0:
            return cached[1]
        await self.ensure_broker()
        hosts = await self.scheduler.tdask_hosts(operator=operator_key)
        if hosts:  # an empty answer is asked again next time
            self._hosts[operator_key] = (now, hosts)
        return hosts

    def forget_hosts(self, operator_key: str) -> None:
        """Drop the cached hosts of ``operator_key`` (one of them could not be reached)."""
        self._hosts.pop(operator_key, None)

    async def operators(self) -> dict[str, Any]:
        """The registry: which workers host which operator, and recorded setup failures."""
        await self.ensure_broker()
        return await self.scheduler.tdask_operators()

    async def register(
        self,
        worker: str,
        operators: list[dict[str, Any]],
        failures: dict[str, str],
        *,
        on_requests: RequestsHandler,
        on_cancel: CancelHandler,
        on_requester_left: RequesterLeftHandler | None = None,
    ) -> None:
        self._on_requests = on_requests
        self._on_cancel = on_cancel
        self._on_requester_left = on_requester_left
        await self._ensure_session()  # pushes need the session before the first grant
        await self.scheduler.tdask_register(
            worker=worker, requester=self.requester, operators=operators, failures=failures
        )

    def grant(self, operator_key: str, n: int) -> None:
        if n > 0 and self._session is not None and not self._session.closed.is_set():
            self._session.send({"op": "credit", "operator": operator_key, "n": n})

    def respond(self, responses: list[dict[str, Any]]) -> None:
        if self._session is None or self._session.closed.is_set():
            raise CommClosedError("the tdask session to the scheduler is closed")
        self._session.send({"op": "respond", "responses": responses})

    async def unregister(self, worker: str, *, release_leases: bool) -> None:
        await self.scheduler.tdask_unregister(worker=worker, release_leases=release_leases)

    def report(self, stats: dict[str, Any]) -> None:
        if self._session is not None and not self._session.closed.is_set():
            self._session.send({"op": "stats", "stats": stats})

    def _fail_all(self, message: str) -> None:
        for request_id, stream in list(self._streams.items()):
            stream._deliver(error_reply(request_id, {"type": "TdaskError", "message": message}))
        self._streams.clear()

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._fail_all("the request plane was closed")


class DirectRequestPlane(QueueRequestPlane):
    """Requests go straight to a worker hosting the operator, over this caller's own comm to it.

    The scheduler keeps its role as registry (which workers host what) and as fallback: a
    request for an operator nobody hosts yet, or refused by the chosen worker, goes through the
    broker's queue (which waits for a host and fails clearly after its bound). Each request goes
    to the host with the fewest of this caller's requests in flight (round robin among equals);
    the worker runs at most ``max_inflight_requests`` and queues the rest in arrival order. The
    caller holds the lease: if its comm to the worker closes (the worker died), the requests it
    held are sent again elsewhere (bounded by ``max_retries``) or fail with WorkerLostError.

    Compared with the queue plane, a hop crosses two processes instead of four; load balancing
    is per caller instead of global. Chosen with ``tdask.request.plane: direct``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._workers: dict[str, DirectSession] = {}
        self._connecting_to: dict[str, asyncio.Lock] = {}
        self._outstanding: dict[str, tuple[str, dict[str, Any], bool]] = {}  # id -> (worker, request, partial)
        self._load: dict[str, int] = defaultdict(int)
        self._ticks = 0
        self._last_used: dict[str, int] = {}
        self._lost: dict[str, float] = {}  # worker -> when its comm closed: avoided for a while

    async def _worker_session(self, address: str) -> DirectSession:
        session = self._workers.get(address)
        if session is not None and not session.closed.is_set():
            return session
        lock = self._connecting_to.setdefault(address, asyncio.Lock())
        async with lock:
            session = self._workers.get(address)
            if session is not None and not session.closed.is_set():
                return session
            timeout = get_seconds("tdask.data-plane.connect-timeout")
            session = await self._open_wire(address, timeout)
            if session is None:
                comm = await connect(address, timeout=timeout, **self.connection_args)
                comm.name = f"tdask-direct-{self.requester}"
                await comm.write({"op": "tdask_direct", "requester": self.requester, "reply": False})
                session = Session(comm, lambda message: self._on_worker_message(address, message), address)
            self._workers[address] = session
            task = asyncio.create_task(self._watch_worker(address, session))
            self._background.add(task)  # held until the session ends
            task.add_done_callback(self._background.discard)
            return session

    async def _open_wire(self, address: str, timeout: float | None) -> WireSession | None:
        """The worker's wire session (tdask/wire.py), or None: use Dask's comm.

        A worker that cannot be asked raises (it is unreachable); one whose wire cannot be
        reached (a firewall that only opens the worker's port) is reached over Dask's comm.
        """
        if not wire_wanted(address):
            return None
        async with rpc(address, timeout=timeout, connection_args=self.connection_args) as worker:
            wire = await worker.tdask_wire_address()
        if not wire:
            return None
        try:
            return await open_session(
                wire,
                self.requester,
                lambda message: self._on_worker_message(address, message),
                timeout=timeout,
                ssl_context=wire_ssl_context(address, self.connection_args),
            )
        except (OSError, TimeoutError) as exc:
            logger.warning("cannot reach the wire of %s at %s (%s); using Dask's comm instead", address, wire, exc)
            return None

    async def submit(self, request: dict[str, Any]) -> ResponseStream:
        request_id = request["id"]
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        hosts = await self.hosts(request["operator"])
        if not hosts:
            return await super().submit(request)  # the broker waits for a host, or fails clearly
        stream = ResponseStream(request_id)
        self._streams[request_id] = stream
        request["requester"] = self.requester
        try:
            sent = await self._send_direct(request, hosts)
        except MessageTooLargeError:  # remote.py reports it as an InvalidRequestError
            del self._streams[request_id]
            raise
        if not sent:
            del self._streams[request_id]
            return await super().submit(request)
        return stream

    async def _send_direct(self, request: dict[str, Any], hosts: list[str]) -> bool:
        now = time.monotonic()
        # A worker whose comm just closed is most likely dead: the registry may list it until
        # the scheduler notices, and dialing it would stall for the connect timeout.
        candidates = [h for h in hosts if now - self._lost.get(h, -1e9) > 10.0]
        while candidates:
            worker = min(candidates, key=lambda w: (self._load[w], self._last_used.get(w, 0)))
            # Count it before awaiting the connection, so that concurrent submits spread.
            self._ticks += 1
            self._last_used[worker] = self._ticks
            self._load[worker] += 1
            try:
                session = await self._worker_session(worker)
                await session.drain()
                session.send({"op": "submit", "request": request})
            except MessageTooLargeError:
                self._load[worker] -= 1
                raise
            except (OSError, CommClosedError) as exc:
                self._load[worker] -= 1
                logger.info("cannot reach %s for %s: %s", worker, request["operator"], exc)
                self._lost[worker] = time.monotonic()
                self.forget_hosts(request["operator"])
                candidates = [c for c in candidates if c != worker]
                continue
            self._outstanding[request["id"]] = (worker, request, False)
            return True
        return False

    def _on_worker_message(self, worker: str, message: dict[str, Any]) -> None:
        if message["op"] == "refused":  # the worker stopped hosting it: go through the broker
            entry = self._outstanding.pop(message["id"], None)
            if entry is not None:
                self._load[worker] -= 1
                self.forget_hosts(entry[1]["operator"])
                task = asyncio.create_task(self._via_broker(entry[1]))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return
        for reply in message.get("replies", ()):
            entry = self._outstanding.get(reply["id"])
            if entry is not None:
                if reply.get("final"):
                    del self._outstanding[reply["id"]]
                    self._load[worker] -= 1
                else:
                    self._outstanding[reply["id"]] = (entry[0], entry[1], True)
        self._on_message(message)

    async def _via_broker(self, request: dict[str, Any]) -> None:
        stream = self._streams.get(request["id"])
        if stream is None:
            return
        session = await self._ensure_session()
        session.send({"op": "submit", "request": request})

    async def _watch_worker(self, worker: str, session: DirectSession) -> None:
        """Read the worker's answers; when its comm closes, re-send what it held (bounded)."""
        await session.read_forever()
        if self._workers.get(worker) is session:
            del self._workers[worker]
        closing = self._closed or self.owner_closing()
        if not closing:
            self._lost[worker] = time.monotonic()
        held = [(rid, entry) for rid, entry in self._outstanding.items() if entry[0] == worker]
        for request_id, (_, request, partial) in held:
            del self._outstanding[request_id]
            self._load[worker] -= 1
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            attempt = request.get("attempt", 0)
            if partial or attempt >= request.get("max_retries", 0) or closing:
                if closing:
                    message = "the comm to the worker serving the request closed while this caller was closing"
                elif partial:
                    message = "the worker serving the request died after streaming part of its answer"
                else:
                    message = f"the worker serving the request died and {attempt} retries were used"
                self._streams.pop(request_id, None)
                lost = WorkerLostError(message)
                stream._deliver(error_reply(request_id, lost, worker=worker))
                continue
            request["attempt"] = attempt + 1
            logger.warning("re-sending request %s of %s held by lost worker %s", request_id, request["operator"], worker)
            self.forget_hosts(request["operator"])
            try:
                hosts = await self.hosts(request["operator"])
            except Exception:
                hosts = []
            hosts = [h for h in hosts if h != worker]
            try:
                if not hosts or not await self._send_direct(request, hosts):
                    await self._via_broker(request)
            except Exception as exc:  # e.g. this caller's client is closing: nowhere to send it
                self._streams.pop(request_id, None)
                lost = WorkerLostError(f"the worker serving the request died and it could not be sent again: {exc}")
                stream._deliver(error_reply(request_id, lost, worker=worker))

    async def cancel(self, request_id: str) -> None:
        entry = self._outstanding.pop(request_id, None)
        if entry is None:
            await super().cancel(request_id)
            return
        self.forget(request_id)
        self._load[entry[0]] -= 1
        session = self._workers.get(entry[0])
        if session is not None and not session.closed.is_set():
            session.send({"op": "cancel", "request_ids": [request_id]})

    async def aclose(self) -> None:
        self._closed = True
        for session in list(self._workers.values()):
            await session.close()
        await super().aclose()


def make_request_plane(*args: Any, **kwargs: Any) -> QueueRequestPlane:
    """The request plane chosen by ``tdask.request.plane`` (``queue`` or ``direct``)."""
    import dask.config

    kind = dask.config.get("tdask.request.plane", "direct")
    if kind == "direct":
        return DirectRequestPlane(*args, **kwargs)
    if kind != "queue":
        raise ValueError(f"tdask.request.plane must be 'queue' or 'direct', got {kind!r}")
    return QueueRequestPlane(*args, **kwargs)


# -- scheduler side ------------------------------------------------------------------------


@dataclass
class _Lease:
    request: dict[str, Any]
    worker: str
    partial: bool = False  # a non-final response went out: re-serving would duplicate it


@dataclass
class _Peer:
    """A connected requester (and, when ``worker`` is set, a serving worker)."""

    requester: str
    worker: str | None
    session: Session


class RequestBroker(SchedulerPlugin):
    """Scheduler extension holding request queues, leases, sessions and the operator registry.

    All methods run on the scheduler's event loop, so no locking is needed. RPC handlers:
    ``tdask_register/unregister/hosts/operators``; ``tdask_session`` opens a session.
    """

    name = BROKER_NAME
    idempotent = True

    def __init__(self) -> None:
        self.queues: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self.hosts: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.credits: dict[str, dict[str, int]] = defaultdict(dict)
        self.last_used: dict[str, dict[str, int]] = defaultdict(dict)
        self._ticks = 0
        self.failures: dict[str, dict[str, str]] = defaultdict(dict)
        self.leases: dict[tuple[str, str], _Lease] = {}
        self.peers: dict[str, _Peer] = {}  # requester id -> peer
        self.serving: dict[str, _Peer] = {}  # worker address -> its serving peer
        self.counts: dict[str, int] = defaultdict(int)
        # worker -> its serving counters per operator, as it last reported them (all planes)
        self.worker_stats: dict[str, dict[str, Any]] = {}
        self._checker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "tdask_session": self.session,
                "tdask_register": self.register,
                "tdask_unregister": self.unregister,
                "tdask_hosts": self.get_hosts,
                "tdask_operators": self.get_operators,
            }
        )
        self._checker = asyncio.create_task(self._check_forever())
        app = getattr(scheduler, "http_application", None)
        if app is not None:  # next to the dashboard: /tdask (a page) and /tdask/operators.json
            routes = [(r"/tdask/operators.json", _RegistryJSON), (r"/tdask/?", _RegistryPage)]
            app.add_handlers(r".*", [(path, cls, {"broker": self}) for path, cls in routes])

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
        for peer in list(self.peers.values()):
            await peer.session.close()

    # sessions
    async def session(self, comm: Any, requester: str, worker: str | None = None) -> None:
        """Serve one requester's (or worker's) session until its comm closes."""
        session = Session(comm, lambda message: self._on_message(requester, message), requester)
        peer = _Peer(requester, worker, session)
        old = self.peers.get(requester)
        self.peers[requester] = peer
        if worker is not None:
            self.serving[worker] = peer
        if old is not None:
            await old.session.close()
        try:
            await session.read_forever()
        finally:
            if self.peers.get(requester) is peer:
                del self.peers[requester]
                self._requester_left(requester)
            if worker is not None and self.serving.get(worker) is peer:
                del self.serving[worker]
                self.worker_stats.pop(worker, None)
                for credits in self.credits.values():
                    credits.pop(worker, None)

    def _on_message(self, requester: str, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "submit":
            self.submit(message["request"])
        elif op == "respond":
            self.respond(message["responses"])
        elif op == "credit":
            peer = self.peers.get(requester)
            if peer is not None and peer.worker is not None:
                self.credit(peer.worker, message["operator"], message["n"])
        elif op == "cancel":
            self.cancel(requester, message["request_ids"])
        elif op == "stats":
            peer = self.peers.get(requester)
            if peer is not None and peer.worker is not None and peer.worker in self.serving:
                self.worker_stats[peer.worker] = message["stats"]
        else:
            logger.warning("tdask session %s: unknown message %r", requester, op)

    def _push(self, worker: str, message: dict[str, Any]) -> bool:
        peer = self.serving.get(worker)
        if peer is None or peer.session.closed.is_set():
            return False
        peer.session.send(message)
        return True

    # registry
    def register(
        self, worker: str, requester: str, operators: list[dict[str, Any]], failures: dict[str, str]
    ) -> None:
        for op in operators:
            self.hosts[op["key"]][worker] = op
        for name, message in failures.items():
            self.failures[name][worker] = message
        logger.info(
            "worker %s hosts %s%s",
            worker,
            [op["key"] for op in operators],
            f"; failed: {sorted(failures)}" if failures else "",
        )

    def unregister(self, worker: str, release_leases: bool) -> None:
        for key, hosts in self.hosts.items():
            hosts.pop(worker, None)
            self.credits[key].pop(worker, None)
        if release_leases:
            self._requeue_leases(worker, lost=False)

    def get_hosts(self, operator: str) -> list[str]:
        return list(self.hosts.get(operator, {}))

    def get_operators(self) -> dict[str, Any]:
        return {
            "hosts": {key: sorted(hosts) for key, hosts in self.hosts.items() if hosts},
            "failures": {name: dict(f) for name, f in self.failures.items() if f},
            "queued": {key: len(q) for key, q in self.queues.items() if q},
            "leased": len(self.leases),
            "counts": dict(self.counts),
            "workers": {worker: stats for worker, stats in sorted(self.worker_stats.items())},
        }

    # requests
    def submit(self, request: dict[str, Any]) -> None:
        request["submitted"] = time.time()
        self.counts["submitted"] += 1
        key = request["operator"]
        self.queues[key].append(request)
        self._dispatch(key)

    def credit(self, worker: str, operator: str, n: int) -> None:
        if worker not in self.hosts.get(operator, ()):
            return  # unregistered meanwhile: it takes nothing more
        credits = self.credits[operator]
        credits[worker] = credits.get(worker, 0) + n
        self._dispatch(operator)

    def _dispatch(self, key: str) -> None:
        """Hand queued requests of ``key`` to hosts with free slots, most free slots first."""
        queue, credits = self.queues[key], self.credits[key]
        if not queue or not credits:
            return
        pushes: dict[str, list[dict[str, Any]]] = defaultdict(list)
        now = time.time()
        last_used = self.last_used[key]
        while queue and credits:
            # Most free slots first; among equals, the one idle longest (round robin).
            worker = max(credits, key=lambda w: (credits[w], -last_used.get(w, 0)))
            self._ticks += 1
            last_used[worker] = self._ticks
            request = queue.popleft()
            if request.get("deadline") is not None and request["deadline"] < now:
                self._answer_error(request, RequestTimeoutError("deadline passed while queued"))
                continue
            self.leases[(request["requester"], request["id"])] = _Lease(request, worker)
            pushes[worker].append(request)
            credits[worker] -= 1
            if credits[worker] <= 0:
                del credits[worker]
        for worker, requests in pushes.items():
            if self._push(worker, {"op": "requests", "operator": key, "requests": requests}):
                self.counts["served"] += len(requests)
                continue
            # Its session is gone (it is leaving): take the requests back, give it no more.
            logger.warning("worker %s has no session; re-queueing %d requests", worker, len(requests))
            for request in reversed(requests):
                del self.leases[(request["requester"], request["id"])]
                queue.appendleft(request)
            credits.pop(worker, None)
        if queue and credits:
            self._dispatch(key)

    def cancel(self, requester: str, request_ids: list[str]) -> None:
        ids = set(request_ids)
        for key, queue in self.queues.items():
            if any(r["requester"] == requester and r["id"] in ids for r in queue):
                self.queues[key] = deque(r for r in queue if not (r["requester"] == requester and r["id"] in ids))
        by_worker: dict[str, list[list[str]]] = defaultdict(list)
        for request_id in ids:
            lease = self.leases.pop((requester, request_id), None)
            if lease is not None:
                by_worker[lease.worker].append([requester, request_id])
        self.counts["cancelled"] += len(ids)
        for worker, keys in by_worker.items():
            self._push(worker, {"op": "cancel", "keys": keys})

    def _requester_left(self, requester: str) -> None:
        """A requester's session closed: nobody waits for its requests any more."""
        queued = [r["id"] for q in self.queues.values() for r in q if r["requester"] == requester]
        leased = [rid for (req, rid) in self.leases if req == requester]
        if queued or leased:
            logger.info("requester %s left; cancelling its %d requests", requester, len(queued) + len(leased))
            self.cancel(requester, queued + leased)

    def respond(self, responses: list[dict[str, Any]]) -> None:
        for response in responses:
            key = (response["requester"], response["id"])
            lease = self.leases.get(key)
            if lease is None or lease.worker != response.get("worker"):
                # Cancelled, timed out, or re-served elsewhere: this answer is stale.
                self.counts["dropped"] += 1
                self._release_refs(response)
                continue
            if response.get("final"):
                del self.leases[key]
                self.counts["answered"] += 1
            else:
                lease.partial = True
            self._reply(response)

    # internals
    def _reply(self, response: dict[str, Any]) -> None:
        peer = self.peers.get(response["requester"])
        if peer is None or peer.session.closed.is_set():
            self.counts["dropped"] += 1
            self._release_refs(response)
            return
        peer.session.send({"op": "replies", "replies": [response]})

    def _answer_error(self, request: dict[str, Any], error: TdaskError, worker: str | None = None) -> None:
        self.counts["failed"] += 1
        self._reply(
            error_reply(
                request["id"], error, requester=request["requester"], operator=request["operator"], worker=worker
            )
        )

    def _release_refs(self, response: dict[str, Any]) -> None:
        """Nobody will read this response: free the tensors it refers to at their owners."""
        refs = [RemoteTensor.from_msg(e["ref"]) for e in (response.get("outputs") or {}).values() if "ref" in e]
        if refs:
            task = asyncio.create_task(DataPlanePeer(self.scheduler.rpc).release(refs))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _requeue_leases(self, worker: str, *, lost: bool) -> None:
        held = [(key, lease) for key, lease in self.leases.items() if lease.worker == worker]
        for key, lease in held:
            del self.leases[key]
            request = lease.request
            name = request["operator"]
            request["submitted"] = time.time()  # its wait for a host starts again
            if not lost:
                self.queues[name].appendleft(request)
                self._dispatch(name)
            elif lease.partial or request.get("attempt", 0) >= request.get("max_retries", 0):
                reason = "after streaming part of its answer" if lease.partial else (
                    f"and {request.get('attempt', 0)} retries were used"
                )
                self._answer_error(
                    request,
                    WorkerLostError(f"the worker serving the request died {reason}"),
                    worker=worker,
                )
            else:
                request["attempt"] = request.get("attempt", 0) + 1
                self.counts["retried"] += 1
                logger.warning(
                    "re-queueing request %s of %s held by lost worker %s (attempt %d)",
                    request["id"],
                    name,
                    worker,
                    request["attempt"],
                )
                self.queues[name].appendleft(request)
                self._dispatch(name)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for key, hosts in self.hosts.items():
            hosts.pop(worker, None)
            self.credits[key].pop(worker, None)
            self.last_used[key].pop(worker, None)
        for failures in self.failures.values():
            failures.pop(worker, None)
        self.serving.pop(worker, None)
        self.worker_stats.pop(worker, None)
        self._requeue_leases(worker, lost=True)

    def remove_client(self, scheduler: Any, client: str) -> None:
        peer = self.peers.get(client)  # a client's requester id is its client id
        if peer is not None:
            task = asyncio.create_task(peer.session.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        # distributed gives a Client no close hook for the comms it did not open itself: the
        # workers close the direct-plane comms this client opened to them.
        for worker in list(self.serving):
            self._push(worker, {"op": "requester-left", "requester": client})

    async def _check_forever(self) -> None:
        """Fail requests queued for an operator nobody hosts, once their wait bound passes."""
        while True:
            await asyncio.sleep(0.1)
            try:
                self._check_unhosted()
            except Exception:
                logger.exception("request broker check failed")

    def _check_unhosted(self) -> None:
        now = time.time()
        for key, queue in self.queues.items():
            if not queue or self.hosts.get(key):
                continue
            name = key.rsplit("/", 1)[0]
            failures = self.failures.get(name) or {}
            kept: deque[dict[str, Any]] = deque()
            # An operator that had hosts (a worker restarting) gets longer to come back than one
            # nobody ever hosted (most likely a wrong name).
            had_hosts = key in self.hosts
            for request in queue:
                waited = now - request["submitted"]
                limit = request.get("rehost_wait_s", 60.0) if had_hosts else request.get("host_wait_s", 10.0)
                if failures or waited >= limit:
                    self._answer_error(request, self._unavailable(key, failures, waited))
                elif request.get("deadline") is not None and request["deadline"] < now:
                    self._answer_error(request, RequestTimeoutError("deadline passed while queued"))
                else:
                    kept.append(request)
            self.queues[key] = kept

    def _unavailable(self, key: str, failures: dict[str, str], waited: float) -> OperatorUnavailableError:
        if failures:
            detail = "; ".join(f"{w}: {m}" for w, m in sorted(failures.items()))
            return OperatorUnavailableError(f"operator {key} failed to start on every worker that hosts it: {detail}")
        known = sorted(k for k, hosts in self.hosts.items() if hosts)
        return OperatorUnavailableError(
            f"no worker hosts operator {key} (waited {waited:.1f}s); hosted operators: {known or 'none'}"
        )


class _RegistryJSON(web.RequestHandler):
    """``/tdask/operators.json``: the registry, queue depths and counters, for tools."""

    def initialize(self, broker: RequestBroker) -> None:
        self.broker = broker

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.broker.get_operators(), indent=1, sort_keys=True))


class _RegistryPage(_RegistryJSON):
    """``/tdask``: which worker hosts which operator, what is queued, what failed."""

    def get(self) -> None:
        state = self.broker.get_operators()
        rows = "".join(
            f"<tr><td>{html.escape(key)}</td><td>{len(hosts)}</td><td>{html.escape(', '.join(hosts))}</td>"
            f"<td>{state['queued'].get(key, 0)}</td></tr>"
            for key, hosts in sorted(state["hosts"].items())
        )
        failures = "".join(
            f"<li>{html.escape(name)} on {html.escape(w)}: {html.escape(m)}</li>"
            for name, by_worker in sorted(state["failures"].items())
            for w, m in sorted(by_worker.items())
        )
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(state["counts"].items()))
        served = "".join(
            f"<tr><td>{html.escape(worker)}</td><td>{html.escape(key)}</td><td>{s.get('started', 0)}</td>"
            f"<td>{s.get('inflight', 0)} / {s.get('limit', 0)}</td><td>{s.get('waiting', 0)}</td></tr>"
            for worker, by_key in state["workers"].items()
            for key, s in sorted(by_key.items())
        )
        self.write(
            "<html><head><title>tdask operators</title><meta http-equiv='refresh' content='2'></head><body>"
            "<h2>tdask operators</h2><table border=1 cellpadding=4>"
            "<tr><th>operator</th><th>workers</th><th>addresses</th><th>queued</th></tr>"
            f"{rows}</table>"
            "<h3>served, by worker (every request plane)</h3><table border=1 cellpadding=4>"
            "<tr><th>worker</th><th>operator</th><th>requests started</th><th>in flight / limit</th>"
            f"<th>waiting for a slot</th></tr>{served}</table>"
            f"<h3>through the scheduler's queues</h3><p>leased (in progress): {state['leased']}</p>"
            f"<p>{html.escape(counts)}</p>"
            + (f"<h3>setup failures</h3><ul>{failures}</ul>" if failures else "")
            + "</body></html>"
        )
