"""The request plane: per-operator request queues on the scheduler, with leases.

Callers never see this module; they use :class:`tdask.RemoteOperator`, which talks to a
:class:`RequestPlane`. The one implementation today, :class:`QueueRequestPlane`, keeps one queue
per operator ``name/version`` in a scheduler extension (:class:`RequestBroker`), in the spirit of
``distributed.Queue``, and one reply queue per requester, drained by one dispatcher task.

Why not ``distributed.Queue`` itself: its ``get`` is not cancelled when the consumer's connection
drops, so a worker that dies while waiting still takes the next item, which is then lost; and it
does not know which worker holds which item. The broker adds exactly that: a request handed to a
worker is *leased* to it until its final response; when the worker leaves, its leases are
re-queued (bounded retries) or answered with :class:`~tdask.exceptions.WorkerLostError`.

Everything passes through the scheduler, so messages carry small tensors and descriptors only
(see :mod:`tdask.data_plane`), never large tensors.

Message shapes (msgpack-friendly dicts):

- request: ``id, requester, operator (name/version key), name, parameters, inputs, deadline
  (epoch seconds or None), attempt, max_retries, host_wait_s, rehost_wait_s``
- response: ``id, requester, operator, worker, outputs, parameters, error (dict or None), final``
"""

from __future__ import annotations

import abc
import asyncio
import html
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web
from distributed.protocol.pickle import dumps

from tdask.config import get_seconds
from tdask.exceptions import TdaskError, error_to_msg
from tdask.exceptions import OperatorUnavailableError, RequestTimeoutError, WorkerLostError

logger = logging.getLogger(__name__)

