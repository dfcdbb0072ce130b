"""The worker side: :class:`OperatorHost`, the plugin that hosts operators on a Dask worker.

Two ways in:

- ``Worker(plugins=[OperatorHost([...])])`` (what :class:`tdask.Deployment` does): a setup
  failure fails the worker's start, so a broken deployment fails loudly.
- ``dask worker ADDR --preload tdask.worker --tdask-operator '{"name": ...}'`` (and the same with
  ``dask-cuda-worker``): :func:`dask_setup` adds the plugin. distributed only logs preload
  errors, so failures are also recorded in the scheduler's operator registry, where callers see
  them as :class:`~tdask.exceptions.OperatorUnavailableError` instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import dask.config
import yaml
from distributed import Worker, WorkerPlugin
from distributed.comm import get_address_host
from distributed.core import Status

from tdask.config import get_seconds
from tdask.data_plane import (
    RemoteTensor,
    TensorScope,
    TensorStore,
    current_scope,
    current_store,
    decode_tensors,
    encode_tensors,
    tensors_in,
)
from tdask.exceptions import OperatorError, TdaskError, error_to_msg
from tdask.operator import Operator, OperatorConfig, OperatorContext, Request, check_outputs
from tdask.remote import current_deadline, current_endpoint
from tdask.request_plane import DirectSession, QueueRequestPlane, Session, make_request_plane
from tdask.wire import MessageHandler, WireServer, WireSession, wire_ssl_context, wire_wanted

logger = logging.getLogger(__name__)

__all__ = ["OperatorHost", "dask_setup"]

PLUGIN_NAME = "tdask-operators"


class _WorkerEndpoint:
    """Request and data plane used by RemoteOperator inside an operator: the worker's own."""

    fetch_default = False

    def __init__(self, plane: QueueRequestPlane, store: TensorStore) -> None:
        self.plane = plane
        self.peer = store

    async def place(self, key: str, array: Any) -> RemoteTensor:
        return self.peer.put(array)


@dataclass
class _Hosted:
    """One operator on this worker, with its in-flight accounting."""

    config: OperatorConfig
    operator: Operator
    inflight: int = 0
    max_inflight_seen: int = 0
    started: int = 0
    waiting: deque[dict[str, Any]] = field(default_factory=deque)  # admitted, no free slot yet
    batches: set[asyncio.Task[None]] = field(default_factory=set)


