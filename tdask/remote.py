"""The caller's side: :class:`RemoteOperator` and :class:`Response`.

One async core with a thin sync facade, as in ``distributed.Queue``: from a synchronous
``Client`` the methods block; from an asynchronous client, or from inside an operator, they
return awaitables (``infer``) and async iterators (``stream``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from dask.utils import parse_timedelta

from tdask import context, protocol
from tdask.config import RequestSettings
from tdask.context import Endpoint
from tdask.data_plane import DataPlanePeer, RemoteTensor, client_peer
from tdask.exceptions import (
    ClientClosedError,
    DataPlaneError,
    InvalidRequestError,
    OperatorError,
    OperatorUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
    TdaskError,
    error_from_msg,
)
from tdask.protocol import ResponseMsg, operator_key
from tdask.request_plane import BrokerSession, Registry, RequestPlane, ResponseStream, make_request_plane
from tdask.transport import is_gone

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["RemoteOperator", "Response"]


# Releases that nobody waits for (after a failed attempt); held here so they are not collected.
_background: set[asyncio.Task[Any]] = set()


class _UseDefault:
    def __repr__(self) -> str:
        return "USE_DEFAULT"


USE_DEFAULT: Any = _UseDefault()
"""Sentinel: take the value from ``dask.config`` (``None`` means "no deadline")."""


@dataclass
class Response:
    """One response of an operator.

    ``outputs`` maps names to arrays, or to :class:`RemoteTensor` descriptors for large tensors
    that were not fetched (``fetch=False``, the default inside operators). Host arrays are
    read-only, inline or fetched: copy one before changing it.
    """

    request_id: str
    operator: str
    worker: str | None
    outputs: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=dict)
    final: bool = True
    _peer: DataPlanePeer | None = field(default=None, repr=False)

    async def fetch(self) -> dict[str, Any]:
        """Pull every remote output, release it at its owner, and return all outputs as arrays."""
        remote = {k: v for k, v in self.outputs.items() if isinstance(v, RemoteTensor)}
        if remote:
            assert self._peer is not None
            for name, tensor in remote.items():  # each fetched and released in one call
                self.outputs[name] = await self._peer.fetch(tensor, release=True)
        return self.outputs

    async def release(self) -> None:
        """Drop remote outputs at their owners without fetching them."""
        remote = [v for v in self.outputs.values() if isinstance(v, RemoteTensor)]
        if remote and self._peer is not None:
            await self._peer.release(remote)


# Where a Client keeps its endpoint: its extensions, where distributed keeps per-client state of
# its own (``pubsub``), so tdask hangs no attribute on the Client.
_EXTENSION = "tdask"


class _ClientEndpoint:
    """Request plane and data plane of a Client (an :class:`~tdask.context.Endpoint`, one per client)."""

    fetch_default = True

    def __init__(self, client: Client) -> None:
        self.client = client
        broker = BrokerSession(Registry(client.scheduler), client.id, connection_args=client.connection_args)
        self.plane: RequestPlane = make_request_plane(broker, connection_args=client.connection_args)
        self.plane.owner_closing = lambda: self.closed
        self.peer = client_peer(client)
        self.peer.shortcut = self.plane.shortcut  # host tensors to and from workers, where it can

    @property
    def closed(self) -> bool:
        """Whether the client is closed or closing (no request can be sent through it)."""
        return self.client.status in ("closing", "closed")

    @classmethod
    def of(cls, client: Client) -> _ClientEndpoint:
        """The client's endpoint, kept among the client's extensions (``Client.extensions``)."""
        endpoint = client.extensions.get(_EXTENSION)
        if not isinstance(endpoint, cls):
            endpoint = client.extensions[_EXTENSION] = cls(client)
        return endpoint

    async def place(self, key: str, array: Any, wait_s: float) -> RemoteTensor:
        """Put a large client input into the store of a worker hosting its operator.

        Waits up to ``wait_s`` for a host; a host that cannot be reached (it just died) is
        skipped for the next one.
        """
        hosts = await self._wait_for_hosts(key, wait_s)
        errors = []
        for address in random.sample(hosts, len(hosts)):
            try:
                return await self.peer.place(address, array)
            except (TimeoutError, OSError) as exc:  # a refused (dead) host fails at once
                errors.append(f"{address}: {exc}")
                self.plane.registry.forget_hosts(key)
        raise DataPlaneError(f"could not place an input for {key} on any of its hosts: {'; '.join(errors)}")

    async def _wait_for_hosts(self, key: str, wait_s: float) -> list[str]:
        deadline = time.monotonic() + wait_s
        while True:
            hosts = [h for h in await self.plane.registry.hosts(key) if not is_gone(h)]
            if hosts:
                return hosts
            self.plane.registry.forget_hosts(key)
            if time.monotonic() >= deadline:
                raise OperatorUnavailableError(f"no worker hosts operator {key}; cannot place its inputs")
            await asyncio.sleep(0.1)


class RemoteOperator:
    """A handle to an operator served somewhere in the cluster.

    Parameters
    ----------
    name
        The operator's name.
    version
        The operator version to call. Default: the highest version hosted when the request is
        sent (Triton's default version policy; version 1 while none is hosted yet). Naming a
        version pins it.
    client
        The ``distributed.Client`` to send through; by default the operator's own worker when
        used inside an operator, else ``distributed.get_client()``.
    """

    def __init__(self, name: str, *, version: int | None = None, client: Client | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"operator name must be a non-empty string, got {name!r}")
        self.name = name
        #: Whether the caller named the version; if not, each request goes to the latest hosted.
        self.pinned = version is not None
        self.version = version or 1
        self.key = operator_key(name, self.version)
        self._client = client

    def __repr__(self) -> str:
        return f"RemoteOperator({self.name!r}, version={self.version if self.pinned else 'latest'})"

    def __reduce__(self) -> tuple[Any, ...]:
        state = {"version": self.version, "key": self.key, "pinned": self.pinned, "_client": None}
        return (RemoteOperator, (self.name,), state)

    # -- facade --
    def _endpoint(self) -> Endpoint:
        if self._client is None:
            serving = context.current.get()
            if serving is not None:
                return serving.endpoint
            from distributed import get_client

            self._client = get_client()
        return _ClientEndpoint.of(self._client)

    def _is_blocking(self, endpoint: Endpoint) -> TypeGuard[_ClientEndpoint]:
        if not isinstance(endpoint, _ClientEndpoint):
            return False
        client = endpoint.client
        if client.asynchronous:
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return True
        return client.loop is None or running is not getattr(client.loop, "asyncio_loop", None)

    def infer(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        timeout: float | str | None = USE_DEFAULT,
        fetch: bool | None = None,
        target: str | None = None,
        target_lost: str = "error",
    ) -> Any:
        """Send one request and return its response.

        Returns a :class:`Response` (blocking, from a synchronous client) or an awaitable of it.
        ``timeout`` (seconds or ``"200ms"``; default ``tdask.request.timeout``) becomes a deadline
        that every hop honours. ``fetch`` pulls large outputs as arrays (default: yes from a
        client, no inside an operator, where descriptors can be forwarded by reference).
        For a streaming operator, ``infer`` returns the last response that carried outputs.

        ``target`` (a worker address or name among the operator's hosts) sends the request to
        that worker instead of the one the operator's routing policy picks (least-loaded unless
        declared, see ``OperatorConfig.routing``); if it hosts the operator no more,
        ``target_lost="error"`` raises :class:`~tdask.exceptions.OperatorUnavailableError` and
        ``"fallback"`` serves the request on another host. Honoured by the direct request plane
        (the default); the queue plane refuses it with
        :class:`~tdask.exceptions.InvalidRequestError`.
        """
        endpoint = self._endpoint()
        request_id = uuid.uuid4().hex if request_id is None else request_id
        route = _route(self.name, target, target_lost)
        if self._is_blocking(endpoint):
            _check_open(endpoint, self.name, request_id)
            coro = self._infer(endpoint, inputs, parameters, request_id, timeout, fetch, route)
            try:
                return endpoint.client.sync(lambda: coro)
            except (asyncio.CancelledError, concurrent.futures.CancelledError):
                # Not this thread's own cancellation (it is no asyncio task): the client's loop
                # cancelled the call, e.g. while shutting down.
                _check_open(endpoint, self.name, request_id)
                raise RequestCancelledError(
                    "the request was cancelled in the client's event loop", operator=self.name, request_id=request_id
                ) from None
        return self._infer(endpoint, inputs, parameters, request_id, timeout, fetch, route)

    def wait(self, timeout: float | str = 60) -> Any:
        """Wait until a worker hosts this operator; return the addresses of its hosts.

        Blocks from a synchronous client, else returns an awaitable. Useful before the first
        request to a cluster whose workers are still starting (a request for a name nobody
        ever hosted fails at once once every worker has started, see docs/design.md).

        Parameters
        ----------
        timeout
            Seconds (or ``"2min"``) to wait at most.

        Raises
        ------
        OperatorUnavailableError
            No worker hosts it within ``timeout``, or its setup failed on every worker that tried.
        """
        endpoint = self._endpoint()
        timeout_s = _positive_seconds(timeout, self.name, None)
        if self._is_blocking(endpoint):
            _check_open(endpoint, self.name, None)
            return endpoint.client.sync(lambda: self._wait(endpoint, timeout_s))
        return self._wait(endpoint, timeout_s)

    async def _wait(self, endpoint: Endpoint, timeout_s: float) -> list[str]:
        registry = endpoint.plane.registry
        deadline = time.monotonic() + timeout_s
        while True:
            state = await registry.operators()
            if self.pinned:
                hosts = state["hosts"].get(self.key)
            else:  # any version of it
                hosts = [h for k, hs in state["hosts"].items() if k.rsplit("/", 1)[0] == self.name for h in hs]
            if hosts:
                return list(hosts)
            failures = state["failures"].get(self.name)
            if failures:
                detail = "; ".join(f"{w}: {m}" for w, m in sorted(failures.items()))
                raise OperatorUnavailableError(f"operator {self.key} failed to start: {detail}", operator=self.name)
            if time.monotonic() >= deadline:
                raise OperatorUnavailableError(
                    f"no worker hosts operator {self.key} after {timeout_s:g}s; hosted: {sorted(state['hosts'])}",
                    operator=self.name,
                )
            await asyncio.sleep(0.1)

    def stream(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        timeout: float | str | None = USE_DEFAULT,
        fetch: bool | None = None,
        target: str | None = None,
        target_lost: str = "error",
    ) -> Any:
        """Send one request and iterate over all its responses (the last one is final).

        An async iterator, or a plain iterator from a synchronous client. Leaving the loop early
        cancels the request. ``target`` and ``target_lost`` route it as in :meth:`infer`.
        """
        endpoint = self._endpoint()
        call = _Call(
            self, endpoint, inputs, parameters, request_id, timeout, fetch, _route(self.name, target, target_lost)
        )
        if self._is_blocking(endpoint):
            return _sync_iter(endpoint.client, call)
        return call

    async def _infer(
        self,
        endpoint: Endpoint,
        inputs: Any,
        parameters: Any,
        request_id: Any,
        timeout: Any,
        fetch: Any,
        route: Any = None,
    ) -> Response:
        call = _Call(self, endpoint, inputs, parameters, request_id, timeout, fetch, route)
        best: Response | None = None
        async with call:
            async for response in call:
                if response.outputs or best is None or not response.final:
                    best = response
        assert best is not None
        return best


def _check_open(endpoint: Endpoint, operator: str, request_id: str | None) -> None:
    """Raise :class:`ClientClosedError` when ``endpoint``'s client is closed (or closing)."""
    if endpoint.closed:
        raise ClientClosedError(
            "the client this request would go through is closed", operator=operator, request_id=request_id
        )


def _sync_iter(client: Client, call: _Call) -> Iterator[Response]:
    try:
        while True:
            try:
                yield client.sync(call.__anext__)
            except StopAsyncIteration:
                return
    finally:
        client.sync(call.aclose)


class _Call(AsyncIterator[Response]):
    """One request in flight: sends it, yields its responses, cancels it if abandoned."""

    def __init__(
        self,
        op: RemoteOperator,
        endpoint: Endpoint,
        inputs: Any,
        parameters: Any,
        request_id: Any,
        timeout: Any,
        fetch: Any,
        route: tuple[str, str] | None = None,
    ) -> None:
        self.op = op
        self.route = route
        self.endpoint = endpoint
        self.request_id = request_id if request_id is not None else uuid.uuid4().hex
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}", operator=op.name)
        _check_open(endpoint, op.name, self.request_id)
        serving = context.current.get()
        # Once per call; inside an operator, the settings its batch started with.
        settings = serving.settings if serving is not None else None
        self.settings = settings = settings or RequestSettings.read()
        self.inputs = protocol.check_inputs(op.name, self.request_id, inputs, settings.max_input_bytes)
        self.parameters = protocol.check_parameters(op.name, self.request_id, parameters)
        self.nested = serving is not None
        inherited = serving.deadline if serving is not None else None
        timeout_s: float | None
        if timeout is USE_DEFAULT and inherited is not None:
            timeout_s = max(inherited - time.time(), 1e-3)
        elif timeout is USE_DEFAULT:
            timeout_s = settings.timeout_s
        elif timeout is None:
            timeout_s = None
        else:
            timeout_s = _positive_seconds(timeout, op.name, self.request_id)
        self.deadline = None if timeout_s is None else time.time() + timeout_s
        self.timeout_s = timeout_s
        self.fetch = endpoint.fetch_default if fetch is None else fetch
        self.stream: ResponseStream | None = None
        self.placed: list[RemoteTensor] = []
        self.finished = False
        self.cancelled = False  # closed before its final response
        self.yielded = 0
        self.resends = 0
        self.key = op.key  # name/version; an unpinned call learns the latest version at each send
        self.sent_at = time.perf_counter()  # reset when it is sent, for the DEBUG log lines

    def _error(self, cls: type[TdaskError], message: str, worker: str | None = None) -> TdaskError:
        return cls(message, operator=self.op.name, request_id=self.request_id, worker=worker)

    async def _send(self) -> None:
        try:
            await self._place_and_submit()
        except TdaskError as exc:  # raised below this call (no host, no scheduler): say which request
            if exc.operator in (None, self.key):  # the planes name operators by key
                exc.operator = self.op.name
            exc.request_id = exc.request_id or self.request_id
            raise
        except ValueError as exc:  # the plane refused it (e.g. this request id is already in flight)
            raise self._error(InvalidRequestError, str(exc)) from None

    async def _place_and_submit(self) -> None:
        settings = self.settings
        if not self.op.pinned:  # the latest version hosted now (cached a second by the registry)
            latest = await self.endpoint.plane.registry.latest(self.op.name)
            self.key = operator_key(self.op.name, latest or 1)
        entries, self.placed = await protocol.encode_tensors(
            self.inputs,
            lambda array: self.endpoint.place(self.key, array, settings.unavailable_timeout_s),
            settings.inline_threshold,
        )
        request = protocol.request_msg(
            request_id=self.request_id,
            operator=self.key,
            parameters=self.parameters,
            inputs=entries,
            deadline=self.deadline,
            max_retries=settings.max_retries,
            host_wait_s=settings.unavailable_timeout_s,
            rehost_wait_s=settings.rehost_timeout_s,
        )
        if self.nested:
            request["nested"] = True
        if self.placed:  # the worker that holds them drops them as it answers: no release call
            request["placed"] = [t.tensor_id for t in self.placed]
        if self.route is not None:  # only requests that ask for a worker carry these fields
            request["target"], request["target_lost"] = self.route
        self.stream = await self.endpoint.plane.submit(request)
        if logger.isEnabledFor(logging.DEBUG):
            self.sent_at = time.perf_counter()
            again = f" again ({self.resends})" if self.resends else ""
            logger.debug("request %s of %s sent%s", self.request_id, self.key, again)

    async def __anext__(self) -> Response:
        while True:
            if self.cancelled:
                raise self._error(RequestCancelledError, "the request was cancelled (its stream was closed)")
            if self.finished:
                raise StopAsyncIteration
            reply = await self._next_reply()
            try:
                return await self._to_response(reply)
            except DataPlaneError as exc:
                # A tensor of this request died with its worker (an input we placed there, or
                # an output not yet fetched): like a lost worker, serve the request again,
                # placing the inputs anew. One we only forwarded cannot be placed again here:
                # the error goes back at once to whoever placed it.
                if self._forwarded(exc) or not self._may_resend():
                    raise
                self.resends += 1
                logger.warning("request %s of %s: %s; sending it again", self.request_id, self.op.name, exc.message)
                self.finished = False
                await self._send()

    def _forwarded(self, exc: DataPlaneError) -> bool:
        """Whether the tensor that failed is one this call only forwards (a caller's descriptor)."""
        forwarded = [t for t in self.inputs.values() if isinstance(t, RemoteTensor)]
        if not forwarded:
            return False
        if exc.tensor_id is not None:
            return any(t.tensor_id == exc.tensor_id for t in forwarded)
        return exc.owner is not None and any(t.owner == exc.owner for t in forwarded)

    def _may_resend(self) -> bool:
        return (
            self.yielded == 0
            and self.resends < self.settings.max_retries
            and (self.deadline is None or self.deadline > time.time())
        )

    async def _next_reply(self) -> ResponseMsg:
        if self.stream is None:
            await self._send()
        assert self.stream is not None
        remaining = None if self.deadline is None else self.deadline - time.time()
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            reply = await self.stream.next(remaining)  # a timer, no task or context manager per wait
        except TimeoutError:
            logger.debug("request %s of %s: no final response within its deadline", self.request_id, self.key)
            await self.aclose()
            raise self._error(
                RequestTimeoutError, f"no final response within the {self.timeout_s:g}s deadline"
            ) from None
        if reply.get("final"):
            self.finished = True
            if reply.get("error"):
                # Never let a release (maybe at a dead owner) hold up a retry. What the worker
                # that answered holds, it dropped as it answered.
                self._release_soon(reply.get("worker"))
            else:
                await self._release_inputs(reply)
            if logger.isEnabledFor(logging.DEBUG):
                error = reply.get("error")
                logger.debug(
                    "request %s of %s answered by %s: %s after %.3f ms",
                    self.request_id,
                    self.key,
                    reply.get("worker"),
                    error["type"] if error else "ok",
                    (time.perf_counter() - self.sent_at) * 1e3,
                )
        return reply

    def _release_soon(self, answered_by: str | None = None) -> None:
        placed, self.placed = [t for t in self.placed if t.owner != answered_by], []
        if placed:
            task = asyncio.create_task(self.endpoint.peer.release(placed))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _to_response(self, reply: ResponseMsg) -> Response:
        error = reply.get("error")
        if error:
            raise error_from_msg(error, operator=self.op.name, request_id=self.request_id, worker=reply.get("worker"))
        try:
            outputs = protocol.decode_tensors(reply.get("outputs") or {})
        except InvalidRequestError as exc:
            raise self._error(
                OperatorError, f"its answer could not be decoded: {exc.message}", reply.get("worker")
            ) from None
        response = Response(
            request_id=self.request_id,
            operator=self.op.name,
            worker=reply.get("worker"),
            outputs=outputs,
            parameters=reply.get("parameters") or {},
            final=bool(reply.get("final")),
            _peer=self.endpoint.peer,
        )
        received = [v for v in response.outputs.values() if isinstance(v, RemoteTensor)]
        if received:
            if self.fetch:
                try:
                    await response.fetch()
                except DataPlaneError:
                    await response.release()
                    raise
            else:
                serving = context.current.get()
                if serving is not None:
                    serving.scope.add(received)
        self.yielded += 1
        return response

    async def _release_inputs(self, reply: ResponseMsg) -> None:
        if not self.placed:
            return
        echoed = {e["ref"]["id"] for e in (reply.get("outputs") or {}).values() if "ref" in e}
        answered_by = reply.get("worker")  # it dropped what it holds of them as it answered
        to_release = [t for t in self.placed if t.tensor_id not in echoed and t.owner != answered_by]
        self.placed = []
        if to_release:
            await self.endpoint.peer.release(to_release)

    async def aclose(self) -> None:
        """Cancel the request if it has not finished, and release what it placed."""
        if not self.finished:
            self.finished = True
            self.cancelled = True
            if self.stream is not None:
                await asyncio.shield(self.endpoint.plane.cancel(self.request_id))
            if self.placed:
                placed, self.placed = self.placed, []
                await asyncio.shield(self.endpoint.peer.release(placed))

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


def _route(operator: str, target: str | None, target_lost: str) -> tuple[str, str] | None:
    """``(target, target_lost)`` checked, or ``None`` for least-loaded routing."""
    if target_lost not in ("error", "fallback"):
        raise InvalidRequestError(f"target_lost must be 'error' or 'fallback', got {target_lost!r}", operator=operator)
    if target is None:
        return None
    if not isinstance(target, str) or not target:
        raise InvalidRequestError(f"target must be a worker address or name, got {target!r}", operator=operator)
    return (target, target_lost)


def _positive_seconds(timeout: Any, operator: str, request_id: str | None) -> float:
    """``timeout`` (seconds, or a string such as ``"200ms"``) as positive seconds, else InvalidRequestError."""
    try:
        seconds = parse_timedelta(timeout, default="seconds")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequestError(
            f"timeout {timeout!r} is not a duration: {exc}", operator=operator, request_id=request_id
        ) from None
    if seconds is None or not seconds > 0:
        raise InvalidRequestError(
            f"timeout must be positive, got {timeout!r}", operator=operator, request_id=request_id
        )
    return float(seconds)
