"""The direct plane, both halves: each caller sends requests straight to a worker hosting the operator.

Caller side (:class:`DirectRequestPlane`): the caller's own worker while it has free slots for
this caller, else the host with the fewest of this caller's requests in flight (round robin among
equals), over the caller's own session to it, opened by :func:`tdask.transport.connect` (which
picks the transport: in process to the caller's own worker, tdask's wire on ``tcp://`` and
``tls://`` clusters, else a Dask comm). The scheduler's broker stays the registry and the
fallback: a request for an operator nobody hosts yet, or refused by a worker that is stopping,
goes through the queue plane, which waits for a host and fails clearly after its bound. The
caller holds the lease: when its session to a worker closes (the worker died), the requests it
held there are sent again elsewhere (bounded by ``max_retries``) or fail with
:class:`~tdask.exceptions.WorkerLostError`.

Worker side (:class:`DirectServer`, a :class:`~tdask.request_plane.base.ServerPlane`): accepts
callers' sessions (a :class:`tdask.transport.Listener`), hands their requests to the worker's
serving, routes answers back on the session they came from, and cancels what a caller left
running when its session closes.

Both halves also carry the data calls of :mod:`tdask.request_plane.data_calls` (host tensors
fetched, placed and released on sessions whose transport carries them).

Compared with the queue plane, a hop crosses two processes instead of four; load balancing is
per caller instead of global.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from distributed.comm.core import CommClosedError

from tdask import protocol, transport
from tdask.config import get_seconds
from tdask.data_plane import TensorStore
from tdask.exceptions import ClientClosedError, DataPlaneError, OperatorUnavailableError, TdaskError, WorkerLostError
from tdask.protocol import Op, ProtocolError, RequestMsg, ResponseMsg, Rpc, check_message, check_request
from tdask.request_plane.base import Admission, RequestPlane, ResponseStream, ServerPlane
from tdask.request_plane.data_calls import DataCalls, answer_data_call
from tdask.request_plane.queue import QueueRequestPlane
from tdask.request_plane.registry import Registry
from tdask.transport import Transport, is_gone

logger = logging.getLogger(__name__)

__all__ = ["DirectRequestPlane", "DirectServer", "order_hosts"]

# A worker whose session just closed is most likely dead: the registry may list it until the
# scheduler notices, and dialing it would stall for the connect timeout.
_AVOID_LOST_S = 10.0


class DirectRequestPlane(RequestPlane):
    """Caller plane sending each request straight to a worker (``tdask.request.plane: direct``).

    Parameters
    ----------
    fallback
        The queue plane of this caller (registry and sessions shared), used for requests no
        worker can take directly.
    connection_args
        The client's or worker's ``connection_args`` (TLS).
    """

    def __init__(self, fallback: QueueRequestPlane, *, connection_args: dict[str, Any] | None = None) -> None:
        self.fallback = fallback
        self.registry: Registry = fallback.registry
        self.requester = fallback.requester
        self.connection_args = connection_args or {}
        self.owner_closing: Callable[[], bool] = lambda: False
        self._streams: dict[str, ResponseStream] = {}
        self._workers: dict[str, Transport] = {}
        self._connecting_to: dict[str, asyncio.Lock] = {}
        self._outstanding: dict[str, tuple[str, RequestMsg, bool]] = {}  # id -> (worker, request, partial)
        self._load: dict[str, int] = defaultdict(int)
        self._ticks = 0
        self._last_used: dict[str, int] = {}
        self._lost: dict[str, float] = {}  # worker -> when its session closed: avoided for a while
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.data = DataCalls(self._worker_session, lambda: self._closed)
        self.shortcut = self.data  # host tensors over the workers' wires, where the transport carries them

    # -- sessions --------------------------------------------------------------------------

    async def _worker_session(self, address: str) -> Transport:
        session = self._workers.get(address)
        if session is not None and not session.closed.is_set():
            return session
        lock = self._connecting_to.setdefault(address, asyncio.Lock())
        async with lock:
            session = self._workers.get(address)
            if session is not None and not session.closed.is_set():
                return session
            session = await transport.connect(
                address,
                Rpc.DIRECT,
                lambda message: self._on_worker_message(address, message),
                requester=self.requester,
                connection_args=self.connection_args,
                timeout=get_seconds("tdask.data-plane.connect-timeout"),
                name=f"tdask-direct-{self.requester}",
            )
            self._workers[address] = session
            self._spawn(self._watch_worker(address, session))  # held until the session ends
            return session

    @property
    def on_orphan(self) -> Callable[[ResponseMsg], None] | None:
        """Called with replies nobody waits for (shared with the fallback queue plane)."""
        return self.fallback.on_orphan

    @on_orphan.setter
    def on_orphan(self, handler: Callable[[ResponseMsg], None] | None) -> None:
        self.fallback.on_orphan = handler

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- requests --------------------------------------------------------------------------

    async def submit(self, request: RequestMsg, stream: ResponseStream | None = None) -> ResponseStream:
        """Send ``request`` to a host directly, or through the broker when none can take it."""
        request_id = request["id"]
        if request_id in self._streams or request_id in self.fallback._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        hosts = await self.registry.hosts(request["operator"])
        if not hosts:
            _untarget(request, hosts)
            return await self.fallback.submit(request, stream)  # the broker waits for a host, or fails clearly
        stream = stream or ResponseStream(request_id)
        self._streams[request_id] = stream
        request["requester"] = self.requester
        try:
            sent = await self._send_direct(request, hosts)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        if not sent:  # every host known here refused or is gone: the broker waits for a new one
            del self._streams[request_id]
            request["hosted_before"] = True
            _untarget(request, hosts)
            return await self.fallback.submit(request, stream)
        return stream

    async def _send_direct(self, request: RequestMsg, hosts: list[str]) -> bool:
        now = time.monotonic()
        candidates = [h for h in hosts if now - self._lost.get(h, -1e9) > _AVOID_LOST_S and not is_gone(h)]
        target = request.get("target")
        ordered = False  # True: try the candidates in their order (a target, or the operator's policy)
        if target is not None:  # the caller chose a worker (RemoteOperator.infer(target=...))
            if target not in hosts:  # a worker name rather than an address?
                target = self.registry.address_of(request["operator"], target) or target
            if target in candidates:
                candidates = [target]
                ordered = True
            elif request.get("target_lost") != "fallback":
                raise OperatorUnavailableError(
                    f"target worker {request['target']} does not host {request['operator']} "
                    f"(its hosts: {sorted(hosts)})",
                    operator=request["operator"],
                    request_id=request["id"],
                )
        else:
            policy = self.registry.routing(request["operator"])  # None (least-loaded) unless declared
            if policy is not None:
                ordered = order_hosts(policy, candidates, request.get("parameters"))
        message = protocol.submit(request)
        while candidates:
            if ordered or len(candidates) == 1:
                worker = candidates[0]
            else:
                worker = self._own_worker(request["operator"], candidates) or min(
                    candidates, key=lambda w: (self._load[w], self._last_used.get(w, 0))
                )
            # Count it before awaiting the connection, so that concurrent submits spread.
            self._ticks += 1
            self._last_used[worker] = self._ticks
            self._load[worker] += 1
            try:
                session = await self._worker_session(worker)
                await session.drain()  # a worker that reads slower than we send slows us down
                session.send(message)
            except (OSError, CommClosedError) as exc:
                self._load[worker] -= 1
                logger.info("cannot reach %s for request %s of %s: %s", worker, request["id"], request["operator"], exc)
                self._lost[worker] = time.monotonic()
                self.registry.forget_hosts(request["operator"])
                candidates = [c for c in candidates if c != worker]
                continue
            except BaseException:
                self._load[worker] -= 1
                raise
            self._outstanding[request["id"]] = (worker, request, False)
            return True
        return False

    def _own_worker(self, operator: str, candidates: list[str]) -> str | None:
        """The caller's own worker among ``candidates``, while it has free slots for this caller.

        Free: this caller holds fewer of its calls there than the operator's slots on it (its
        ``max_inflight_requests``). A call to the own worker needs no socket; one past its slots
        would only wait there, so the least loaded host takes it instead.
        """
        for worker in candidates:
            if transport.in_process(worker):
                return worker if self._load[worker] < max(1, self.registry.slots(operator, worker)) else None
        return None

    def _on_worker_message(self, worker: str, message: dict[str, Any]) -> None:
        op = check_message(message)
        if op == Op.DATA_REPLY:
            self.data.on_reply(worker, message)
            return
        if op == Op.REFUSED:
            # The worker does not (or no longer) host it: it is leaving. Another host takes the
            # request; that spends no retry (the worker never ran it).
            entry = self._outstanding.pop(message["id"], None)
            if entry is not None:
                self._load[worker] -= 1
                self._lost[worker] = time.monotonic()
                self.registry.forget_hosts(entry[1]["operator"])
                self._spawn(self._resend(entry[1], exclude=worker))
            return
        if op != Op.REPLIES:
            logger.warning("direct session to %s: unexpected %r", worker, op)
            return
        for reply in message["replies"]:
            request_id = reply["id"]
            entry = self._outstanding.get(request_id)
            if entry is not None:
                if reply["final"]:
                    del self._outstanding[request_id]
                    self._load[worker] -= 1
                else:
                    self._outstanding[request_id] = (entry[0], entry[1], True)
            stream = self._streams.get(request_id)
            if stream is None:
                if self.on_orphan is not None:
                    self.on_orphan(reply)  # nobody waits for it: free what it refers to
                continue
            if reply["final"]:
                del self._streams[request_id]
            stream.deliver(reply)

    def _fail(self, request: RequestMsg, error: TdaskError, worker: str | None = None) -> None:
        stream = self._streams.pop(request["id"], None)
        if stream is not None:
            stream.deliver(protocol.error_reply(request["id"], error, worker=worker))

    async def _resend(self, request: RequestMsg, exclude: str) -> None:
        """Send ``request`` again, straight to another live host, else through the broker."""
        if request["id"] not in self._streams:
            return  # cancelled meanwhile
        try:
            hosts = [h for h in await self.registry.hosts(request["operator"]) if h != exclude]
            if not hosts or not await self._send_direct(request, hosts):
                await self._via_broker(request)
        except TdaskError as exc:  # e.g. the scheduler is gone too: nowhere to send it
            self._fail(request, exc, exclude)
        except Exception as exc:
            self._fail(request, WorkerLostError(f"the request could not be sent again: {exc}"), exclude)

    async def _via_broker(self, request: RequestMsg) -> None:
        stream = self._streams.pop(request["id"], None)
        if stream is None:
            return
        request["hosted_before"] = True  # it had a host: the broker waits for one to come back
        try:
            _untarget(request, [])
            await self.fallback.submit(request, stream)
        except TdaskError as exc:
            stream.deliver(protocol.error_reply(request["id"], exc))
        except Exception as exc:
            stream.deliver(protocol.error_reply(request["id"], WorkerLostError(f"could not re-send: {exc}")))

    async def _watch_worker(self, worker: str, session: Transport) -> None:
        """When a worker's session closes, re-send what it held (bounded), else fail it.

        A request whose inputs were stored on that worker is not re-sent (its inputs died with
        it): it is answered with :class:`DataPlaneError` at once, and its caller places the
        inputs again and re-sends it, spending no retry on a worker already dead.
        """
        await session.read_forever()
        if self._workers.get(worker) is session:
            del self._workers[worker]
        self.data.worker_lost(worker)  # its unanswered data calls go through Dask's comm instead
        closing = self._closed or self.owner_closing()
        if not closing:
            self._lost[worker] = time.monotonic()
        held = [(rid, entry) for rid, entry in self._outstanding.items() if entry[0] == worker]
        resend = []
        for request_id, (_, request, partial) in held:
            del self._outstanding[request_id]
            self._load[worker] -= 1
            if request_id not in self._streams:
                continue
            attempt = request.get("attempt", 0)
            lost_inputs = [t for t in protocol.refs_in(request.get("inputs")) if t.owner == worker]
            if closing:
                self._fail(request, ClientClosedError("the client closed while the request was in flight"), worker)
            elif partial:
                message = "the worker serving the request died after streaming part of its answer"
                self._fail(request, WorkerLostError(message), worker)
            elif lost_inputs:
                tensor = lost_inputs[0]
                message = f"input tensor {tensor.tensor_id} was stored on {worker}, which died; place it again"
                self._fail(request, DataPlaneError(message, owner=worker, tensor_id=tensor.tensor_id), worker)
            elif attempt >= request.get("max_retries", 0):
                message = f"the worker serving the request died and {attempt} retries were used"
                self._fail(request, WorkerLostError(message), worker)
            else:
                request["attempt"] = attempt + 1
                logger.warning(
                    "re-sending request %s of %s held by lost worker %s", request_id, request["operator"], worker
                )
                self.registry.forget_hosts(request["operator"])
                resend.append(request)
        for request in resend:
            await self._resend(request, exclude=worker)

    async def cancel(self, request_id: str) -> None:
        """Cancel on the worker holding it, or through the broker."""
        entry = self._outstanding.pop(request_id, None)
        if entry is None:
            self._streams.pop(request_id, None)
            await self.fallback.cancel(request_id)
            return
        self._streams.pop(request_id, None)
        self._load[entry[0]] -= 1
        session = self._workers.get(entry[0])
        if session is not None and not session.closed.is_set():
            session.send(protocol.cancel([request_id]))

    async def aclose(self) -> None:
        """Close every worker session; requests in flight fail; then the fallback."""
        self._closed = True
        for session in list(self._workers.values()):
            await session.close()
        await asyncio.gather(*self._background, return_exceptions=True)
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            closed = ClientClosedError("the request plane closed while the request was in flight")
            stream.deliver(protocol.error_reply(request_id, closed))
        await self.fallback.aclose()


def _untarget(request: RequestMsg, hosts: list[str]) -> None:
    """Drop a request's target before it goes through the broker, which routes by load only.

    Raises :class:`OperatorUnavailableError` instead when the caller wanted an error rather
    than another worker (``target_lost="error"``).
    """
    target = request.pop("target", None)
    target_lost = request.pop("target_lost", None)
    if target is not None and target_lost != "fallback":
        raise OperatorUnavailableError(
            f"target worker {target} cannot be reached for {request['operator']} (its hosts: {sorted(hosts)})",
            operator=request["operator"],
            request_id=request["id"],
        )


def order_hosts(policy: dict[str, Any], hosts: list[str], parameters: dict[str, Any] | None) -> bool:
    """Order ``hosts`` in place by an operator's routing policy, best first; False: use least-loaded.

    ``pinned``: sorted, so every caller picks the same first host and fails over to the same
    next one. ``hash``: rendezvous (highest random weight) hashing of the request parameter's
    value with each host, so a key keeps its host while that host is up, and a host leaving (or
    joining) moves only its own keys. A request without the parameter goes least-loaded.
    """
    kind = policy.get("policy")
    if kind == "pinned":
        hosts.sort()
        return True
    if kind == "hash":
        value = (parameters or {}).get(policy["parameter"])
        if value is None:
            return False
        key = repr(value).encode()
        hosts.sort(key=lambda host: hashlib.blake2b(key + b"@" + host.encode(), digest_size=8).digest(), reverse=True)
        return True
    return False


# -- the worker's half ---------------------------------------------------------------------


class DirectServer(ServerPlane):
    """A worker's side of the direct plane: callers' sessions in, answers back on them.

    Sessions arrive through a :class:`tdask.transport.Listener` (the wire and the
    ``tdask_direct`` comm handler, whichever the worker's address allows).

    Parameters
    ----------
    worker
        The Dask worker.
    store
        The worker's tensor store: it answers the callers' data calls (without one, each is
        refused and the caller uses Dask's comm).
    """

    def __init__(self, worker: Any, store: TensorStore | None = None) -> None:
        self.worker = worker
        self.store = store
        self._admission: Admission | None = None
        self.sessions: dict[Transport, str] = {}  # session -> its requester
        self._routes: dict[tuple[str, str], Transport] = {}  # (requester, id) -> where to answer
        self._partial: set[tuple[str, str]] = set()  # routes that carried part of an answer
        self._nested_only = False  # while closing: still accept calls made by requests in flight
        self.listener = transport.Listener(worker, Rpc.DIRECT, self._accept)
        self._serving: set[asyncio.Task[None]] = set()
        self._closing = False

    def serve(self, admission: Admission) -> None:
        """Hand callers' requests to ``admission``; a request it refuses is answered ``refused``."""
        self._admission = admission

    async def start(self) -> None:
        """Accept callers' sessions (on the wire too, where the worker's address allows)."""
        await self.listener.start()

    def _accept(self, session: Transport, hello: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        requester = str(hello["requester"])
        self.sessions[session] = requester  # now: requester_left may come before the task runs
        task = asyncio.create_task(self._watch(session, requester))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        return lambda message: self._on_message(session, requester, message)

    async def _watch(self, session: Transport, requester: str) -> None:
        """Once a caller's session closes: cancel what it left running."""
        try:
            await session.closed.wait()
        finally:
            self.sessions.pop(session, None)
            gone = [key for key, route in self._routes.items() if route is session]
            for key in gone:
                del self._routes[key]
            if gone and not self._closing and self._admission is not None:
                logger.info("direct caller %s left; cancelling its %d requests", requester, len(gone))
                self._admission.cancel([list(key) for key in gone])

    def _on_message(self, session: Transport, requester: str, message: dict[str, Any]) -> None:
        op = check_message(message)
        if op == Op.SUBMIT:
            request = message["request"]
            check_request(request)
            request = dict(request)
            request["requester"] = requester
            key = (requester, request["id"])
            self._routes[key] = session
            closed = self._closing and not (self._nested_only and request.get("nested"))
            admission = self._admission
            if closed or admission is None or not admission.admit(self, request["operator"], [request]):  # type: ignore[list-item]
                # Not (or no longer) ours: say so; the caller goes through the broker instead.
                self._routes.pop(key, None)
                session.send(protocol.refused(request["id"]))
        elif op == Op.CANCEL:
            if self._admission is not None:
                self._admission.cancel([[requester, request_id] for request_id in message["request_ids"]])
        elif op == Op.DATA:
            answer_data_call(self.store, session, message)
        else:
            raise ProtocolError(f"a direct caller may not send {op!r}")

    async def answer(self, response: ResponseMsg) -> None:
        """Send ``response`` on the session its request came on (dropped when there is none any more)."""
        key = (response["requester"] or "", response["id"])
        if response["final"]:
            self._partial.discard(key)
            route = self._routes.pop(key, None)
        else:
            route = self._routes.get(key)
            if route is not None:
                self._partial.add(key)
        if route is None:  # cancelled, its caller gone, or handed back: nobody waits for it
            logger.debug("no session to answer request %s on: dropped", response["id"])
            return
        await route.drain()  # a caller that reads slower than we answer slows us down
        route.send(protocol.replies([response]))

    def forget(self, keys: list[tuple[str, str]]) -> None:
        """Drop the routes of cancelled requests (no answer goes back for them)."""
        for key in keys:
            self._routes.pop(key, None)
            self._partial.discard(key)

    def hand_back(self, keys: list[tuple[str, str]] | None = None) -> bool:
        """Tell callers that this (leaving) worker will not answer these requests (default: all).

        Each gets ``refused``: its caller sends it to another host without spending a retry
        (the worker never ran it, or stopped it unanswered). Requests that already streamed part
        of their answer are not handed back (re-serving would repeat those parts): their
        callers get :class:`~tdask.exceptions.WorkerLostError` when the session closes.
        """
        handed = 0
        for key in list(self._routes) if keys is None else keys:
            if key in self._partial:
                continue
            session = self._routes.pop(key, None)
            if session is None or session.closed.is_set():
                continue
            try:
                session.send(protocol.refused(key[1]))
                handed += 1
            except CommClosedError:
                pass
        if handed:
            logger.info("handed %d unanswered direct requests back to their callers", handed)
        return True

    def requester_left(self, requester: str) -> None:
        """The scheduler saw this client close: close its sessions here (which cancels its requests)."""
        for session, owner in list(self.sessions.items()):
            if owner == requester:
                logger.info("client %s closed; closing its direct session", requester)
                task = asyncio.create_task(session.close())
                self._serving.add(task)
                task.add_done_callback(self._serving.discard)

    def stop_accepting(self, *, nested: bool = False) -> None:
        """From now on, refuse new requests and tell no caller about the wire.

        ``nested``: still accept requests made from inside operators (calls of requests already
        in flight somewhere), so that pipelines in flight can finish.
        """
        self._closing = True
        self._nested_only = nested
        self.listener.stop_advertising()

    async def close(self) -> None:
        """Close every session (after what they still had to write), then the listener."""
        self._closing = True
        self.listener.stop_advertising()
        for session in list(self.sessions):
            await session.close()
        await self.listener.close()
        for session in list(self.sessions):  # accepted while the others closed
            session.abort()
        await asyncio.gather(*self._serving, return_exceptions=True)
