"""The caller's side: :class:`RemoteOperator` and :class:`Response`.

One async core with a thin sync facade, as in ``distributed.Queue``: from a synchronous
``Client`` the methods block; from an asynchronous client, or from inside an operator, they
return awaitables (``infer``) and async iterators (``stream``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask.config
import numpy as np
from dask.utils import parse_timedelta

from tdask.config import get_bytes, get_seconds
from tdask.data_plane import (
    DataPlanePeer,
    RemoteTensor,
    client_peer,
    current_scope,
    decode_tensors,
    encode_tensors,
    is_array,
)
from tdask.exceptions import (
    DataPlaneError,
    InvalidRequestError,
    OperatorUnavailableError,
    RequestTimeoutError,
    TdaskError,
    error_from_msg,
)
from tdask.operator import operator_key
from tdask.request_plane import QueueRequestPlane, ResponseStream, make_request_plane

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["RemoteOperator", "Response"]


class _UseDefault:
    def __repr__(self) -> str:
        return "USE_DEFAULT"


USE_DEFAULT: Any = _UseDefault()
"""Sentinel: take the value from ``dask.config`` (``None`` means "no deadline")."""


@dataclass
class Response:
    """One response of an operator.

    ``outputs`` maps names to arrays, or to :class:`RemoteTensor` descriptors for large tensors
    that were not fetched (``fetch=False``, the default inside operators).
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
            for name, tensor in remote.items():
                self.outputs[name] = await self._peer.fetch(tensor)
            await self._peer.release(remote.values())
        return self.outputs

    async def release(self) -> None:
        """Drop remote outputs at their owners without fetching them."""
        remote = [v for v in self.outputs.values() if isinstance(v, RemoteTensor)]
        if remote and self._peer is not None:
            await self._peer.release(remote)


# The worker-side host sets this while an operator serves a request, so that RemoteOperator
# used inside an operator talks through its worker (see tdask.worker).
current_endpoint: contextvars.ContextVar[Any] = contextvars.ContextVar("tdask_endpoint", default=None)
# ...and this to the deadline of the request being served: calls made while serving it
# inherit it unless they pass their own timeout, so every hop waits at most what is left.
current_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("tdask_deadline", default=None)


