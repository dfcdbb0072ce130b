"""A lean asyncio client for Triton's HTTP inference endpoint, used on every request's hot path.

Why not tritonclient here: a worker calls its own Triton server on 127.0.0.1 once per request,
so that call's cost is tdask's per-hop cost. Measured on 2 cores, a 1000-element encoder call
from an asyncio process (``docs/performance.md``): ``tritonclient.grpc.aio`` 0.65 ms p50 and
0.32 ms of CPU per call (gRPC's completion-queue poller thread wakes the event loop through a
socket on every call); ``tritonclient.http.aio`` (aiohttp) 1.2 ms and 0.45 ms; this client
0.43 ms and 0.12 ms. It speaks the KServe v2 protocol with Triton's binary tensor extension
(``Inference-Header-Content-Length``): one JSON header, then the raw tensor bytes, over
keep-alive HTTP/1.1 connections written and read by the event loop itself. tritonclient's gRPC
client still manages the server (readiness, load, unload) in :mod:`tdask.triton.server`; its
dtype helpers are used here.

What gRPC did and this does not: a cancelled or timed-out call closes its connection, but
Triton (2.51) does not cancel an HTTP request whose client went away; it finishes and its
answer is dropped. Models that must stop early should bound their own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from tdask.triton.interface import (
    RESERVED_PARAMETERS,
    InferResult,
    ReservedParameterError,
    TritonInferError,
    check_parameters,
)

# InferResult, ReservedParameterError, check_parameters and RESERVED_PARAMETERS live in
# tdask.triton.interface (both server kinds' clients use them); they are re-exported here.
__all__ = [
    "InferResult",
    "ReservedParameterError",
    "ShmTensor",
    "TritonHttpClient",
    "TritonHttpError",
    "RESERVED_PARAMETERS",
    "check_parameters",
]
# Stream buffer limit: bounds header lines; large bodies are read with readexactly.
_STREAM_LIMIT = 1 << 20
# Requests smaller than this are joined into one buffer and written at once.
_JOIN_BELOW = 1 << 20
# Idle keep-alive connections kept per client (more may be open while requests are in flight).
_MAX_IDLE = 64


class TritonHttpError(TritonInferError):
    """Triton answered with an HTTP error status (a :class:`~tdask.triton.interface.TritonInferError`).

    Parameters
    ----------
    status
        The HTTP status (400: invalid request, 404: unknown model, 500: the model failed).
    message
        Triton's own text.
    """

    status: int

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status=status)

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}"


@dataclass(frozen=True)
class ShmTensor:
    """Where a tensor lies in a registered shared-memory region (Triton's shared-memory extension).

    Attributes
    ----------
    region : str
        The region's name, as registered with Triton.
    offset : int
        Its first byte in the region.
    byte_size : int
        Its size (for an output: the room given to Triton).
    shape : list of int
        An input's shape (unused for outputs).
    datatype : str
        An input's Triton datatype (unused for outputs).
    """

    region: str
    offset: int
    byte_size: int
    shape: tuple[int, ...] = ()
    datatype: str = ""

    def parameters(self) -> dict[str, Any]:
        """The request parameters that point Triton at this place."""
        return {
            "shared_memory_region": self.region,
            "shared_memory_offset": self.offset,
            "shared_memory_byte_size": self.byte_size,
        }


def _encode_input(name: str, array: np.ndarray, datatype: str) -> tuple[dict[str, Any], Any]:
    if datatype == "BYTES":
        serialized = serialize_byte_tensor(array)
        data: Any = serialized.item() if serialized.size else b""
        nbytes = len(data)
    else:
        data = array.reshape(-1).view(np.uint8).data if array.size else b""
        nbytes = array.nbytes
    spec = {"name": name, "shape": list(array.shape), "datatype": datatype, "parameters": {"binary_data_size": nbytes}}
    return spec, data


def _decode_output(spec: Mapping[str, Any], body: bytes, offset: int) -> tuple[np.ndarray, int]:
    datatype = spec["datatype"]
    shape = [int(d) for d in spec.get("shape", [])]
    size = int((spec.get("parameters") or {}).get("binary_data_size", -1))
    if size < 0:
        raise TritonHttpError(200, f"output {spec.get('name')!r} came back without binary data")
    if offset + size > len(body):
        raise TritonHttpError(200, f"output {spec.get('name')!r} is cut short ({len(body) - offset} of {size} bytes)")
    chunk = memoryview(body)[offset : offset + size]
    if datatype == "BYTES":
        array = deserialize_bytes_tensor(bytes(chunk)).reshape(shape)
    else:
        dtype = triton_to_np_dtype(datatype)
        if dtype is None:
            raise TritonHttpError(200, f"output {spec.get('name')!r} has datatype {datatype}, unknown to numpy")
        array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    return array, offset + size


def _http_error(status: int, body: bytes) -> TritonHttpError:
    try:
        message = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:2000]
    return TritonHttpError(status, message)


class _NoAnswer(ConnectionError):
    """The connection failed before any byte of an answer arrived."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class TritonHttpClient:
    """Inference requests to one Triton server over a pool of keep-alive HTTP/1.1 connections.

    An :class:`~tdask.triton.interface.InferClient`, which also speaks Triton's shared-memory
    extension (:class:`~tdask.triton.shared_memory.SharedMemoryClient`).

    One connection carries one request at a time; concurrent calls open more. A connection
    whose call fails, times out or is cancelled is closed, never reused half-read.

    Parameters
    ----------
    host, port
        The server's HTTP endpoint (``127.0.0.1`` and :attr:`TritonServer.http_url`'s port).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, int(port)
        self._idle: list[_Connection] = []
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> TritonHttpClient:
        """Make a client for ``host:port`` (e.g. :attr:`TritonServer.http_url`)."""
        host, _, port = url.rpartition(":")
        return cls(host, int(port))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        *,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
        timeout: float | None = None,
        shm_inputs: Mapping[str, ShmTensor] | None = None,
        outputs: Mapping[str, ShmTensor | None] | None = None,
    ) -> InferResult:
        """Run one inference.

        Parameters
        ----------
        model
            The model's name.
        inputs
            Input names to (C-contiguous array, Triton datatype).
        model_version
            A version, or ``""`` for the one Triton picks.
        request_id
            Triton's request id (shows in its logs).
        parameters
            Request parameters for the model.
        timeout
            Seconds the call may take; ``None``: no bound.
        shm_inputs
            Inputs already written into a registered shared-memory region (not sent in the body).
        outputs
            The outputs to return (``None``: all of them, in the body): name to the place in a
            registered region Triton writes it to, or ``None`` for the body.

        Returns
        -------
        InferResult
            The outputs, their datatypes and the response parameters.

        Raises
        ------
        TritonHttpError
            Triton answered with an error status.
        ReservedParameterError
            A parameter is one Triton interprets itself.
        TimeoutError
            No answer within ``timeout`` seconds.
        ConnectionError, asyncio.IncompleteReadError
            The server went away.
        """
        if parameters:
            check_parameters(parameters)
        specs, buffers = [], []
        for name, (array, datatype) in inputs.items():
            spec, data = _encode_input(name, array, datatype)
            specs.append(spec)
            buffers.append(data)
        for name, place in (shm_inputs or {}).items():
            specs.append(
                {"name": name, "shape": list(place.shape), "datatype": place.datatype, "parameters": place.parameters()}
            )
        header: dict[str, Any] = {"inputs": specs, "parameters": {**(parameters or {}), "binary_data_output": True}}
        if outputs is not None:
            header["outputs"] = [
                {"name": name, "parameters": place.parameters() if place is not None else {"binary_data": True}}
                for name, place in outputs.items()
            ]
        if request_id:
            header["id"] = request_id
        encoded = json.dumps(header, separators=(",", ":")).encode()
        length = len(encoded) + sum(len(b) for b in buffers)
        path = f"/v2/models/{quote(model, safe='')}"
        if model_version:
            path += f"/versions/{quote(model_version, safe='')}"
        head = (
            f"POST {path}/infer HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(encoded)}\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        if length < _JOIN_BELOW:  # one write, one syscall
            parts = [b"".join([head, encoded, *buffers])]
        else:  # large tensors go to the socket as they are, not copied into one buffer first
            parts = [head + encoded, *(b for b in buffers if len(b))]
        if timeout is None:
            status, headers, body = await self._exchange(parts)
        else:
            async with asyncio.timeout(timeout):
                status, headers, body = await self._exchange(parts)
        return self._parse(status, headers, body)

    async def model_metadata(self, model: str) -> dict[str, Any]:
        """Fetch the model's metadata (``name``, ``versions``, ``inputs``, ``outputs``) as JSON.

        Raises
        ------
        TritonHttpError
            Triton answered with an error status (404: no such model loaded).
        """
        head = f"GET /v2/models/{quote(model, safe='')} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n"
        status, headers, body = await self._exchange([head.encode()])
        if status != 200:
            raise _http_error(status, body)
        return dict(json.loads(body))

    async def _exchange(self, parts: list[Any]) -> tuple[int, dict[str, str], bytes]:
        connection, reused = await self._acquire()
        try:
            try:
                status, headers, body = await self._round_trip(connection, parts)
            except _NoAnswer:
                # A kept-alive connection the server had already closed fails before any
                # answer: retry once on a fresh one. A fresh connection failing is real.
                if not reused:
                    raise
                connection.close()
                connection = await self._open()
                status, headers, body = await self._round_trip(connection, parts)
        except BaseException:
            connection.close()
            raise
        if headers.get("connection", "").lower() == "close":
            connection.close()
        else:
            self._release(connection)
        return status, headers, body

    async def _round_trip(self, connection: _Connection, parts: list[Any]) -> tuple[int, dict[str, str], bytes]:
        reader = connection.reader
        try:
            for part in parts:
                connection.writer.write(part)
            await connection.writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            raise _NoAnswer("Triton closed the connection without answering") from exc
        except ConnectionError as exc:
            raise _NoAnswer(f"the connection to Triton failed before an answer: {exc!r}") from exc
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ConnectionError(f"not an HTTP response from Triton: {lines[0][:80]!r}") from None
        headers = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(reader)
        else:
            raise ConnectionError("Triton's response has neither Content-Length nor chunked encoding")
        return status, headers, body

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from Triton: the final CRLF
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)

    @staticmethod
    def _parse(status: int, headers: Mapping[str, str], body: bytes) -> InferResult:
        if status != 200:
            raise _http_error(status, body)
        length = int(headers.get("inference-header-content-length", len(body)))
        meta = json.loads(memoryview(body)[:length].tobytes())
        outputs, datatypes = {}, {}
        offset = length
        in_shm: dict[str, list[int]] = {}
        for spec in meta.get("outputs", []):
            datatypes[spec["name"]] = spec["datatype"]
            if "binary_data_size" not in (spec.get("parameters") or {}) and "data" not in spec:
                in_shm[spec["name"]] = [int(d) for d in spec.get("shape", [])]  # written into its region
                continue
            outputs[spec["name"]], offset = _decode_output(spec, body, offset)
        return InferResult(outputs, datatypes, dict(meta.get("parameters") or {}), in_shm)

    async def register_shm(
        self, kind: Literal["system", "cuda"], name: str, request: Mapping[str, Any], timeout: float = 30.0
    ) -> None:
        """Register a shared-memory region with Triton (``v2/{kind}sharedmemory/region/<name>/register``).

        ``request`` is the extension's JSON: ``{"key", "offset", "byte_size"}`` for system memory,
        ``{"raw_handle": {"b64"}, "device_id", "byte_size"}`` for CUDA memory.

        Raises
        ------
        TritonHttpError
            Triton refused it (e.g. a region of that name exists, or it cannot open the key).
        """
        await self._control(f"/v2/{kind}sharedmemory/region/{quote(name, safe='')}/register", request, timeout)

    async def unregister_shm(self, kind: Literal["system", "cuda"], name: str, timeout: float = 30.0) -> None:
        """Unregister a shared-memory region (Triton unmaps it; the memory stays the caller's)."""
        await self._control(f"/v2/{kind}sharedmemory/region/{quote(name, safe='')}/unregister", None, timeout)

    async def _control(self, path: str, request: Mapping[str, Any] | None, timeout: float) -> None:
        data = json.dumps(request).encode() if request is not None else b""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        async with asyncio.timeout(timeout):
            status, _, body = await self._exchange([head + data])
        if status != 200:
            raise _http_error(status, body)

    async def _acquire(self) -> tuple[_Connection, bool]:
        """Return a connection, and whether it was kept alive from an earlier call."""
        if self._closed:
            raise ConnectionError("the Triton HTTP client is closed")
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
                return connection, True
            connection.close()
        return await self._open(), False

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=_STREAM_LIMIT)
        return _Connection(reader, writer)

    def _release(self, connection: _Connection) -> None:
        if self._closed or len(self._idle) >= _MAX_IDLE or not connection.usable():
            connection.close()
        else:
            self._idle.append(connection)

    async def close(self) -> None:
        """Close every idle connection; calls in flight close theirs when they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.writer.wait_closed()
