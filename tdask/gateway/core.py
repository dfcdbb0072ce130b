"""The gateway's core: one tdask client, the model table, and the KServe <-> tdask mapping.

Mapping (both protocols):

- **model** ``m`` version ``v`` (or none) is operator ``m`` version ``v`` (default 1); an
  operator that no worker hosts is an unknown model (HTTP 404, gRPC ``NOT_FOUND``) at once.
- **tensors**: every KServe datatype numpy has (``BOOL``, ``INT*``, ``UINT*``, ``FP16/32/64``,
  ``BYTES`` as an object array of ``bytes``); outputs take the datatype of their numpy dtype.
- **parameters**: request parameters pass through as tdask request parameters, except Triton's
  reserved ones; ``timeout`` (microseconds, as in Triton) becomes the request's timeout.
  Response parameters pass back.
- **errors**: :class:`~tdask.exceptions.InvalidRequestError` is HTTP 400 / ``INVALID_ARGUMENT``,
  :class:`~tdask.exceptions.RequestTimeoutError` 504 / ``DEADLINE_EXCEEDED``,
  :class:`~tdask.exceptions.OperatorUnavailableError` 503 / ``UNAVAILABLE``, any other error
  500 / ``INTERNAL``; the message names operator and request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from distributed import Client
from distributed.comm import parse_address
from distributed.comm.registry import get_backend
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from tdask.exceptions import (
    InvalidRequestError,
    OperatorUnavailableError,
    RequestTimeoutError,
)
from tdask.protocol import operator_key, pack_bytes, unpack_bytes
from tdask.remote import USE_DEFAULT, RemoteOperator, Response
from tdask.request_plane import Registry

logger = logging.getLogger(__name__)

__all__ = ["Gateway", "UnknownModelError", "to_array", "datatype_of"]

# Triton's own request parameters: they steer Triton, not the model, so they are not forwarded.
RESERVED_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "binary_data",
        "binary_data_size",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "triton_enable_empty_final_response",
        "shared_memory_region",
        "shared_memory_byte_size",
        "shared_memory_offset",
        "classification",
    }
)


class UnknownModelError(OperatorUnavailableError):
    """No worker hosts the operator a KServe request names."""


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of a numpy array (``BYTES`` for object and bytes arrays)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    datatype = np_to_triton_dtype(array.dtype)
    if datatype is None:
        raise TypeError(f"dtype {array.dtype} has no KServe datatype")
    return str(datatype)


def to_array(name: str, datatype: str, shape: list[int], raw: Any) -> np.ndarray:
    """A KServe tensor in raw form (Triton's binary layout) as a numpy array; ``ValueError`` if malformed."""
    if datatype == "BYTES":
        return unpack_bytes(raw, [int(d) for d in shape])
    dtype = triton_to_np_dtype(datatype)
    if dtype is None or datatype == "BF16":
        raise ValueError(f"input {name!r}: datatype {datatype!r} is not supported")
    array = np.frombuffer(raw, dtype=dtype)
    try:
        return array.reshape([int(d) for d in shape])
    except ValueError:
        raise ValueError(f"input {name!r}: {array.size} elements do not fill shape {list(shape)}") from None


def raw_bytes(array: np.ndarray) -> bytes | memoryview:
    """A numpy array in Triton's binary layout (BYTES length-prefixed)."""
    if array.dtype.kind in "OSU":
        return pack_bytes(np.asarray(array, dtype=object))
    return np.require(array, requirements="C").data.cast("B")


class Gateway:
    """A KServe v2 HTTP and gRPC front door to the operators of one tdask deployment.

    Parameters
    ----------
    scheduler_address
        The deployment's Dask scheduler.
    host
        The interface both servers bind (``127.0.0.1`` unless told otherwise).
    http_port, grpc_port
        Ports to bind (0: any free port; ``None``: do not serve that protocol).
    connect_timeout
        Seconds to wait for the scheduler before :meth:`start` fails.

    Use ``async with Gateway(...) as gateway`` (or :meth:`start` and :meth:`close`);
    ``gateway.http_port`` and ``gateway.grpc_port`` are the ports bound.
    """

    def __init__(
        self,
        scheduler_address: str,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = 8000,
        grpc_port: int | None = 8001,
        connect_timeout: float = 10.0,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.connect_timeout = connect_timeout
        self.client: Client | None = None
        self._registry: Registry | None = None
        self._operators: dict[str, RemoteOperator] = {}
        self._http: Any = None
        self._grpc: Any = None
        self._closed = False

    async def start(self) -> Gateway:
        """Connect to the scheduler and start serving; on failure close what started and raise."""
        get_backend(parse_address(self.scheduler_address)[0])  # a wrong protocol: ValueError, before a Client
        try:
            self.client = await Client(self.scheduler_address, asynchronous=True, timeout=self.connect_timeout)
            self._registry = Registry(self.client.scheduler)
            if self.http_port is not None:
                from tdask.gateway.http import HttpFrontend

                self._http = HttpFrontend(self)
                self.http_port = self._http.listen(self.host, self.http_port)
            if self.grpc_port is not None:
                from tdask.gateway.grpc import GrpcFrontend

                self._grpc = GrpcFrontend(self)
                self.grpc_port = await self._grpc.start(self.host, self.grpc_port)
        except BaseException:
            await self.close()
            raise
        logger.info("tdask gateway on %s: HTTP %s, gRPC %s", self.host, self.http_port, self.grpc_port)
        return self

    async def close(self) -> None:
        """Stop both servers (in-flight requests are cancelled) and close the client; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._grpc is not None:
            await self._grpc.stop()
        if self._http is not None:
            self._http.stop()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()

    async def __aenter__(self) -> Gateway:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- the model table --------------------------------------------------------------------

    async def models(self) -> list[tuple[str, int]]:
        """``(name, version)`` of every operator some worker hosts now."""
        assert self._registry is not None
        table = await self._registry.operators()
        out = []
        for key in table.get("hosts", {}):
            name, _, version = key.rpartition("/")
            out.append((name, int(version)))
        return sorted(out)

    async def is_ready(self, name: str, version: str | int | None) -> bool:
        """True when some worker hosts operator ``name`` at ``version``."""
        assert self._registry is not None
        try:
            key = operator_key(name, int(version) if version else None)
        except ValueError:
            return False
        return bool(await self._registry.hosts(key))

    async def operator(self, name: str, version: str | int | None) -> RemoteOperator:
        """The handle to call for model ``name``/``version``; :class:`UnknownModelError` if nobody hosts it."""
        try:
            number = int(version) if version else 1
        except ValueError:
            raise UnknownModelError(f"model {name!r} has no version {version!r}", operator=name) from None
        key = operator_key(name, number)
        if not await self.is_ready(name, number):
            raise UnknownModelError(f"no worker hosts operator {key} (unknown model {name!r})", operator=name)
        op = self._operators.get(key)
        if op is None:
            op = self._operators[key] = RemoteOperator(name, version=number, client=self.client)
        return op

    @staticmethod
    def split_parameters(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The parameters to forward, and the timeout (seconds) Triton's ``timeout`` (microseconds) asks for."""
        forwarded = {k: v for k, v in parameters.items() if k not in RESERVED_PARAMETERS}
        timeout = parameters.get("timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
            return forwarded, timeout / 1e6
        return forwarded, USE_DEFAULT

    async def infer(
        self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> Response:
        """One request to operator ``name``; its (last) response with outputs fetched."""
        op = await self.operator(name, version)
        forwarded, timeout = self.split_parameters(parameters)
        result: Response = await op.infer(inputs=inputs, parameters=forwarded, timeout=timeout, fetch=True)
        return result

    async def stream(
        self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> AsyncIterator[Response]:
        """Every response of one request to operator ``name``, in order; closing it cancels the request."""
        op = await self.operator(name, version)
        forwarded, timeout = self.split_parameters(parameters)
        call = op.stream(inputs=inputs, parameters=forwarded, timeout=timeout, fetch=True)
        async with call:
            async for response in call:
                yield response


def new_request_id() -> str:
    """A tdask request id (KServe ids need not be unique; they are echoed, not used)."""
    return uuid.uuid4().hex


def status_of(exc: BaseException) -> tuple[int, str]:
    """HTTP status and gRPC status name of an error."""
    if isinstance(exc, UnknownModelError):
        return 404, "NOT_FOUND"
    if isinstance(exc, (InvalidRequestError, ValueError, TypeError)):
        return 400, "INVALID_ARGUMENT"
    if isinstance(exc, (RequestTimeoutError, asyncio.TimeoutError)):
        return 504, "DEADLINE_EXCEEDED"
    if isinstance(exc, OperatorUnavailableError):
        return 503, "UNAVAILABLE"
    return 500, "INTERNAL"
