"""The scheduler's half of the request plane: the operator registry and the request queues.

Installed on the scheduler by the first caller or worker that needs it
(:meth:`tdask.request_plane.registry.Registry.ensure_broker`), so a plain ``dask scheduler``
works.

Why not ``distributed.Queue``: its ``get`` is not cancelled when the consumer's connection
drops, so a worker that dies while waiting still takes the next item, which is then lost; and it
does not know which worker holds which item. The broker adds exactly that: a request handed to a
worker is *leased* to it until its final response; when the worker leaves, its leases are
re-queued (bounded retries) or answered with :class:`~tdask.exceptions.WorkerLostError`.

Every requester and every serving worker keeps one session with the broker
(:class:`tdask.request_plane.queue.BrokerSession`). Workers grant *credits* (free request slots)
per operator; the broker pushes queued requests to the host with the most credits and pushes
responses to their requester. Registry calls (register, hosts, ...) are plain RPCs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from tdask import protocol, transport
from tdask.data_plane import DataPlanePeer
from tdask.exceptions import (
    DataPlaneError,
    OperatorUnavailableError,
    RequestTimeoutError,
    TdaskError,
    WorkerLostError,
)
from tdask.protocol import Op, RequestMsg, ResponseMsg, Rpc
from tdask.scheduler import dashboard
from tdask.scheduler.cluster_metrics import ClusterMetrics
from tdask.transport import MessageHandler, Transport

logger = logging.getLogger(__name__)

__all__ = ["BROKER_NAME", "RequestBroker"]

BROKER_NAME = "tdask-request-broker"


@dataclass
class _Lease:
    request: RequestMsg
    worker: str
    partial: bool = False  # a non-final response went out: re-serving would duplicate it


@dataclass
class _Peer:
    """A connected requester (and, when ``worker`` is set, a serving worker)."""

    requester: str
    worker: str | None
    session: Transport


class RequestBroker(SchedulerPlugin):
    """Scheduler extension holding request queues, leases, sessions and the operator registry.

    All methods run on the scheduler's event loop, so no locking is needed. RPC handlers:
    ``tdask_register/unregister/hosts/operators``; ``tdask_session`` opens a session.
    """

    name = BROKER_NAME
    idempotent = True

    def __init__(self) -> None:
        self.queues: dict[str, deque[RequestMsg]] = defaultdict(deque)
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
        self._listener: transport.Listener | None = None
        self.scheduler: Any = None
        # Whether the cluster's workers finished starting: those that registered with the broker
        # (a tdask worker registers right after its operators started), and when each joined.
        self.registered: set[str] = set()
        self.joined: dict[str, float] = {}
        # Operators whose last host let them go on purpose (scaled to 0, removed from a running
        # worker): their requests fail at once instead of waiting for a host to come back.
        self.removed: set[str] = set()
        # name -> the highest version ever registered (what "latest" means while none is hosted)
        self.latest_seen: dict[str, int] = {}
        # The cluster-wide metrics (the scheduler's /metrics, the dashboard's history).
        self.metrics = ClusterMetrics(self)

    async def start(self, scheduler: Any) -> None:
        """Install the handlers, the unhosted-request check and the ``/tdask`` pages."""
        self.scheduler = scheduler
        self._listener = transport.Listener(scheduler, Rpc.SESSION, self._accept, kind="scheduler")
        await self._listener.start()
        now = time.time()
        self.joined = {address: now for address in scheduler.workers}  # joined before the broker
        self.metrics.start()
        scheduler.handlers.update(
            {
                Rpc.REGISTER: self.register,
                Rpc.UNREGISTER: self.unregister,
                Rpc.HOSTS: self.get_hosts,
                Rpc.OPERATORS: self.get_operators,
                Rpc.SIGNATURES: self.get_signatures,
                Rpc.LATEST: self.get_latest,
            }
        )
        self._checker = asyncio.create_task(self._check_forever())
        app = getattr(scheduler, "http_application", None)
        if app is not None:  # next to the dashboard: /tdask (a page) and /tdask/operators.json
            dashboard.install(app, self)

    async def close(self) -> None:
        """Stop the check and close every session."""
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
        await self.metrics.close()
        if self._listener is not None:
            await self._listener.close()
        for peer in list(self.peers.values()):
            await peer.session.close()

    # sessions
    def _accept(self, session: Transport, hello: dict[str, Any]) -> MessageHandler:
        """A requester's (or worker's) session: served until it closes; one it replaces is closed."""
        requester = str(hello["requester"])
        worker = hello.get("worker")
        peer = _Peer(requester, worker, session)
        old = self.peers.get(requester)
        self.peers[requester] = peer
        if worker is not None:
            self.serving[worker] = peer
        if old is not None:
            self._spawn(old.session.close())
        self._spawn(self._watch(peer))
        return lambda message: self._on_message(requester, message)

    async def _watch(self, peer: _Peer) -> None:
        """Once ``peer``'s session closes: forget it, and what it served."""
        requester, worker = peer.requester, peer.worker
        try:
            await peer.session.closed.wait()
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
        op = protocol.check_message(message)
        if op == Op.SUBMIT:
            request = message["request"]
            protocol.check_request(request)
            request["requester"] = requester  # whoever says otherwise, answers go back to its sender
            self.submit(request)
        elif op == Op.RESPOND:
            self.respond(message["responses"])
        elif op == Op.CREDIT:
            peer = self.peers.get(requester)
            if peer is not None and peer.worker is not None:
                self.credit(peer.worker, message["operator"], message["n"])
        elif op == Op.CANCEL:
            self.cancel(requester, message["request_ids"])
        elif op == Op.STATS:
            peer = self.peers.get(requester)
            if peer is not None and peer.worker is not None and peer.worker in self.serving:
                self.worker_stats[peer.worker] = message["stats"]
                self.metrics.on_report(peer.worker, message["stats"], message.get("host") or {})
        else:
            logger.warning("tdask session %s: unknown message %r", requester, op)

    def _push(self, worker: str, message: dict[str, Any]) -> bool:
        peer = self.serving.get(worker)
        if peer is None or peer.session.closed.is_set():
            return False
        peer.session.send(message)
        return True

    # registry
    def register(self, worker: str, requester: str, operators: list[dict[str, Any]], failures: dict[str, str]) -> None:
        """Record the operators ``worker`` hosts and the setup failures it saw (``tdask_register``)."""
        self.registered.add(worker)
        for op in operators:
            self.hosts[op["key"]][worker] = op
            self.removed.discard(op["key"])
            name, version = op.get("name"), op.get("version")
            if isinstance(name, str) and isinstance(version, int):
                self.latest_seen[name] = max(version, self.latest_seen.get(name, 0))
        for name, message in failures.items():
            self.failures[name][worker] = message
        logger.info(
            "worker %s hosts %s%s",
            worker,
            [op["key"] for op in operators],
            f"; failed: {sorted(failures)}" if failures else "",
        )

    def unregister(
        self, worker: str, release_leases: bool, operators: list[str] | None = None, removing: bool = True
    ) -> None:
        """Forget ``worker`` as a host; with ``release_leases``, re-queue what it holds (``tdask_unregister``).

        ``operators``: only these keys (``name/version``), the others it hosts stay (an operator
        removed from a running worker, or a worker draining before it leaves); default: all.
        ``removing``: with ``operators``, an operator left with no host was let go on purpose
        (its requests fail at once); False when it may come back (autoscaling down to zero).
        """
        for key, hosts in self.hosts.items():
            if operators is None or key in operators:
                if hosts.pop(worker, None) is not None and operators is not None and removing and not hosts:
                    self.removed.add(key)  # let go on purpose: its callers need not wait for it
                self.credits[key].pop(worker, None)
        if release_leases:
            self._requeue_leases(worker, lost=False, operators=operators)

    def get_hosts(self, operator: str, routing: bool = False) -> list[str] | dict[str, Any]:
        """The workers hosting ``operator`` now (``tdask_hosts``).

        With ``routing``: ``{"hosts": [...], "routing": <the operator's policy, or None for
        least-loaded>, "names": {worker name: address}, "slots": {address: its
        max_inflight_requests}}``, what a direct caller caches.
        """
        hosts = self.hosts.get(operator, {})
        if not routing:
            return list(hosts)
        policy = next((info.get("routing") for info in hosts.values()), None)
        if policy is not None and policy.get("policy") == "least-loaded":
            policy = None
        workers = self.scheduler.workers if self.scheduler is not None else {}
        names = {str(workers[a].name): a for a in hosts if a in workers}
        slots = {a: int(info.get("max_inflight") or 1) for a, info in hosts.items()}
        return {"hosts": list(hosts), "routing": policy, "names": names, "slots": slots}

    def get_latest(self, name: str) -> dict[str, int | None]:
        """``{"version": the highest version of operator name some worker hosts now, or None}`` (``tdask_latest``).

        What a caller that names no version is served by (Triton's default version policy).
        """
        versions = [
            int(info.get("version", key.rsplit("/", 1)[1]))
            for key, hosts in self.hosts.items()
            if key.rsplit("/", 1)[0] == name
            for info in hosts.values()
        ]
        # While none is hosted (autoscaled to zero): the highest version ever registered.
        return {"version": max(versions) if versions else self.latest_seen.get(name)}

    def get_operators(self) -> dict[str, Any]:
        """The registry, queue depths, counters and worker reports (``tdask_operators``)."""
        return {
            "hosts": {key: sorted(hosts) for key, hosts in self.hosts.items() if hosts},
            "failures": {name: dict(f) for name, f in self.failures.items() if f},
            "queued": {key: len(q) for key, q in self.queues.items() if q},
            "leased": len(self.leases),
            "counts": dict(self.counts),
            "workers": {worker: stats for worker, stats in sorted(self.worker_stats.items())},
            "operators": self.operator_states(),
            "names": self._worker_names(),
            "starting": sorted(self._worker_names().get(w, w) for w in self._starting()),
        }

    def _worker_names(self) -> dict[str, str]:
        workers = self.scheduler.workers if self.scheduler is not None else {}
        return {address: str(ws.name) for address, ws in workers.items()}

    def _starting(self) -> list[str]:
        """Workers of the cluster that have not registered with the broker (yet, or ever: not tdask's)."""
        workers = self.scheduler.workers if self.scheduler is not None else {}
        return [w for w in workers if w not in self.registered]

    def operator_states(self) -> dict[str, dict[str, Any]]:
        """Readiness per operator (``operators`` of ``tdask_operators``, ``/tdask/operators.json``).

        Keyed by ``name/version`` (by name alone for an operator whose setup failed on every
        worker before any hosted it): ``state`` is ``ready`` (at least one worker serves it),
        ``failed`` (its setup failed, and no worker serves it) or ``unavailable`` (its workers
        left); ``reason`` says why it is not ready, or which workers failed beside those that
        serve; ``workers`` names the workers serving it.
        """
        names = self._worker_names()
        out: dict[str, dict[str, Any]] = {}
        for key, hosts in sorted(self.hosts.items()):
            name, _, version = key.rpartition("/")
            failed = self.failures.get(name) or {}
            detail = "; ".join(f"{names.get(w, w)}: {m}" for w, m in sorted(failed.items()))
            if hosts:
                state, reason = "ready", (f"setup failed on {len(failed)} other workers: {detail}" if failed else None)
            elif failed:
                state, reason = "failed", f"setup failed: {detail}"
            else:
                state, reason = "unavailable", "no worker serves it now: its workers left (restarting, or scaled away)"
            models = {self.worker_stats.get(w, {}).get(key, {}).get("state", "ready") for w in hosts}
            if hosts and "ready" not in models:  # model control unloaded it on every host (tdask model)
                state, reason = sorted(models)[0], "its model is unloaded on every worker (`tdask model load` loads it)"
            out[key] = {
                "name": name,
                "version": int(version) if version.isdigit() else None,
                "state": state,
                "reason": reason,
                "workers": sorted(names.get(w, w) for w in hosts),
                # the dashboard's last point: rate and errors per second, p50/p99, queued, in flight
                "recent": dict(self.metrics.history[-1].operators.get(key) or {}) if self.metrics.history else {},
                "broker_errors": {e: n for (k, e), n in sorted(self.metrics.queue_errors.items()) if k == key},
            }
        for name, failed in sorted(self.failures.items()):
            if not failed or any(v["name"] == name for v in out.values()):
                continue
            detail = "; ".join(f"{names.get(w, w)}: {m}" for w, m in sorted(failed.items()))
            reason = f"setup failed: {detail}"
            out[name] = {"name": name, "version": None, "state": "failed", "reason": reason, "workers": []}
        return out

    def get_signatures(self) -> dict[str, Any]:
        """Each hosted operator's signature, as its first host published it (``tdask_signatures``).

        ``None`` for an operator whose workers declare none.
        """
        return {
            key: next((info.get("signature") for info in hosts.values()), None)
            for key, hosts in self.hosts.items()
            if hosts
        }

    # requests
    def submit(self, request: RequestMsg) -> None:
        """Queue a request and hand it to a host with a free slot, if any."""
        request["submitted"] = time.time()
        self.counts["submitted"] += 1
        key = request["operator"]
        if key in self.removed and not self.hosts.get(key):
            self._answer_error(request, self._unavailable(key, {}, 0.0, removed=True))
            return
        if (
            key not in self.hosts
            and not request.get("hosted_before")
            and self._all_started(request.get("host_wait_s", 10.0))
        ):
            # Nobody ever registered it, and no worker is still starting: a wrong name, most
            # likely; waiting would not help (docs/design.md, "Unknown operators").
            self._answer_error(request, self._unavailable(key, self._failures_of(key), 0.0, started=True))
            return
        self.queues[key].append(request)
        self._dispatch(key)

    def _failures_of(self, key: str) -> dict[str, str]:
        return self.failures.get(key.rsplit("/", 1)[0]) or {}

    def _all_started(self, grace_s: float) -> bool:
        """Whether every worker of the cluster finished starting (and there is at least one).

        A worker has finished starting once it registered with the broker (tdask workers do so
        right after their operators started, before which the scheduler does not even know
        them), or once it joined the scheduler more than ``grace_s`` ago (a worker without
        tdask never registers).
        """
        workers = self.scheduler.workers if self.scheduler is not None else {}
        if not workers:
            return False  # a cluster without workers is most likely still starting
        now = time.time()
        return all(w in self.registered or now - self.joined.get(w, now) >= grace_s for w in workers)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """Note when ``worker`` joined (see :meth:`_all_started`)."""
        self.joined[worker] = time.time()

    def credit(self, worker: str, operator: str, n: int) -> None:
        """``worker`` has ``n`` more free slots for ``operator``."""
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
        pushes: dict[str, list[RequestMsg]] = defaultdict(list)
        now = time.time()
        last_used = self.last_used[key]
        while queue and credits:
            # Most free slots first; among equals, the one idle longest (round robin).
            worker = max(credits, key=lambda w: (credits[w], -last_used.get(w, 0)))
            self._ticks += 1
            last_used[worker] = self._ticks
            request = queue.popleft()
            deadline = request.get("deadline")
            if deadline is not None and deadline < now:
                self._answer_error(request, RequestTimeoutError("deadline passed while queued"))
                continue
            self.leases[(request["requester"], request["id"])] = _Lease(request, worker)
            pushes[worker].append(request)
            credits[worker] -= 1
            if credits[worker] <= 0:
                del credits[worker]
        for worker, requests in pushes.items():
            if self._push(worker, protocol.requests(key, requests)):
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
        """Withdraw requests: dropped if queued, the holding worker told if leased."""
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
            self._push(worker, protocol.withdraw(keys))

    def _requester_left(self, requester: str) -> None:
        """A requester's session closed: nobody waits for its requests any more."""
        queued = [r["id"] for q in self.queues.values() for r in q if r["requester"] == requester]
        leased = [rid for (req, rid) in self.leases if req == requester]
        if queued or leased:
            logger.info("requester %s left; cancelling its %d requests", requester, len(queued) + len(leased))
            self.cancel(requester, queued + leased)

    def respond(self, responses: list[ResponseMsg]) -> None:
        """Relay responses to their requesters; a final one ends the lease, stale ones are dropped."""
        for response in responses:
            key = (response["requester"] or "", response["id"])
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
    def _reply(self, response: ResponseMsg) -> None:
        peer = self.peers.get(response["requester"] or "")
        if peer is None or peer.session.closed.is_set():
            self.counts["dropped"] += 1
            self._release_refs(response)
            return
        peer.session.send(protocol.replies([response]))

    def _answer_error(self, request: RequestMsg, error: TdaskError, worker: str | None = None) -> None:
        self.counts["failed"] += 1
        self.metrics.queue_error(request["operator"], error)
        self._reply(
            protocol.error_reply(
                request["id"], error, requester=request["requester"], operator=request["operator"], worker=worker
            )
        )

    def _release_refs(self, response: ResponseMsg) -> None:
        """Nobody will read this response: free the tensors it refers to at their owners."""
        refs = protocol.refs_in(response.get("outputs"))
        if refs:
            self._spawn(DataPlanePeer(self.scheduler.rpc).release(refs))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _requeue_leases(self, worker: str, *, lost: bool, operators: list[str] | None = None) -> None:
        held = [
            (key, lease)
            for key, lease in self.leases.items()
            if lease.worker == worker and (operators is None or lease.request["operator"] in operators)
        ]
        for key, lease in held:
            del self.leases[key]
            request = lease.request
            name = request["operator"]
            request["submitted"] = time.time()  # its wait for a host starts again
            if not lost:
                self.queues[name].appendleft(request)
                self._dispatch(name)
            elif self._answer_lost_inputs(request, worker):
                continue
            elif lease.partial or request.get("attempt", 0) >= request.get("max_retries", 0):
                reason = (
                    "after streaming part of its answer"
                    if lease.partial
                    else (f"and {request.get('attempt', 0)} retries were used")
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

    def _answer_lost_inputs(self, request: RequestMsg, worker: str) -> bool:
        """Answer ``request`` with :class:`DataPlaneError` if an input of it was stored on ``worker``.

        Serving it again would only fail when its inputs are fetched; the caller places them
        again and re-sends it instead (no retry spent on a worker already dead).
        """
        for tensor in protocol.refs_in(request.get("inputs")):
            if tensor.owner == worker:
                message = f"input tensor {tensor.tensor_id} was stored on {worker}, which died; place it again"
                self._answer_error(request, DataPlaneError(message, owner=worker, tensor_id=tensor.tensor_id), worker)
                self.counts["lost_inputs"] += 1
                return True
        return False

    def log_event(self, topic: str, msg: Any) -> None:
        """Count what workers tell through Dask's events (``"tdask"``: execution timeouts, restarts)."""
        if topic == "tdask" and isinstance(msg, dict):
            self.metrics.worker_event(msg)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """A worker left: forget it, and re-serve or fail the requests it held."""
        # Still registered for an operator: it did not leave by unregistering, it was lost.
        self.metrics.worker_removed(worker, [key for key, hosts in self.hosts.items() if worker in hosts])
        for key, hosts in self.hosts.items():
            hosts.pop(worker, None)
            self.credits[key].pop(worker, None)
            self.last_used[key].pop(worker, None)
        for failures in self.failures.values():
            failures.pop(worker, None)
        self.serving.pop(worker, None)
        self.worker_stats.pop(worker, None)
        self.registered.discard(worker)
        self.joined.pop(worker, None)
        self._requeue_leases(worker, lost=True)
        for name, queue in self.queues.items():  # queued requests whose inputs lived there
            if any(t.owner == worker for r in queue for t in protocol.refs_in(r.get("inputs"))):
                self.queues[name] = deque(r for r in queue if not self._answer_lost_inputs(r, worker))

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client closed: close its session here and its direct sessions on the workers."""
        peer = self.peers.get(client)  # a client's requester id is its client id
        if peer is not None:
            self._spawn(peer.session.close())
        # distributed gives a Client no close hook for the comms it did not open itself: the
        # workers close the direct-plane comms this client opened to them.
        for worker in list(self.serving):
            self._push(worker, protocol.requester_left(client))

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
            failures = self._failures_of(key)
            kept: deque[RequestMsg] = deque()
            # An operator that had hosts (a worker restarting) gets longer to come back than one
            # nobody ever hosted (most likely a wrong name), which fails as soon as every worker
            # of the cluster has finished starting.
            for request in queue:
                waited = now - request["submitted"]
                had_hosts = key in self.hosts or bool(request.get("hosted_before"))
                if had_hosts:
                    limit = request.get("rehost_wait_s", 60.0)
                else:
                    wait_s = request.get("host_wait_s", 10.0)
                    limit = 0.0 if self._all_started(wait_s) else wait_s
                if failures or waited >= limit or key in self.removed:
                    started = not had_hosts and limit == 0.0
                    error = self._unavailable(key, failures, waited, started=started, removed=key in self.removed)
                    self._answer_error(request, error)
                elif (deadline := request.get("deadline")) is not None and deadline < now:
                    self._answer_error(request, RequestTimeoutError("deadline passed while queued"))
                else:
                    kept.append(request)
            self.queues[key] = kept

    def _unavailable(
        self, key: str, failures: dict[str, str], waited: float, *, started: bool = False, removed: bool = False
    ) -> OperatorUnavailableError:
        if removed:
            known = sorted(k for k, hosts in self.hosts.items() if hosts)
            return OperatorUnavailableError(
                f"operator {key} was taken off every worker (scaled to 0, removed, or replaced by another version); "
                f"hosted operators: {known or 'none'}"
            )
        if failures:
            detail = "; ".join(f"{w}: {m}" for w, m in sorted(failures.items()))
            return OperatorUnavailableError(f"operator {key} failed to start on every worker that hosts it: {detail}")
        known = sorted(k for k, hosts in self.hosts.items() if hosts)
        if started:
            return OperatorUnavailableError(
                f"no worker hosts operator {key}, none ever did, and all {len(self.scheduler.workers)} workers of "
                f"the cluster have finished starting; hosted operators: {known or 'none'}"
            )
        return OperatorUnavailableError(
            f"no worker hosts operator {key} (waited {waited:.1f}s); hosted operators: {known or 'none'}"
        )