BROKER_NAME = "tdask-request-broker"


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
    async def register(self, worker: str, operators: list[dict[str, Any]], failures: dict[str, str]) -> None:
        """Announce the operators ``worker`` serves, and those whose setup failed there."""

    @abc.abstractmethod
    async def take(self, worker: str, operator_key: str, max_count: int, timeout_s: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout_s`` for at most ``max_count`` requests, leased to ``worker``."""

    @abc.abstractmethod
    async def respond(self, responses: list[dict[str, Any]]) -> None:
        """Deliver responses to their requesters; a final one ends the request's lease."""

    @abc.abstractmethod
    async def unregister(self, worker: str, *, release_leases: bool) -> None:
        """Stop giving ``worker`` requests; with ``release_leases``, re-queue what it holds."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Stop the dispatcher; pending requests fail."""


class ResponseStream:
    """Responses of one request, in order; ends after the final one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.done = False

    def _deliver(self, response: dict[str, Any]) -> None:
        self._queue.put_nowait(response)

    async def next(self) -> dict[str, Any]:
        """The next response (raises ``StopAsyncIteration`` after the final one)."""
        if self.done:
            raise StopAsyncIteration
        response = await self._queue.get()
        if response.get("final"):
            self.done = True
        return response

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self.next()


class QueueRequestPlane(RequestPlane):
    """Request plane over the scheduler's :class:`RequestBroker`.

    ``scheduler`` is an RPC to the scheduler (``client.scheduler`` or ``worker.scheduler``);
    ``requester`` names this requester's reply queue (a client id, or a worker-based id).
    """

    def __init__(self, scheduler: Any, requester: str, *, worker: str | None = None) -> None:
        self.scheduler = scheduler
        self.requester = requester
        self.worker = worker
        self._streams: dict[str, ResponseStream] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._broker_ready = False
        self._closed = False
        self.on_orphan_response: Any = None

    async def ensure_broker(self) -> None:
        """Install the broker on the scheduler once (idempotent across clients and workers)."""
        if not self._broker_ready:
            await self.scheduler.register_scheduler_plugin(
                plugin=dumps(RequestBroker()), name=BROKER_NAME, idempotent=True
            )
            self._broker_ready = True

    async def submit(self, request: dict[str, Any]) -> ResponseStream:
        if self._closed:
            raise RuntimeError("this request plane is closed")
        await self.ensure_broker()
        request_id = request["id"]
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = ResponseStream(request_id)
        self._streams[request_id] = stream
        request["requester"] = self.requester
        try:
            await self.scheduler.tdask_submit(request=request, worker=self.worker)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        return stream

    def forget(self, request_id: str) -> None:
        """Stop routing responses of ``request_id`` (after its final one, or when abandoned)."""
        self._streams.pop(request_id, None)

    async def cancel(self, request_id: str) -> None:
        self.forget(request_id)
        try:
            await self.scheduler.tdask_cancel(requester=self.requester, request_ids=[request_id])
        except Exception as exc:  # scheduler gone: nothing left to cancel
            logger.debug("cancel of %s failed: %s", request_id, exc)

    async def hosts(self, operator_key: str) -> list[str]:
        await self.ensure_broker()
        return await self.scheduler.tdask_hosts(operator=operator_key)

    async def operators(self) -> dict[str, Any]:
        """The registry: which workers host which operator, and recorded setup failures."""
        await self.ensure_broker()
        return await self.scheduler.tdask_operators()

    async def register(self, worker: str, operators: list[dict[str, Any]], failures: dict[str, str]) -> None:
        await self.ensure_broker()
        await self.scheduler.tdask_register(worker=worker, operators=operators, failures=failures)

    async def take(self, worker: str, operator_key: str, max_count: int, timeout_s: float) -> list[dict[str, Any]]:
        return await self.scheduler.tdask_take(
            worker=worker, operator=operator_key, max_count=max_count, timeout=timeout_s
        )

    async def respond(self, responses: list[dict[str, Any]]) -> None:
        await self.scheduler.tdask_respond(responses=responses)

    async def unregister(self, worker: str, *, release_leases: bool) -> None:
        await self.scheduler.tdask_unregister(worker=worker, release_leases=release_leases)

    async def _dispatch(self) -> None:
        """Route replies to their streams while any request is in flight."""
        poll_s = get_seconds("tdask.worker.poll-interval") or 2.0
        while self._streams and not self._closed:
            try:
                replies = await self.scheduler.tdask_poll(requester=self.requester, timeout=poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.error("lost the scheduler while waiting for responses: %s", exc)
                self._fail_all(f"lost the connection to the scheduler: {exc}")
                return
            for reply in replies:
                stream = self._streams.get(reply["id"])
                if stream is None:
                    if self.on_orphan_response is not None:
                        self.on_orphan_response(reply)
                    continue
                if reply.get("final"):
                    self._streams.pop(reply["id"], None)
                stream._deliver(reply)

    def _fail_all(self, message: str) -> None:
        for request_id, stream in list(self._streams.items()):
            stream._deliver(
                {
                    "id": request_id,
                    "final": True,
                    "outputs": {},
                    "parameters": {},
                    "worker": None,
                    "error": {"type": "TdaskError", "message": message},
                }
            )
        self._streams.clear()

    async def aclose(self) -> None:
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        self._fail_all("the request plane was closed")


# -- scheduler side ------------------------------------------------------------------------


@dataclass
class _Lease:
    request: dict[str, Any]
    worker: str
    partial: bool = False  # a non-final response went out: re-serving would duplicate it


@dataclass
class _ReplyQueue:
    replies: list[dict[str, Any]] = field(default_factory=list)
    waiter: asyncio.Future[None] | None = None
    worker: str | None = None


class RequestBroker(SchedulerPlugin):
    """Scheduler extension holding request queues, leases, reply queues and the operator registry.

    All methods run on the scheduler's event loop, so no locking is needed. Handlers:
    ``tdask_register/unregister/submit/take/respond/poll/cancel/hosts/operators``.
    """

    name = BROKER_NAME
    idempotent = True

    def __init__(self) -> None:
        self.queues: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self.waiters: dict[str, deque[asyncio.Future[None]]] = defaultdict(deque)
        self.hosts: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.failures: dict[str, dict[str, str]] = defaultdict(dict)
        self.leases: dict[tuple[str, str], _Lease] = {}
        self.replies: dict[str, _ReplyQueue] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self._checker: asyncio.Task[None] | None = None
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "tdask_register": self.register,
                "tdask_unregister": self.unregister,
                "tdask_submit": self.submit,
                "tdask_take": self.take,
                "tdask_respond": self.respond,
                "tdask_poll": self.poll,
                "tdask_cancel": self.cancel,
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

    # registry
    def register(self, worker: str, operators: list[dict[str, Any]], failures: dict[str, str]) -> None:
        for op in operators:
            self.hosts[op["key"]][worker] = op
            self._wake(op["key"], len(self.queues[op["key"]]))
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
            if hosts.pop(worker, None) is not None:
                self._wake(key, len(self.waiters[key]))  # waiting takes of that worker return
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
        }

    # caller side
    def submit(self, request: dict[str, Any], worker: str | None = None) -> None:
        requester = request["requester"]
        reply_queue = self.replies.get(requester)
        if reply_queue is None:
            reply_queue = self.replies[requester] = _ReplyQueue(worker=worker)
        request["submitted"] = time.time()
        self.counts["submitted"] += 1
        key = request["operator"]
        self.queues[key].append(request)
        self._wake(key, 1)

    def cancel(self, requester: str, request_ids: list[str]) -> None:
        ids = set(request_ids)
        for key, queue in self.queues.items():
            kept = [r for r in queue if not (r["requester"] == requester and r["id"] in ids)]
            if len(kept) != len(queue):
                self.queues[key] = deque(kept)
        by_worker: dict[str, list[list[str]]] = defaultdict(list)
        for request_id in ids:
            lease = self.leases.pop((requester, request_id), None)
            if lease is not None:
                by_worker[lease.worker].append([requester, request_id])
        self.counts["cancelled"] += len(ids)
        for worker, keys in by_worker.items():
            asyncio.create_task(self._tell_cancel(worker, keys))

    async def _tell_cancel(self, worker: str, keys: list[list[str]]) -> None:
        try:
            await self.scheduler.rpc(worker).tdask_cancel(keys=keys)
        except Exception as exc:
            logger.debug("could not tell %s to cancel %s: %s", worker, keys, exc)

    async def poll(self, requester: str, timeout: float) -> list[dict[str, Any]]:
        reply_queue = self.replies.get(requester)
        if reply_queue is None:
            reply_queue = self.replies[requester] = _ReplyQueue()
        if not reply_queue.replies:
            waiter = reply_queue.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                if reply_queue.waiter is waiter:
                    reply_queue.waiter = None
        replies, reply_queue.replies = reply_queue.replies, []
        return replies

    # serving side
    async def take(self, worker: str, operator: str, max_count: int, timeout: float) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if worker not in self.hosts.get(operator, ()):
                return []
            out = []
            queue = self.queues[operator]
            now = time.time()
            while queue and len(out) < max_count:
                request = queue.popleft()
                if request.get("deadline") is not None and request["deadline"] < now:
                    self._answer_error(request, RequestTimeoutError("deadline passed while queued"))
                    continue
                self.leases[(request["requester"], request["id"])] = _Lease(request, worker)
                out.append(request)
            if out:
                self.counts["served"] += len(out)
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            waiter = loop.create_future()
            self.waiters[operator].append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                return []
            finally:
                try:
                    self.waiters[operator].remove(waiter)
                except ValueError:
                    pass

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
    def _wake(self, operator: str, n: int) -> None:
        waiters = self.waiters.get(operator)
        while waiters and n > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1

    def _reply(self, response: dict[str, Any]) -> None:
        reply_queue = self.replies.get(response["requester"])
        if reply_queue is None:
            self.counts["dropped"] += 1
            self._release_refs(response)
            return
        reply_queue.replies.append(response)
        if reply_queue.waiter is not None and not reply_queue.waiter.done():
            reply_queue.waiter.set_result(None)

    def _answer_error(self, request: dict[str, Any], error: TdaskError, worker: str | None = None) -> None:
        self.counts["failed"] += 1
        self._reply(
            {
                "id": request["id"],
                "requester": request["requester"],
                "operator": request["operator"],
                "worker": worker,
                "outputs": {},
                "parameters": {},
                "error": error_to_msg(error),
                "final": True,
            }
        )

    def _release_refs(self, response: dict[str, Any]) -> None:
        by_owner: dict[str, list[str]] = defaultdict(list)
        for entry in (response.get("outputs") or {}).values():
            if "ref" in entry:
                by_owner[entry["ref"]["owner"]].append(entry["ref"]["id"])
        for owner, ids in by_owner.items():
            asyncio.create_task(self._release_on(owner, ids))

    async def _release_on(self, owner: str, ids: list[str]) -> None:
        try:
            await self.scheduler.rpc(owner).tdask_release(tensor_ids=ids)
        except Exception as exc:
            logger.debug("release on %s failed: %s", owner, exc)

    def _requeue_leases(self, worker: str, *, lost: bool) -> None:
        held = [(key, lease) for key, lease in self.leases.items() if lease.worker == worker]
        for key, lease in held:
            del self.leases[key]
            request = lease.request
            name = request["operator"]
            request["submitted"] = time.time()  # its wait for a host starts again
            if not lost:
                self.queues[name].appendleft(request)
                self._wake(name, 1)
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
                self._wake(name, 1)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for key, hosts in self.hosts.items():
            if hosts.pop(worker, None) is not None:
                self._wake(key, len(self.waiters[key]))
        for failures in self.failures.values():
            failures.pop(worker, None)
        self._requeue_leases(worker, lost=True)
        for requester in [r for r, q in self.replies.items() if q.worker == worker]:
            del self.replies[requester]

    def remove_client(self, scheduler: Any, client: str) -> None:
        self.replies.pop(client, None)

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
        self.write(
            "<html><head><title>tdask operators</title><meta http-equiv='refresh' content='2'></head><body>"
            "<h2>tdask operators</h2><table border=1 cellpadding=4>"
            "<tr><th>operator</th><th>workers</th><th>addresses</th><th>queued</th></tr>"
            f"{rows}</table><p>leased (in progress): {state['leased']}</p><p>{html.escape(counts)}</p>"
            + (f"<h3>setup failures</h3><ul>{failures}</ul>" if failures else "")
            + "</body></html>"
        )