class OperatorHost(WorkerPlugin):
    """Builds a worker's operators at setup, serves their requests, stops them at teardown.

    Parameters
    ----------
    operators
        The operators this worker hosts (validated here, so bad config fails on the caller).
    log_dir
        Where operator-owned processes (Triton) write their logs; default: the worker's
        local directory.
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(
        self,
        operators: Sequence[OperatorConfig],
        *,
        log_dir: str | Path | None = None,
        log_file: str | Path | None = None,
        log_level: str | int | None = None,
    ) -> None:
        operators = list(operators)
        if not operators:
            raise ValueError("OperatorHost needs at least one OperatorConfig")
        keys = set()
        for config in operators:
            if not isinstance(config, OperatorConfig):
                raise TypeError(f"expected OperatorConfig, got {type(config).__name__}")
            if config.key in keys:
                raise ValueError(f"operator {config.key} listed twice for one worker")
            keys.add(config.key)
        self.operators = operators
        self.log_dir = str(log_dir) if log_dir is not None else None
        self.log_file = str(log_file) if log_file is not None else None
        self.log_level = log_level.upper() if isinstance(log_level, str) else log_level
        self._reset()

    def _reset(self) -> None:
        self.worker: Worker | None = None
        self.store: TensorStore | None = None
        self.plane: QueueRequestPlane | None = None
        self.hosted: dict[str, _Hosted] = {}
        self.failures: dict[str, str] = {}
        self._requests: dict[tuple[str, str], tuple[Request, asyncio.Task[None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._triton: Any = None
        self._triton_lock = asyncio.Lock()
        self._closing = False
        self._restart: asyncio.Task[Any] | None = None
        self._direct_sessions: dict[DirectSession, str] = {}  # session -> its requester
        self._direct_routes: dict[tuple[str, str], DirectSession] = {}
        self.wire: WireServer | None = None
        self._wire_sessions: set[asyncio.Task[None]] = set()  # serving a wire session each
        self._log_handler: logging.Handler | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "operators": self.operators,
            "log_dir": self.log_dir,
            "log_file": self.log_file,
            "log_level": self.log_level,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.operators = state["operators"]
        self.log_dir = state["log_dir"]
        self.log_file = state.get("log_file")
        self.log_level = state.get("log_level")
        self._reset()

    def _start_log_file(self) -> None:
        """Apply ``log_level``; copy this worker's distributed and tdask log lines into ``log_file``."""
        if self.log_level is not None:
            for name in ("distributed", "tdask"):
                logging.getLogger(name).setLevel(self.log_level)
        if self.log_file is None:
            return
        Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_file)
        handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
        for name in ("distributed", "tdask"):
            logging.getLogger(name).addHandler(handler)
        self._log_handler = handler

    def _stop_log_file(self) -> None:
        if self._log_handler is not None:
            for name in ("distributed", "tdask"):
                logging.getLogger(name).removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # -- lifecycle ------------------------------------------------------------------------

    async def setup(self, worker: Worker) -> None:
        """Build every operator; on failure, record it for callers and raise."""
        self.worker = worker
        self._start_log_file()
        self.store = TensorStore(worker)
        self.store.install()
        worker.handlers["tdask_host_stats"] = self.stats
        worker.handlers["tdask_direct"] = self._direct_session
        worker.handlers["tdask_wire_address"] = self._wire_address
        if wire_wanted(worker.address):
            await self._start_wire(worker.address)
        self.plane = make_request_plane(
            worker.scheduler,
            f"{worker.address}#{uuid.uuid4().hex[:8]}",
            worker=worker.address,
            connection_args=worker.connection_args,
        )
        self.plane.on_orphan_response = self._release_orphan
        self.endpoint = _WorkerEndpoint(self.plane, self.store)
        context = OperatorContext(
            worker=worker,
            store=self.store,
            log_dir=self._log_dir(),
            triton_server=self._triton_server,
            restart_worker=self.restart_worker,
        )
        for config in self.operators:
            try:
                self.hosted[config.key] = _Hosted(config, await self._build(config, context))
            except Exception as exc:
                self.failures[config.name] = f"{type(exc).__name__}: {exc}"
                logger.exception("operator %s failed to start on %s", config.key, worker.address)
                worker.log_event("tdask", {"action": "operator-failed", "operator": config.key, "error": str(exc)})
        self._tasks.append(asyncio.create_task(self._serve()))
        if self.failures:
            raise RuntimeError(
                f"tdask operators failed to start on {worker.address}: "
                + "; ".join(f"{name}: {msg}" for name, msg in self.failures.items())
            )

    def _log_dir(self) -> Path:
        assert self.worker is not None
        path = Path(self.log_dir) if self.log_dir else Path(self.worker.local_directory)
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def _build(self, config: OperatorConfig, context: OperatorContext) -> Operator:
        cls = config.resolve()
        op_logger = logging.getLogger(f"tdask.operator.{config.name}")
        if config.log_level is not None:
            op_logger.setLevel(config.log_level.upper() if isinstance(config.log_level, str) else config.log_level)
        operator = cls(config.name, config.version, dict(config.parameters), config.repository, op_logger, context)
        await operator.setup()
        logger.info("operator %s ready on %s", config.key, context.worker.address)
        return operator

    async def _triton_server(self) -> Any:
        """This worker's Triton server, started on first use over all its Triton repositories."""
        async with self._triton_lock:
            if self._triton is None:
                from tdask.triton_server import TritonServer

                assert self.worker is not None
                repositories = sorted({c.repository for c in self.operators if c.is_triton and c.repository})
                server = TritonServer(
                    model_repository=repositories,
                    log_dir=self._log_dir(),
                    name=str(self.worker.name).replace("/", "_"),
                )
                await server.start()
                loop = asyncio.get_running_loop()
                server.add_exit_callback(lambda rc: loop.call_soon_threadsafe(self._triton_exited, rc))
                self._triton = server
            return self._triton

    def _triton_exited(self, returncode: int) -> None:
        if not self._closing:
            self.restart_worker(f"its Triton server exited (status {returncode})")

    def restart_worker(self, reason: str) -> None:
        """Close this worker so that its Nanny starts a fresh one (with a fresh Triton server).

        From now on, requests that fail here are not answered with their error (see
        :meth:`_send`): their leases go back to the queue when this worker leaves, and they
        are served again elsewhere.
        """
        if self._closing or self._restart is not None or self.worker is None:
            return
        logger.error("restarting worker %s: %s", self.worker.address, reason)
        self.worker.log_event("tdask", {"action": "restart", "reason": reason})
        # Not in self._tasks: teardown (which this close runs) cancels those.
        self._restart = asyncio.create_task(self.worker.close(nanny=False, reason=f"tdask-restart: {reason}"))

    async def _serve(self) -> None:
        """Once the worker is registered: announce operators (and failures), then consume."""
        worker, plane = self.worker, self.plane
        assert worker is not None and plane is not None
        while worker.status != Status.running:
            if worker.status in (Status.closing, Status.closed, Status.failed, Status.closing_gracefully):
                return
            await asyncio.sleep(0.02)
        infos = [
            {"key": key, "name": h.config.name, "version": h.config.version, "max_inflight": h.config.max_inflight_requests}
            for key, h in self.hosted.items()
        ]
        await plane.register(
            worker.address,
            infos,
            self.failures,
            on_requests=self._on_requests,
            on_cancel=self._handle_cancel,
            on_requester_left=self._requester_left,
        )
        for key, hosted in self.hosted.items():
            plane.grant(key, hosted.config.max_inflight_requests)
        await self._report_forever()

    async def _report_forever(self) -> None:
        """Tell the scheduler's ``/tdask`` page what this worker serves, whichever plane brought it."""
        assert self.plane is not None
        interval = get_seconds("tdask.worker.report-interval") or 2.0
        last: dict[str, Any] | None = None
        while True:
            stats = self.stats()
            if stats != last:
                self.plane.report(stats)
                last = stats
            await asyncio.sleep(interval)

    async def teardown(self, worker: Worker) -> None:
        """Stop taking requests, let in-flight ones finish briefly, hand back the rest, stop."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.plane is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.plane.unregister(worker.address, release_leases=False), 5)
        batches = [t for h in self.hosted.values() for t in h.batches]
        if batches:
            _, pending = await asyncio.wait(batches, timeout=get_seconds("tdask.worker.drain-timeout") or 0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.plane is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.plane.unregister(worker.address, release_leases=True), 5)
            await self.plane.aclose()
        for key, hosted in self.hosted.items():
            try:
                await hosted.operator.teardown()
            except Exception:
                logger.exception("operator %s failed to tear down", key)
        if self._triton is not None:
            await self._triton.stop(graceful=self._restart is None)
            self._triton = None
        if self.store is not None:
            await self.store.close()
        worker.handlers.pop("tdask_host_stats", None)
        worker.handlers.pop("tdask_direct", None)
        worker.handlers.pop("tdask_wire_address", None)
        for session in list(self._direct_sessions):
            await session.close()  # after what they still had to write
        if self.wire is not None:
            await self.wire.close()  # and connections that never said hello
            self.wire = None
        await asyncio.gather(*self._wire_sessions, return_exceptions=True)
        self._stop_log_file()

    # -- serving --------------------------------------------------------------------------

    def _on_requests(self, key: str, messages: list[dict[str, Any]]) -> None:
        """Requests pushed by the broker, never more than the slots we granted."""
        hosted = self.hosted.get(key)
        if hosted is None or self._closing:
            # Arrived while we stop: our leases on them are handed back at unregister.
            return
        self._admit(hosted, messages)

    def _admit(self, hosted: _Hosted, messages: list[dict[str, Any]]) -> None:
        """Run what fits in the free slots now; the rest waits here, in arrival order.

        The broker never pushes more than the slots granted to it, but requests sent directly
        (see :meth:`_direct_session`) can fill slots too: nothing ever runs beyond
        ``max_inflight_requests``.
        """
        free = hosted.config.max_inflight_requests - hosted.inflight
        if free >= len(messages) and not hosted.waiting:
            self._start_batch(hosted, messages)
            return
        hosted.waiting.extend(messages)
        self._start_waiting(hosted)

    def _start_waiting(self, hosted: _Hosted) -> int:
        free = hosted.config.max_inflight_requests - hosted.inflight
        batch = [hosted.waiting.popleft() for _ in range(min(free, len(hosted.waiting)))]
        if batch:
            self._start_batch(hosted, batch)
        return len(batch)

    async def _start_wire(self, address: str) -> None:
        """Listen for direct callers on the wire (tdask/wire.py), next to the worker's own port."""
        wire = WireServer(self._accept_wire)
        port = int(dask.config.get("tdask.worker.wire-port") or 0)
        try:
            security = self.worker.security.get_listen_args("worker") if self.worker is not None else {}
            await wire.start(get_address_host(address), port, ssl_context=wire_ssl_context(address, security))
        except OSError as exc:
            logger.warning("no wire on %s (port %s: %s): direct callers use Dask's comm", address, port, exc)
            return
        self.wire = wire
        logger.debug("wire of %s listening on %s", address, wire.address)

    def _wire_address(self) -> str | None:
        """Where direct callers reach this worker's wire (None: use Dask's comm)."""
        return None if self.wire is None or self._closing else self.wire.address

    def _accept_wire(self, session: WireSession, requester: str) -> MessageHandler:
        # Not in self._tasks: teardown cancels those first, and its drain still answers here.
        self._direct_sessions[session] = requester  # now: _requester_left may come before the task runs
        task = asyncio.create_task(self._serve_direct(session, requester))
        self._wire_sessions.add(task)
        task.add_done_callback(self._wire_sessions.discard)
        return lambda message: self._on_direct(session, requester, message)

    async def _direct_session(self, comm: Any, requester: str) -> None:
        """A caller's own comm to this worker (the direct request plane): requests in, answers out."""
        session = Session(comm, lambda message: self._on_direct(session, requester, message), f"direct-{requester}")
        await self._serve_direct(session, requester)

    async def _serve_direct(self, session: DirectSession, requester: str) -> None:
        """Serve a direct caller until its session closes; then cancel what it left running."""
        self._direct_sessions[session] = requester
        try:
            await session.read_forever()
        finally:
            self._direct_sessions.pop(session, None)
            gone = [key for key, route in self._direct_routes.items() if route is session]
            if gone and not self._closing:
                logger.info("direct caller %s left; cancelling its %d requests", requester, len(gone))
                self._handle_cancel([list(key) for key in gone])
            for key in gone:
                self._direct_routes.pop(key, None)

    def _requester_left(self, requester: str) -> None:
        """The scheduler saw this client close: close its comm here (which cancels its requests)."""
        for session, owner in list(self._direct_sessions.items()):
            if owner == requester:
                logger.info("client %s closed; closing its direct comm", requester)
                task = asyncio.create_task(session.close())
                self._tasks.append(task)
                task.add_done_callback(self._tasks.remove)

    def _on_direct(self, session: DirectSession, requester: str, message: dict[str, Any]) -> None:
        if message["op"] == "submit":
            request = dict(message["request"])
            request["requester"] = requester
            request["direct"] = True  # holds no broker credit: finishing it grants none back
            hosted = self.hosted.get(request["operator"])
            self._direct_routes[(requester, request["id"])] = session
            if hosted is None or self._closing:
                # Not (or no longer) ours: say so; the caller goes through the broker instead.
                session.send({"op": "refused", "id": request["id"]})
                self._direct_routes.pop((requester, request["id"]), None)
                return
            self._admit(hosted, [request])
        elif message["op"] == "cancel":
            self._handle_cancel([[requester, request_id] for request_id in message["request_ids"]])

    def _start_batch(self, hosted: _Hosted, messages: list[dict[str, Any]]) -> None:
        assert self.store is not None
        requests = []
        for message in messages:
            request = Request(
                request_id=message["id"],
                operator=hosted.config.name,
                version=hosted.config.version,
                inputs=decode_tensors(message.get("inputs") or {}),
                parameters=message.get("parameters") or {},
                deadline=message.get("deadline"),
                store=self.store,
                send=self._send,
            )
            request._requester = message["requester"]  # type: ignore[attr-defined]
            request._direct = bool(message.get("direct"))  # type: ignore[attr-defined]
            requests.append(request)
        for request in requests:
            request._batch = requests  # type: ignore[attr-defined]
        hosted.inflight += len(requests)
        hosted.started += len(requests)
        hosted.max_inflight_seen = max(hosted.max_inflight_seen, hosted.inflight)
        task = asyncio.create_task(self._run_batch(hosted, requests))
        hosted.batches.add(task)
        for request in requests:
            self._requests[(request._requester, request.request_id)] = (request, task)  # type: ignore[attr-defined]

    async def _run_batch(self, hosted: _Hosted, requests: list[Request]) -> None:
        scope = TensorScope()
        current_scope.set(scope)
        current_store.set(self.store)
        current_endpoint.set(self.endpoint)
        deadlines = [r.deadline for r in requests]
        current_deadline.set(None if None in deadlines else max(deadlines))  # type: ignore[type-var]
        error: BaseException | None = None
        cancelled = False
        try:
            await hosted.operator.execute(requests)
        except asyncio.CancelledError:
            cancelled = True
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
                if not cancelled or not self._closing:
                    for request in requests:
                        if request.finished or request.cancelled.is_set():
                            continue
                        if error is None:
                            error = OperatorError("the operator returned without sending a final response")
                        await request.response_sender().send(error=error)
            except Exception:
                logger.exception("answering failed requests of %s failed", hosted.config.key)
            finally:
                if scope.tensors and self.store is not None:
                    await self.store.release(list(scope.tensors.values()))
                hosted.inflight -= len(requests)
                hosted.batches.discard(asyncio.current_task())  # type: ignore[arg-type]
                if not self._closing and self.plane is not None:
                    self._start_waiting(hosted)
                    # The broker's credit counts its own requests held here (running or
                    # waiting); direct ones never took any, so they give none back.
                    from_broker = [r for r in requests if not r._direct]  # type: ignore[attr-defined]
                    self._grant(hosted, len(from_broker))
                for request in requests:
                    self._requests.pop((request._requester, request.request_id), None)  # type: ignore[attr-defined]

    async def _send(self, request: Request, response: dict[str, Any]) -> None:
        """Encode one response (large outputs into our store) and hand it to the plane."""
        assert self.store is not None and self.plane is not None and self.worker is not None
        if request.cancelled.is_set():
            return
        if response["error"] is not None and (
            self._restart is not None or (self._triton is not None and not self._triton.is_alive())
        ):
            # Failed because this worker is beyond repair (its Triton died): keep the lease, so
            # the request is served again once this worker has left, instead of failing it.
            logger.warning("not answering %s of %s: this worker is restarting", request.request_id, request.operator)
            return
        outputs = response["outputs"]
        error = response["error"]
        if error is None:
            try:
                check_outputs(request.operator, request.request_id, outputs)
                _check_response_parameters(response["parameters"])
            except (OperatorError, TypeError) as exc:
                logger.error("operator %s answered request %s badly: %s", request.operator, request.request_id, exc)
                error, outputs = exc, {}
                response = {**response, "parameters": {}, "final": True}
                request.finished = True
        entries: dict[str, Any] = {}
        if error is None:

            async def place(array: Any) -> RemoteTensor:
                return self.store.put(array)  # type: ignore[union-attr]

            entries, _ = await encode_tensors(outputs, place)
            scope = current_scope.get()
            if scope is not None:
                scope.hand_on(tensors_in(outputs.values()))
        message = {
            "id": request.request_id,
            "requester": request._requester,  # type: ignore[attr-defined]
            "operator": f"{request.operator}/{request.version}",
            "worker": self.worker.address,
            "outputs": entries,
            "parameters": response["parameters"] if error is None else {},
            "error": None if error is None else error_to_msg(error, request.operator),
            "final": response["final"],
        }
        scope = current_scope.get()
        batch = getattr(request, "_batch", ())
        if response["final"] and scope is not None and scope.tensors and all(r.finished for r in batch):
            # The batch is done with what it received: free it before the caller hears back,
            # so "answered" implies "intermediate tensors released".
            received, scope.tensors = list(scope.tensors.values()), {}
            await self.store.release(received)
        key = (message["requester"], message["id"])
        route = self._direct_routes.pop(key, None) if message["final"] else self._direct_routes.get(key)
        try:
            if route is not None:
                await route.drain()  # a caller that reads slower than we answer slows us down
                route.send({"op": "replies", "replies": [message]})
            else:
                self.plane.respond([message])
        except Exception as exc:
            logger.error("could not deliver response to %s of %s: %s", request.request_id, request.operator, exc)

    def _handle_cancel(self, keys: list[list[str]]) -> None:
        wanted = {(requester, request_id) for requester, request_id in keys}
        for hosted in self.hosted.values():  # still waiting for a slot: never runs
            dropped = [m for m in hosted.waiting if (m["requester"], m["id"]) in wanted]
            if dropped:
                hosted.waiting = deque(m for m in hosted.waiting if (m["requester"], m["id"]) not in wanted)
                self._grant(hosted, sum(1 for m in dropped if not m.get("direct")))
        for key in wanted:
            self._direct_routes.pop(key, None)
        tasks = set()
        for requester, request_id in keys:
            entry = self._requests.get((requester, request_id))
            if entry is None:
                continue
            request, task = entry
            request.cancelled.set()
            logger.info("request %s of %s cancelled by its caller", request_id, request.operator)
            tasks.add(task)
        for task in tasks:
            siblings = [r for r, t in self._requests.values() if t is task]
            if all(r.cancelled.is_set() or r.finished for r in siblings):
                task.cancel()

    def _grant(self, hosted: _Hosted, n: int) -> None:
        if n and not self._closing and self.plane is not None:
            self.plane.grant(hosted.config.key, n)

    def _release_orphan(self, reply: dict[str, Any]) -> None:
        refs = tensors_in(decode_tensors(reply.get("outputs") or {}).values())
        if refs and self.store is not None:
            asyncio.create_task(self.store.release(refs))

    def stats(self) -> dict[str, Any]:
        """In-flight accounting per operator (``max_inflight_seen`` proves the limit held)."""
        return {
            key: {
                "inflight": h.inflight,
                "max_inflight_seen": h.max_inflight_seen,
                "limit": h.config.max_inflight_requests,
                "started": h.started,
                "waiting": len(h.waiting),
            }
            for key, h in self.hosted.items()
        }