class _ClientEndpoint:
    """Request plane and data plane of a Client (one per client, created on first use)."""

    fetch_default = True

    def __init__(self, client: Client) -> None:
        self.client = client
        self.plane: QueueRequestPlane = make_request_plane(
            client.scheduler, client.id, connection_args=client.connection_args
        )
        self.plane.owner_closing = lambda: client.status in ("closing", "closed")
        self.peer = client_peer(client)

    @classmethod
    def of(cls, client: Client) -> _ClientEndpoint:
        endpoint = getattr(client, "_tdask_endpoint", None)
        if endpoint is None:
            endpoint = cls(client)
            client._tdask_endpoint = endpoint
        return endpoint

    async def place(self, key: str, array: Any) -> RemoteTensor:
        """Put a large client input into the store of a worker hosting its operator.

        A host that cannot be reached (it just died) is skipped for the next one.
        """
        hosts = await self._wait_for_hosts(key)
        errors = []
        for address in random.sample(hosts, len(hosts)):
            try:
                return await self.peer.place(address, array)
            except (TimeoutError, OSError) as exc:
                errors.append(f"{address}: {exc}")
                self.plane.forget_hosts(key)
        raise DataPlaneError(f"could not place an input for {key} on any of its hosts: {'; '.join(errors)}")

    async def _wait_for_hosts(self, key: str) -> list[str]:
        deadline = time.monotonic() + (get_seconds("tdask.request.unavailable-timeout") or 0.0)
        while True:
            hosts = await self.plane.hosts(key)
            if hosts:
                return hosts
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
        The operator version to call (default 1).
    client
        The ``distributed.Client`` to send through; by default the operator's own worker when
        used inside an operator, else ``distributed.get_client()``.
    """

    def __init__(self, name: str, *, version: int | None = None, client: Client | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"operator name must be a non-empty string, got {name!r}")
        self.name = name
        self.version = version or 1
        self.key = operator_key(name, self.version)
        self._client = client

    def __repr__(self) -> str:
        return f"RemoteOperator({self.name!r}, version={self.version})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteOperator, (self.name,), {"version": self.version, "key": self.key, "_client": None})

    # -- facade --
    def _endpoint(self) -> Any:
        if self._client is None:
            endpoint = current_endpoint.get()
            if endpoint is not None:
                return endpoint
            from distributed import get_client

            self._client = get_client()
        return _ClientEndpoint.of(self._client)

    def _is_blocking(self, endpoint: Any) -> bool:
        if not isinstance(endpoint, _ClientEndpoint):
            return False
        client = endpoint.client
        if client.asynchronous:
            return False
        try:
            return asyncio.get_running_loop() is not client.loop.asyncio_loop
        except RuntimeError:
            return True

    def infer(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        timeout: float | str | None = USE_DEFAULT,
        fetch: bool | None = None,
    ) -> Any:
        """Send one request and return its response.

        Returns a :class:`Response` (blocking, from a synchronous client) or an awaitable of it.
        ``timeout`` (seconds or ``"200ms"``; default ``tdask.request.timeout``) becomes a deadline
        that every hop honours. ``fetch`` pulls large outputs as arrays (default: yes from a
        client, no inside an operator, where descriptors can be forwarded by reference).
        For a streaming operator, ``infer`` returns the last response that carried outputs.
        """
        endpoint = self._endpoint()
        coro = self._infer(endpoint, inputs, parameters, request_id, timeout, fetch)
        if self._is_blocking(endpoint):
            return endpoint.client.sync(lambda: coro)
        return coro

    def stream(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        timeout: float | str | None = USE_DEFAULT,
        fetch: bool | None = None,
    ) -> Any:
        """Send one request and iterate over all its responses (the last one is final).

        An async iterator, or a plain iterator from a synchronous client. Leaving the loop early
        cancels the request.
        """
        endpoint = self._endpoint()
        call = _Call(self, endpoint, inputs, parameters, request_id, timeout, fetch)
        if self._is_blocking(endpoint):
            return _sync_iter(endpoint.client, call)
        return call

    async def _infer(self, endpoint: Any, inputs: Any, parameters: Any, request_id: Any, timeout: Any, fetch: Any) -> Response:
        call = _Call(self, endpoint, inputs, parameters, request_id, timeout, fetch)
        best: Response | None = None
        async with call:
            async for response in call:
                if response.outputs or best is None or not response.final:
                    best = response
        assert best is not None
        return best


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

    def __init__(self, op: RemoteOperator, endpoint: Any, inputs: Any, parameters: Any, request_id: Any, timeout: Any, fetch: Any) -> None:
        self.op = op
        self.endpoint = endpoint
        self.request_id = request_id if request_id is not None else uuid.uuid4().hex
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError(
                f"request_id must be a non-empty string, got {request_id!r}", operator=op.name
            )
        self.inputs = _check_inputs(op.name, self.request_id, inputs)
        self.parameters = _check_parameters(op.name, self.request_id, parameters)
        inherited = current_deadline.get()
        if timeout is USE_DEFAULT and inherited is not None:
            timeout_s = max(inherited - time.time(), 1e-3)
        elif timeout is USE_DEFAULT:
            timeout_s = get_seconds("tdask.request.timeout")
        elif timeout is None:
            timeout_s = None
        else:
            timeout_s = parse_timedelta(timeout, default="seconds")
            if timeout_s is None or timeout_s <= 0:
                raise InvalidRequestError(
                    f"timeout must be positive, got {timeout!r}", operator=op.name, request_id=self.request_id
                )
        self.deadline = None if timeout_s is None else time.time() + timeout_s
        self.timeout_s = timeout_s
        self.fetch = endpoint.fetch_default if fetch is None else fetch
        self.stream: ResponseStream | None = None
        self.placed: list[RemoteTensor] = []
        self.finished = False
        self.yielded = 0
        self.resends = 0

    def _error(self, cls: type[TdaskError], message: str, worker: str | None = None) -> TdaskError:
        return cls(message, operator=self.op.name, request_id=self.request_id, worker=worker)

    async def _send(self) -> None:
        entries, self.placed = await encode_tensors(
            self.inputs, lambda array: self.endpoint.place(self.op.key, array)
        )
        request = {
            "id": self.request_id,
            "operator": self.op.key,
            "name": self.op.name,
            "parameters": self.parameters,
            "inputs": entries,
            "deadline": self.deadline,
            "attempt": 0,
            "max_retries": int(dask.config.get("tdask.request.max-retries")),
            "host_wait_s": get_seconds("tdask.request.unavailable-timeout") or 0.0,
            "rehost_wait_s": get_seconds("tdask.request.rehost-timeout") or 0.0,
        }
        try:
            self.stream = await self.endpoint.plane.submit(request)
        except ValueError as exc:
            raise self._error(InvalidRequestError, str(exc)) from None

    async def __anext__(self) -> Response:
        while True:
            if self.finished:
                raise StopAsyncIteration
            reply = await self._next_reply()
            try:
                return await self._to_response(reply)
            except DataPlaneError as exc:
                # A tensor of this request died with its worker (an input we placed there, or
                # an output not yet fetched): like a lost worker, serve the request again.
                if not self._may_resend():
                    raise
                self.resends += 1
                logger.warning("request %s of %s: %s; sending it again", self.request_id, self.op.name, exc)
                self.finished = False
                await self._send()

    def _may_resend(self) -> bool:
        return (
            self.yielded == 0
            and self.resends < int(dask.config.get("tdask.request.max-retries"))
            and (self.deadline is None or self.deadline > time.time())
        )

    async def _next_reply(self) -> dict[str, Any]:
        if self.stream is None:
            await self._send()
        assert self.stream is not None
        remaining = None if self.deadline is None else self.deadline - time.time()
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):  # unlike wait_for, no task per wait
                reply = await self.stream.next()
        except TimeoutError:
            await self.aclose()
            raise self._error(
                RequestTimeoutError, f"no final response within the {self.timeout_s:g}s deadline"
            ) from None
        if reply.get("final"):
            self.finished = True
            await self._release_inputs(reply)
        return reply

    async def _to_response(self, reply: dict[str, Any]) -> Response:
        if reply.get("error"):
            raise error_from_msg(
                reply["error"], operator=self.op.name, request_id=self.request_id, worker=reply.get("worker")
            )
        response = Response(
            request_id=self.request_id,
            operator=self.op.name,
            worker=reply.get("worker"),
            outputs=decode_tensors(reply.get("outputs") or {}),
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
                scope = current_scope.get()
                if scope is not None:
                    scope.add(received)
        self.yielded += 1
        return response

    async def _release_inputs(self, reply: dict[str, Any]) -> None:
        if not self.placed:
            return
        echoed = {e["ref"]["id"] for e in (reply.get("outputs") or {}).values() if "ref" in e}
        to_release = [t for t in self.placed if t.tensor_id not in echoed]
        self.placed = []
        if to_release:
            await self.endpoint.peer.release(to_release)

    async def aclose(self) -> None:
        """Cancel the request if it has not finished, and release what it placed."""
        if not self.finished:
            self.finished = True
            if self.stream is not None:
                await asyncio.shield(self.endpoint.plane.cancel(self.request_id))
            if self.placed:
                placed, self.placed = self.placed, []
                await asyncio.shield(self.endpoint.peer.release(placed))

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


def _check_inputs(operator: str, request_id: str, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    if inputs is None:
        return {}
    if not isinstance(inputs, Mapping):
        raise InvalidRequestError(
            f"inputs must be a mapping of names to arrays, got {type(inputs).__name__}",
            operator=operator,
            request_id=request_id,
        )
    out: dict[str, Any] = {}
    total = 0
    for name, value in inputs.items():
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"input name {name!r} is not a string", operator=operator, request_id=request_id)
        if isinstance(value, RemoteTensor):
            out[name] = value
            total += value.nbytes
            continue
        if not is_array(value):
            raise InvalidRequestError(
                f"input {name!r} is a {type(value).__name__}, expected a numpy/cupy array or RemoteTensor",
                operator=operator,
                request_id=request_id,
            )
        if value.dtype == object:
            raise InvalidRequestError(
                f"input {name!r} has dtype object, which cannot be sent", operator=operator, request_id=request_id
            )
        if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
            value = np.require(value, requirements="C")  # keeps 0-d arrays 0-d
        out[name] = value
        total += int(value.nbytes)
    limit = get_bytes("tdask.request.max-input-bytes")
    if total > limit:
        raise InvalidRequestError(
            f"inputs total {total} bytes, over the limit of {limit} (tdask.request.max-input-bytes)",
            operator=operator,
            request_id=request_id,
        )
    return out


_SCALARS = (str, int, float, bool)


def _check_parameters(operator: str, request_id: str, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise InvalidRequestError(
            f"parameters must be a mapping, got {type(parameters).__name__}", operator=operator, request_id=request_id
        )
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise InvalidRequestError(f"parameter name {key!r} is not a string", operator=operator, request_id=request_id)
        if not isinstance(value, _SCALARS):
            raise InvalidRequestError(
                f"parameter {key!r} is a {type(value).__name__}; parameters must be str, int, float or bool",
                operator=operator,
                request_id=request_id,
            )
    return dict(parameters)
