"""Serving on a worker: slots, batches, cancellation and answers, whichever plane brought a request.

Each hosted operator runs at most ``max_inflight_requests`` requests at once; what does not fit
waits here in arrival order. Every request gets exactly one final answer, sent back through the
plane that brought it (a :class:`~tdask.request_plane.base.ServerPlane`); serving never asks
which plane that is: the plane frees its own slots (the broker's credits), forgets cancelled
requests and hands back what a leaving worker will not serve.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tdask import context, protocol
from tdask.config import RequestSettings, get_seconds
from tdask.data_plane import TensorScope, TensorStore
from tdask.exceptions import (
    ExecutionTimeoutError,
    InvalidRequestError,
    OperatorError,
    RequestCancelledError,
    TdaskError,
    error_to_msg,
)
from tdask.host.metrics import CANCELLED, NOT_ANSWERED, UNDELIVERED, OperatorMetrics
from tdask.operator import Operator, OperatorConfig, Request
from tdask.protocol import RequestMsg, ResponseMsg, operator_key
from tdask.request_plane.base import ServerPlane

logger = logging.getLogger(__name__)

__all__ = ["Hosted", "Serving"]


@dataclass
class Waiting:
    """An admitted request that waits for a slot, and the plane that brought it."""

    message: RequestMsg
    plane: ServerPlane
    arrived: float

    @property
    def key(self) -> tuple[str, str]:
        """``(requester, request_id)``."""
        return (self.message["requester"], self.message["id"])


@dataclass
class Hosted:
    """One operator on this worker, with its in-flight accounting."""

    config: OperatorConfig
    operator: Operator
    inflight: int = 0
    max_inflight_seen: int = 0
    started: int = 0
    waiting: deque[Waiting] = field(default_factory=deque)  # admitted, no free slot yet
    batches: set[asyncio.Task[None]] = field(default_factory=set)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    execution_timeout_s: float | None = None  # tdask.operator.execution-timeout, read once (0: none)
    #: ``ready``; for a Triton model under model control also ``loading``, ``unloading``,
    #: ``unloaded`` or ``failed: <why>`` (reported in :meth:`Serving.stats`).
    state: str = "ready"


class Serving:
    """Runs the requests of a worker's operators and answers them.

    Parameters
    ----------
    worker_address
        The worker's address (responses name it).
    store
        The worker's tensor store (large outputs are kept there).
    endpoint
        What :class:`tdask.RemoteOperator` uses from inside an operator (the worker's own planes).
    planes
        The worker halves of the planes that bring requests here (each is told to :meth:`admit`
        through it).
    keep_unanswered
        True while the worker is beyond repair (restarting): failed requests are then not
        answered, so that their callers serve them again elsewhere once the worker has left.
    on_execution_timeout
        Told the operator's key and the request ids when a batch ran past its execution timeout
        (the worker logs it for the scheduler's counters).
    """

    def __init__(
        self,
        *,
        worker_address: str,
        store: TensorStore,
        endpoint: Any,
        planes: list[ServerPlane],
        keep_unanswered: Callable[[], bool],
        on_execution_timeout: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.worker_address = worker_address
        #: Told ``(operator key, request ids)`` when a batch ran past its execution timeout.
        self.on_execution_timeout: Callable[[str, list[str]], None] = on_execution_timeout or (lambda key, ids: None)
        self.store = store
        self.endpoint = endpoint
        self.planes = planes
        self.keep_unanswered = keep_unanswered
        self.hosted: dict[str, Hosted] = {}
        self.closing = False
        # While closing because the scheduler was lost: finish what was admitted (and the calls
        # of requests in flight) within the drain, instead of handing it back (nowhere to go).
        self.finishing = False
        self._running: dict[tuple[str, str], tuple[Request, asyncio.Task[None]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._ran: set[asyncio.Task[None]] = set()  # batch tasks whose coroutine started
        for plane in planes:
            plane.serve(self)

    # -- admission -------------------------------------------------------------------------

    def admit(self, plane: ServerPlane, operator_key: str, requests: list[RequestMsg]) -> bool:
        """Run ``requests`` in free slots now; the rest waits here, in arrival order.

        False when the operator is not (or no longer) here: the plane then says so to the
        caller, or keeps its lease. While closing, only calls made from inside requests in flight
        are taken, and only while :attr:`finishing`. The broker never pushes more than the slots
        granted to it, but direct requests fill slots too: nothing ever runs beyond
        ``max_inflight_requests``.
        """
        hosted = self.hosted.get(operator_key)
        if hosted is None or (self.closing and not (self.finishing and all(r.get("nested") for r in requests))):
            return False
        now = time.perf_counter()
        free = hosted.config.max_inflight_requests - hosted.inflight
        if free >= len(requests) and not hosted.waiting:
            self._start_batch(hosted, [Waiting(r, plane, now) for r in requests], now)
            return True
        hosted.waiting.extend(Waiting(r, plane, now) for r in requests)
        self._start_waiting(hosted)
        return True

    def _start_waiting(self, hosted: Hosted) -> None:
        free = hosted.config.max_inflight_requests - hosted.inflight
        batch = [hosted.waiting.popleft() for _ in range(min(free, len(hosted.waiting)))]
        if batch:
            self._start_batch(hosted, batch, time.perf_counter())

    def _freed(self, hosted: Hosted, planes: list[ServerPlane]) -> None:
        """Requests brought by ``planes`` (one entry each) left their slots: tell each plane."""
        if self.closing:
            return
        for plane in set(planes):
            if plane.counts_slots:
                plane.freed(hosted.config.key, planes.count(plane))

    # -- running ---------------------------------------------------------------------------

    def _start_batch(self, hosted: Hosted, admitted: list[Waiting], started: float) -> None:
        """Run ``admitted`` as one ``execute`` batch; ``started`` is now (``time.perf_counter()``)."""
        settings = RequestSettings.read()  # once per batch, not per response
        metrics = hosted.metrics
        requests = []
        planes = []
        paired = []
        for entry in admitted:
            message, plane = entry.message, entry.plane
            request = Request(
                request_id=message["id"],
                operator=hosted.config.name,
                version=hosted.config.version,
                inputs={},
                parameters=dict(message.get("parameters") or {}),
                deadline=message.get("deadline"),
                store=self.store,
                send=functools.partial(self._answer, plane, settings=settings, metrics=metrics),
                requester=message["requester"],
            )
            request.started = started
            request.arrived = entry.arrived
            placed = message.get("placed")
            if placed:
                request.placed = tuple(str(i) for i in placed)
            try:
                request.inputs = protocol.decode_tensors(message.get("inputs") or {})
            except InvalidRequestError as exc:
                self._refuse(hosted, plane, request, exc, settings)
                continue
            requests.append(request)
            planes.append(plane)
            paired.append((message, request))
        if not requests:
            return
        batch = tuple(requests)
        debug = logger.isEnabledFor(logging.DEBUG)
        for message, request in paired:
            request.batch = batch
            arrived = request.arrived
            metrics.wait.observe(started - arrived)
            attempt = message.get("attempt")
            if attempt:
                metrics.retried += 1
            if debug:
                logger.debug(
                    "request %s of %s started (waited %.3f ms for a slot, attempt %d)",
                    request.request_id,
                    hosted.config.key,
                    (started - arrived) * 1e3,
                    attempt or 0,
                )
        hosted.inflight += len(requests)
        hosted.started += len(requests)
        hosted.max_inflight_seen = max(hosted.max_inflight_seen, hosted.inflight)
        task = asyncio.create_task(self._run_batch(hosted, requests, planes, settings))
        hosted.batches.add(task)
        task.add_done_callback(functools.partial(self._if_never_ran, hosted, requests, planes))
        for request in requests:
            self._running[(request.requester, request.request_id)] = (request, task)

    async def _run_batch(
        self, hosted: Hosted, requests: list[Request], planes: list[ServerPlane], settings: RequestSettings
    ) -> None:
        current = asyncio.current_task()
        assert current is not None
        self._ran.add(current)
        scope = TensorScope()
        deadlines = [r.deadline for r in requests]
        context.current.set(
            context.ServingContext(
                endpoint=self.endpoint,
                store=self.store,
                scope=scope,
                deadline=None if None in deadlines else max(d for d in deadlines if d is not None),
                settings=settings,
            )
        )
        error: BaseException | None = None
        cancelled = False
        limit_s = self.execution_timeout_s(hosted)
        timer = asyncio.timeout(limit_s)
        timed_out = False
        try:
            async with timer:
                await hosted.operator.execute(requests)
        except asyncio.CancelledError:
            cancelled = True
        except TimeoutError as exc:
            if timer.expired():
                timed_out = True
            else:
                error = exc
        except Exception as exc:
            error = exc
            logger.warning(
                "operator %s raised on requests %s: %r",
                hosted.config.key,
                [r.request_id for r in requests],
                exc,
                exc_info=not isinstance(exc, TdaskError),
            )
        finally:
            try:
                if timed_out:
                    await self._execution_timed_out(hosted, requests, limit_s)
                elif not cancelled or not self.closing:
                    for request in requests:
                        if request.finished or request.cancelled.is_set():
                            continue
                        if error is None and cancelled:  # cancelled here, not by its caller
                            error = RequestCancelledError(
                                f"the operator's task was cancelled on worker {self.worker_address}"
                            )
                        elif error is None:
                            error = OperatorError("the operator returned without sending a final response")
                        await request.response_sender().send(error=error)
                else:  # stopped at teardown: handed back unanswered, served again elsewhere
                    for request in requests:
                        if not (request.finished or request.cancelled.is_set()):
                            hosted.metrics.count(NOT_ANSWERED)
            except Exception:
                logger.exception("answering failed requests of %s failed", hosted.config.key)
            finally:
                if scope.tensors:
                    await self.store.release(list(scope.tensors.values()))
                self._batch_left(hosted, requests, planes, current)

    def execution_timeout_s(self, hosted: Hosted) -> float | None:
        """How long one ``execute`` of ``hosted`` may run: its config's, else ``tdask.operator.execution-timeout``."""
        if hosted.config.execution_timeout_s is not None:
            return float(hosted.config.execution_timeout_s)
        if hosted.execution_timeout_s is None:
            hosted.execution_timeout_s = get_seconds("tdask.operator.execution-timeout") or 0.0
        return hosted.execution_timeout_s or None

    async def _execution_timed_out(self, hosted: Hosted, requests: list[Request], limit_s: float | None) -> None:
        """Answer a batch that ran past its execution timeout, then have its operator recover."""
        ids = [r.request_id for r in requests]
        logger.error(
            "operator %s ran past its execution timeout of %gs on requests %s; recovering it",
            hosted.config.key,
            limit_s,
            ids,
        )
        hosted.metrics.timeouts += 1
        for request in requests:
            if request.finished or request.cancelled.is_set():
                continue
            error = ExecutionTimeoutError(
                f"operator {hosted.config.name!r} ran past its execution timeout of {limit_s:g}s "
                f"on worker {self.worker_address}; the operator is being recovered",
                operator=hosted.config.name,
                request_id=request.request_id,
            )
            await request.response_sender().send(error=error)
        self.on_execution_timeout(hosted.config.key, ids)
        try:
            hosted.operator.on_execution_timeout(requests)
        except Exception:
            logger.exception("operator %s failed to recover from its execution timeout", hosted.config.key)

    def _if_never_ran(
        self, hosted: Hosted, requests: list[Request], planes: list[ServerPlane], task: asyncio.Task[None]
    ) -> None:
        """Free the slots of a batch whose task was cancelled before it started.

        Its requests were cancelled in the frame that brought them, or the worker is tearing
        down: ``_run_batch`` never ran, so its ``finally`` did not free them.
        """
        if task in self._ran:
            self._ran.discard(task)
            return
        if self.closing:  # stopped at teardown: handed back unanswered, served again elsewhere
            for request in requests:
                if not (request.finished or request.cancelled.is_set()):
                    hosted.metrics.count(NOT_ANSWERED)
        self._batch_left(hosted, requests, planes, task)

    def _batch_left(
        self, hosted: Hosted, requests: list[Request], planes: list[ServerPlane], task: asyncio.Task[None]
    ) -> None:
        """A batch is over: free its slots, start what waits, forget its requests."""
        hosted.inflight -= len(requests)
        hosted.batches.discard(task)
        if not self.closing or self.finishing:
            self._start_waiting(hosted)
        self._freed(hosted, planes)
        for request in requests:
            self._running.pop((request.requester, request.request_id), None)

    def _refuse(
        self, hosted: Hosted, plane: ServerPlane, request: Request, exc: InvalidRequestError, settings: RequestSettings
    ) -> None:
        """Answer a request whose inputs cannot be decoded, without running it."""
        logger.warning("request %s of %s refused: %s", request.request_id, hosted.config.key, exc.message)
        request.finished = True
        error = InvalidRequestError(exc.message, operator=hosted.config.name, request_id=request.request_id)
        response = {"outputs": {}, "parameters": {}, "error": error, "final": True}
        # A fresh context: this may run while a finishing batch's serving context is current.
        answer = self._answer(plane, request, response, settings, hosted.metrics)
        task = asyncio.create_task(answer, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self._freed(hosted, [plane])

    async def _answer(
        self,
        plane: ServerPlane,
        request: Request,
        response: dict[str, Any],
        settings: RequestSettings,
        metrics: OperatorMetrics,
    ) -> None:
        """Encode one response (large outputs into the store) and send it back where the request came from.

        A final answer is counted by outcome and timed (execute and total latency) once sent.
        """
        if request.cancelled.is_set():
            return
        error = response["error"]
        if error is not None and self.keep_unanswered() and not isinstance(error, ExecutionTimeoutError):
            # Failed because this worker is beyond repair (its Triton died): keep the lease, so
            # the request is served again once this worker has left, instead of failing it.
            logger.warning(
                "not answering request %s of %s: this worker is restarting", request.request_id, request.operator
            )
            metrics.count(NOT_ANSWERED)
            return
        outputs = response["outputs"]
        parameters = response["parameters"]
        final = response["final"]
        if error is None:
            try:
                protocol.check_outputs(request.operator, request.request_id, outputs)
                protocol.check_response_parameters(request.operator, request.request_id, parameters)
            except OperatorError as exc:
                logger.error("operator %s answered request %s badly: %s", request.operator, request.request_id, exc)
                error, outputs, parameters, final = exc, {}, {}, True
                request.finished = True
        entries: dict[str, Any] = {}
        serving = context.current.get()
        if error is None:
            entries, _ = await protocol.encode_tensors(outputs, self._place, settings.inline_threshold)
            if serving is not None:
                serving.scope.hand_on(protocol.tensors_in(outputs.values()))
        message: ResponseMsg = protocol.response_msg(
            request_id=request.request_id,
            requester=request.requester,
            operator=f"{request.operator}/{request.version}",
            worker=self.worker_address,
            outputs=entries,
            parameters=parameters if error is None else {},
            error=None if error is None else error_to_msg(error, request.operator),
            final=final,
        )
        if request.placed:  # what its caller placed for it alone, unless it goes back out in an answer
            echoed = {e["ref"]["id"] for e in entries.values() if "ref" in e}
            if echoed:
                request.placed = tuple(i for i in request.placed if i not in echoed)
            if final:
                self.store.drop(request.placed)
        if final and serving is not None and serving.scope.tensors and all(r.finished for r in request.batch):
            # The batch is done with what it received: free it before the caller hears back,
            # so "answered" implies "intermediate tensors released".
            received, serving.scope.tensors = list(serving.scope.tensors.values()), {}
            await self.store.release(received)
        error_msg = message["error"]
        outcome = "ok" if error_msg is None else str(error_msg["type"])
        try:
            await plane.answer(message)
        except Exception as exc:
            logger.error(
                "could not deliver response to request %s of %s: %s", request.request_id, request.operator, exc
            )
            outcome = UNDELIVERED
        if final:
            now = time.perf_counter()
            metrics.execute.observe(now - request.started)
            metrics.total.observe(now - request.arrived)
            metrics.count(outcome, now - request.arrived)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "request %s of %s/%s answered: %s after %.3f ms here",
                    request.request_id,
                    request.operator,
                    request.version,
                    outcome,
                    (now - request.arrived) * 1e3,
                )

    async def _place(self, array: Any) -> Any:
        return self.store.put(array)

    # -- cancellation ----------------------------------------------------------------------

    def cancel(self, keys: list[list[str]]) -> None:
        """Cancel requests by ``[requester, request_id]``: waiting ones never run; running ones are told."""
        wanted = {(requester, request_id) for requester, request_id in keys}
        for hosted in self.hosted.values():
            dropped = [w for w in hosted.waiting if w.key in wanted]
            if dropped:
                hosted.waiting = deque(w for w in hosted.waiting if w.key not in wanted)
                self._freed(hosted, [w.plane for w in dropped])
                for entry in dropped:
                    hosted.metrics.count(CANCELLED)
                    logger.info(
                        "request %s of %s cancelled by its caller before it started",
                        entry.message["id"],
                        hosted.config.key,
                    )
        for plane in self.planes:
            plane.forget(list(wanted))
        tasks = set()
        for key in wanted:
            running = self._running.get(key)
            if running is None:
                continue
            request, task = running
            if not (request.finished or request.cancelled.is_set()):
                owner = self.hosted.get(operator_key(request.operator, request.version))
                if owner is not None:
                    owner.metrics.count(CANCELLED)
            request.cancelled.set()
            logger.info("request %s of %s cancelled by its caller", request.request_id, request.operator)
            tasks.add(task)
        for task in tasks:
            siblings = [r for r, t in self._running.values() if t is task]
            if all(r.cancelled.is_set() or r.finished for r in siblings):
                task.cancel()

    def release_orphan(self, reply: ResponseMsg) -> None:
        """A reply nobody waits for reached this worker's caller plane: free what it refers to."""
        refs = protocol.refs_in(reply.get("outputs"))
        if refs:
            task = asyncio.create_task(self.store.release(refs))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- teardown and stats ----------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Let running batches finish for at most ``timeout`` seconds, then cancel the rest.

        Requests this leaving worker will not answer are handed back through their planes
        (:meth:`ServerPlane.hand_back`): direct callers send them to another host without
        spending a retry, at once those still waiting for a slot (they never ran), after the
        drain those it had to stop. Not when the worker is beyond repair (its Triton died): what
        ran then may be what broke it, and goes back as a lost worker's requests do, within
        ``max_retries``. The broker takes its leases back itself at unregister. While
        :attr:`finishing` (the scheduler was lost, so every worker is leaving), the waiting ones
        run too, within the same ``timeout``.
        """
        if not self.finishing:
            for hosted in self.hosted.values():
                by_plane: dict[ServerPlane, list[tuple[str, str]]] = {}
                for entry in hosted.waiting:
                    by_plane.setdefault(entry.plane, []).append(entry.key)
                handed = {plane for plane, keys in by_plane.items() if plane.hand_back(keys)}
                hosted.waiting = deque(w for w in hosted.waiting if w.plane not in handed)
        deadline = time.monotonic() + timeout
        while True:
            batches = [t for h in self.hosted.values() for t in h.batches]
            if not batches:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                self.finishing = False  # start nothing more
                for task in batches:
                    task.cancel()
                await asyncio.gather(*batches, return_exceptions=True)
                break
            await asyncio.wait(batches, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if not self.keep_unanswered():
            for plane in self.planes:
                plane.hand_back()

    def stats(self) -> dict[str, Any]:
        """In-flight accounting per operator (``max_inflight_seen`` proves the limit held), and its metrics.

        ``outcomes``, ``retried`` and ``latency`` (histogram snapshots: ``wait``, ``execute``,
        ``total``) are :meth:`OperatorMetrics.snapshot`'s.
        """
        return {
            key: {
                "inflight": h.inflight,
                "max_inflight_seen": h.max_inflight_seen,
                "limit": h.config.max_inflight_requests,
                "started": h.started,
                "waiting": len(h.waiting),
                "state": h.state,
                **h.metrics.snapshot(),
            }
            for key, h in self.hosted.items()
        }