def _check_response_parameters(parameters: dict[str, Any]) -> None:
    for key, value in parameters.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"response parameter {key!r}={value!r} is not a str/int/float/bool")


# -- preload ------------------------------------------------------------------------------


def parse_operator_option(text: str) -> list[OperatorConfig]:
    """Read ``--tdask-operator``: a JSON object or list, or ``@path`` to a JSON/YAML file."""
    if text.startswith("@"):
        data = yaml.safe_load(Path(text[1:]).read_text())
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    configs = []
    for item in items:
        if not isinstance(item, dict):
            raise click.BadParameter(f"expected an object describing an operator, got {item!r}")
        try:
            configs.append(OperatorConfig(**item))
        except (TypeError, ValueError) as exc:
            raise click.BadParameter(str(exc)) from None
    return configs


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--tdask-operator",
    "operators",
    multiple=True,
    required=True,
    help='An operator to host, as JSON ({"name": ..., "implementation": ..., ...}) or @file.',
)
@click.option("--tdask-log-dir", "log_dir", default=None, help="Directory for Triton's and operators' logs.")
async def dask_setup(worker: Worker, operators: tuple[str, ...], log_dir: str | None) -> None:
    """Host tdask operators on a worker started with ``--preload tdask.worker``."""
    configs = [config for text in operators for config in parse_operator_option(text)]
    host = OperatorHost(configs, log_dir=log_dir)
    started = time.monotonic()
    try:
        await worker.plugin_add(plugin=host, name=PLUGIN_NAME, catch_errors=False)
    except Exception as exc:
        # distributed only logs preload failures; the host already recorded them in the
        # scheduler's registry, so callers get OperatorUnavailableError with this message.
        logger.error("tdask preload failed on %s: %s", worker.address, exc)
        worker.log_event("tdask", {"action": "preload-failed", "error": str(exc)})
        return
    logger.info(
        "tdask hosting %s on %s (setup %.1fs)",
        [c.key for c in configs],
        worker.address,
        time.monotonic() - started,
    )


__all__ += ["parse_operator_option"]
