"""KServe v2 over HTTP/1.1 (tornado): health, metadata and infer, with Triton's binary tensor extension.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/{m}[/versions/{v}]``,
``GET .../ready``, ``GET .../config``, ``GET [/v2/models[/{m}]]/stats``, ``POST .../infer``,
``POST .../generate[_stream]`` (server-sent events), ``POST /v2/repository/index``,
``POST /v2/repository/models/{m}/load|unload``, ``GET /metrics`` (the gateway's own); shared
memory, trace and log settings answer a KServe error saying they are not supported (501; a
shared-memory status answers ``[]``). Infer bodies are JSON, or JSON followed by
binary tensors (``Inference-Header-Content-Length``: the JSON's length; each binary input says its
``binary_data_size``); outputs are JSON ``data`` unless ``binary_data`` (per output) or
``binary_data_output`` (per request) asks for the binary form. Compressed bodies (gzip, deflate)
are accepted only when :class:`~tdask.gateway.limits.Limits` allows them (``max_inflated_bytes``).

Every answer that is not a success is a KServe error, ``{"error": "..."}`` (unknown routes
included: 404). Infer bodies are streamed in and checked as they arrive: one over
``max_request_bytes`` is refused (413) before it is read (by its ``Content-Length``) or as soon as
it runs over (chunked or inflated).
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web

from tdask.exceptions import TdaskError
from tdask.gateway.kserve import (
    EXTENSIONS,
    UnsupportedError,
    datatype_of,
    generate_inputs,
    generate_outputs,
    raw_bytes,
    status_of,
    to_array,
)
from tdask.gateway.limits import accept_with_backoff, check_parameters, check_shape

if TYPE_CHECKING:
    from tdask.gateway.core import Gateway

logger = logging.getLogger(__name__)

__all__ = ["HttpFrontend"]

_HEADER_LENGTH = "Inference-Header-Content-Length"
_MODEL = r"/v2/models/([^/]+)(?:/versions/([^/]+))?"


class _Handler(tornado.web.RequestHandler):
    gateway: Gateway

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def check_xsrf_cookie(self) -> None:  # an API, not a browser form
        return

    def send_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def send_error_message(self, exc: BaseException) -> None:
        status, _ = status_of(exc)
        if status == 500 and not isinstance(exc, TdaskError):
            logger.exception("gateway: %s %s failed", self.request.method, self.request.path)
        self.send_json({"error": str(exc)}, status)

    # Health endpoints answer without the bearer token (load balancers probe them).
    open_route = False

    def prepare(self) -> None:
        if not self.open_route and not self.gateway.front_door.authorized(self.request.headers.get("Authorization")):
            self.set_header("WWW-Authenticate", 'Bearer realm="tdask"')
            self.send_json({"error": "unauthorized: this gateway wants 'Authorization: Bearer <token>'"}, 401)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Whatever tornado answers itself (405, an uncaught error): a KServe error, never HTML.
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if exc is not None and not isinstance(exc, tornado.web.HTTPError):
            status_code, _ = status_of(exc)
            self.set_status(status_code)
        message = str(exc) if exc is not None and not isinstance(exc, tornado.web.HTTPError) else self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, (TdaskError, OSError)):  # the scheduler gone and the like: one line, no traceback
            logger.warning("gateway: %s %s failed: %s: %s", self.request.method, self.request.path, typ.__name__, value)
        else:
            super().log_exception(typ, value, tb)


class _NotFound(_Handler):
    def prepare(self) -> None:
        self.send_json({"error": f"no KServe v2 route {self.request.method} {self.request.path}"}, 404)


class _Ready(_Handler):
    """200 while the scheduler answers and some worker hosts an operator; 503 (with why) otherwise."""

    open_route = True

    async def get(self) -> None:
        reason = await self.gateway.not_ready()
        if reason is not None:
            self.send_json({"error": f"not ready: {reason}"}, 503)
            return
        self.set_status(200)
        self.finish()


class _Live(_Handler):
    open_route = True

    async def get(self) -> None:
        self.set_status(200)
        self.finish()


class _ServerMetadata(_Handler):
    async def get(self) -> None:
        self.send_json({"name": "tdask", "version": "0.1.0", "extensions": list(EXTENSIONS)})


class _ModelMetadata(_Handler):
    async def get(self, name: str, version: str | None) -> None:
        try:
            self.send_json(await self.gateway.model_metadata(name, version))
        except Exception as exc:
            self.send_error_message(exc)


class _ModelConfig(_Handler):
    async def get(self, name: str, version: str | None) -> None:
        try:
            self.send_json(await self.gateway.model_config(name, version))
        except Exception as exc:
            self.send_error_message(exc)


class _ModelStats(_Handler):
    """``GET /v2/models[/{m}[/versions/{v}]]/stats``: Triton's statistics, from tdask's counts."""

    async def get(self, name: str | None = None, version: str | None = None) -> None:
        try:
            self.send_json({"model_stats": await self.gateway.statistics(name, version)})
        except Exception as exc:
            self.send_error_message(exc)


class _RepositoryIndex(_Handler):
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
            ready = bool(body.get("ready", False)) if isinstance(body, dict) else False
            self.send_json(await self.gateway.repository_index(ready_only=ready))
        except Exception as exc:
            self.send_error_message(exc)


class _RepositoryControl(_Handler):
    """``POST /v2/repository/models/{m}/load|unload``: the Triton model's load / unload on its workers."""

    async def post(self, name: str, action: str) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
            parameters = body.get("parameters") if isinstance(body, dict) else None
            if isinstance(parameters, dict) and any(k == "config" or k.startswith("file:") for k in parameters):
                raise UnsupportedError(f"{action} parameters (config, files) are not supported by the tdask gateway")
            await (self.gateway.load_model(name) if action == "load" else self.gateway.unload_model(name))
            self.send_json({})
        except Exception as exc:
            self.send_error_message(exc)


class _Unsupported(_Handler):
    """Triton's shared-memory registration, trace and log settings: a KServe error saying so (501).

    A shared-memory *status* query answers ``[]``: none is registered, and none can be.
    """

    def _refuse(self, *args: Any) -> None:
        path = self.request.path
        if self.request.method == "GET" and path.endswith("/status") and "sharedmemory" in path:
            self.send_json([])
            return
        what = "shared memory is" if "sharedmemory" in path else "tracing is" if "trace" in path else "log settings are"
        hint = "; send tensors in the request body" if "sharedmemory" in path else ""
        self.send_error_message(
            UnsupportedError(f"{what} not supported by the tdask gateway ({self.request.method} {path}){hint}")
        )

    get = post = _refuse


class _Generate(_Handler):
    """``POST .../generate`` (one JSON answer) and ``.../generate_stream`` (server-sent events, one per response)."""

    async def post(self, name: str, version: str | None, stream: str) -> None:
        endpoint = "generate_stream" if stream else "generate"
        started = False
        try:
            with self.gateway.metrics.observe(name, version, "http", endpoint):
                await self.gateway.operator(name, version)
                try:
                    body = json.loads(self.request.body or b"{}")
                except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                    raise ValueError(f"the request body is not JSON: {exc}") from None
                inputs, parameters = generate_inputs(body, await self.gateway.signature(name, version))
                check_parameters(parameters)
                if not stream:
                    response = await self.gateway.infer(name, version, inputs, parameters)
                    self.send_json(generate_outputs(name, version, response.outputs, response.parameters))
                    return
                async for response in self.gateway.stream(name, version, inputs, parameters):
                    if response.final and not response.outputs:
                        continue
                    if not started:
                        self.set_header("Content-Type", "text/event-stream")
                        self.set_header("Cache-Control", "no-cache")
                        started = True
                    event = generate_outputs(name, version, response.outputs, response.parameters)
                    self.write(f"data: {json.dumps(event)}\n\n")
                    await self.flush()
            if not started:
                self.set_header("Content-Type", "text/event-stream")
            self.finish()
        except Exception as exc:
            if not started:
                self.send_error_message(exc)
                return
            # Mid-stream: the status is sent; the error is the stream's last event.
            self.write(f"data: {json.dumps({'error': str(exc)})}\n\n")
            self.finish()


class _Metrics(_Handler):
    """``GET /metrics``: the gateway's own Prometheus metrics."""

    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gateway.metrics.exposition())


class _ModelReady(_Handler):
    async def get(self, name: str, version: str | None) -> None:
        self.set_status(200 if await self.gateway.model_ready(name, version) else 400)
        self.finish()


@tornado.web.stream_request_body
class _Infer(_Handler):
    """``POST .../infer``: the body streams in, checked against the limits as it comes."""

    def prepare(self) -> None:
        super().prepare()
        limits = self.gateway.limits
        self._chunks: list[bytes] = []
        self._size = 0
        self._inflater: Any = None
        if self._finished:
            return self._refuse_unread()
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limits.max_request_bytes:
            self.set_header("Connection", "close")
            self.send_json(
                {"error": f"the body ({length} bytes) is over the gateway's limit of {limits.max_request_bytes} bytes"},
                413,
            )
            return self._refuse_unread()
        encoding = self.request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            if encoding not in ("gzip", "x-gzip", "deflate") or limits.max_inflated_bytes <= 0:
                self.set_header("Connection", "close")
                allowed = "gzip and deflate" if limits.max_inflated_bytes > 0 else "none (see --max-inflated-bytes)"
                self.send_json({"error": f"Content-Encoding {encoding!r} is not accepted; accepted: {allowed}"}, 400)
                return self._refuse_unread()
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by its header
        # The limits above are the gateway's; tornado's own (a bare 400 for a chunked body) is out of the way.
        self.request.connection.set_max_body_size(1 << 62)  # type: ignore[union-attr]

    def _refuse_unread(self) -> None:
        # Answered before the body: tell tornado there is none, so that it reads none (it closes
        # the connection after the answer, since the request was not read to its end).
        self.request.headers["Content-Length"] = "0"
        self.request.headers.pop("Transfer-Encoding", None)

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        limits = self.gateway.limits
        if self._inflater is None:
            self._add(chunk, limits.max_request_bytes)
            return
        try:
            while chunk and not self._finished:
                room = limits.max_inflated_bytes - self._size
                out = self._inflater.decompress(chunk, max(room + 1, 1))
                self._add(out, limits.max_inflated_bytes)
                chunk = self._inflater.unconsumed_tail
        except zlib.error as exc:
            self.set_header("Connection", "close")
            self.send_json({"error": f"the body cannot be inflated: {exc}"}, 400)

    def _add(self, data: bytes, limit: int) -> None:
        self._size += len(data)
        if self._size > limit:
            self._chunks.clear()
            self.set_header("Connection", "close")
            self.send_json({"error": f"the body is over the gateway's limit of {limit} bytes"}, 413)
            return
        if data:
            self._chunks.append(data)

    def on_connection_close(self) -> None:
        self._chunks.clear()
        super().on_connection_close()

    async def post(self, name: str, version: str | None) -> None:
        if self._finished:
            return
        body = b"".join(self._chunks)
        self._chunks.clear()
        try:
            if self._inflater is not None and not self._inflater.eof:
                raise ValueError("the compressed body is truncated")
            if self._inflater is not None and self._inflater.unused_data:
                raise ValueError("the body has bytes after its compressed data")
            with self.gateway.metrics.observe(name, version, "http"):
                header, inputs = _parse_request(body, self.request.headers.get(_HEADER_LENGTH))
                response = await self.gateway.infer(name, version, inputs, header.get("parameters") or {})
                self._answer(name, version, header, response)
        except Exception as exc:
            self.send_error_message(exc)

    def _answer(self, name: str, version: str | None, header: dict[str, Any], response: Any) -> None:
        wanted = header.get("outputs")
        binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
        if wanted:
            selected = []
            for spec in wanted:
                if spec["name"] not in response.outputs:
                    raise ValueError(f"model {name!r} has no output {spec['name']!r}")
                binary = (spec.get("parameters") or {}).get("binary_data", binary_default)
                selected.append((spec["name"], bool(binary)))
        else:
            selected = [(output, binary_default) for output in response.outputs]
        outputs, blobs = [], []
        for output, binary in selected:
            array = np.asarray(response.outputs[output])
            entry: dict[str, Any] = {"name": output, "datatype": datatype_of(array), "shape": list(array.shape)}
            if binary:
                blob = raw_bytes(array)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            elif entry["datatype"] == "BYTES":
                entry["data"] = [bytes(x).decode("utf-8", "replace") for x in array.reshape(-1)]
            else:
                entry["data"] = array.reshape(-1).tolist()
            outputs.append(entry)
        body: dict[str, Any] = {"model_name": name, "model_version": version or "1", "outputs": outputs}
        if "id" in header:
            body["id"] = header["id"]
        if response.parameters:
            body["parameters"] = response.parameters
        encoded = json.dumps(body).encode()
        if not blobs:
            self.set_header("Content-Type", "application/json")
            self.finish(encoded)
            return
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header(_HEADER_LENGTH, str(len(encoded)))
        self.write(encoded)
        for blob in blobs:
            self.write(bytes(blob))
        self.finish()


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header and the input arrays of a KServe infer body; ``ValueError`` if malformed.

    Sizes are checked before anything is allocated from them: the header's length, each
    ``binary_data_size``, and that the binary tensors end exactly where the body does.
    """
    if header_length is None:
        length = len(body)
    elif header_length.strip().isdigit() and int(header_length) <= len(body):
        length = int(header_length)
    else:
        raise ValueError(f"{_HEADER_LENGTH} {header_length[:30]!r} is not a length within the body ({len(body)} bytes)")
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"the request body is not KServe v2 JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs", []), list):
        raise ValueError("the request body must be a JSON object with a list of 'inputs'")
    check_parameters(header.get("parameters"))
    outputs = header.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list)
        or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
    ):
        raise ValueError("'outputs' must be a list of objects with a 'name'")
    for output in outputs or []:
        check_parameters(output.get("parameters"), f"output {output['name']!r}")
    view = memoryview(body)
    offset = length
    inputs: dict[str, np.ndarray] = {}
    for spec in header.get("inputs", []):
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("name"), str)
            or not isinstance(spec.get("datatype"), str)
        ):
            raise ValueError("every input needs a 'name', a 'datatype' and a 'shape'")
        name, datatype = spec["name"], spec["datatype"]
        shape = check_shape(name, spec.get("shape"))
        size = check_parameters(spec.get("parameters"), f"input {name!r}").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"input {name!r}: binary_data_size {size!r} is not a size")
            if offset + size > len(body):
                raise ValueError(f"input {name!r}: binary_data_size {size} runs past the body's end")
            inputs[name] = to_array(name, datatype, shape, view[offset : offset + size])
            offset += size
        elif "data" in spec:
            inputs[name] = _from_json(name, datatype, shape, spec["data"])
        else:
            raise ValueError(f"input {name!r} has neither 'data' nor 'binary_data_size'")
    if offset != len(body):
        raise ValueError(f"the body has {len(body) - offset} bytes after its JSON and binary tensors")
    return header, inputs


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    try:
        flat = np.asarray(data, dtype=object).reshape(-1) if datatype == "BYTES" else np.asarray(data).reshape(-1)
        if datatype == "BYTES":
            # Strings only: bytes(N) of a number would allocate N bytes.
            if not all(isinstance(x, str) for x in flat):
                raise ValueError(f"input {name!r}: BYTES 'data' must be a list of strings")
            array = np.array([x.encode() for x in flat], dtype=object)
        else:
            from tritonclient.utils import triton_to_np_dtype

            dtype = triton_to_np_dtype(datatype)
            if dtype is None:
                raise ValueError(f"input {name!r}: datatype {datatype!r} is not supported")
            if flat.dtype.kind not in "biuf":
                raise ValueError(f"input {name!r}: {datatype} 'data' must be a list of numbers")
            array = flat.astype(dtype)
    except (OverflowError, TypeError, RecursionError) as exc:
        raise ValueError(f"input {name!r}: malformed 'data' ({exc})") from None
    try:
        return array.reshape(shape)
    except ValueError:
        raise ValueError(f"input {name!r}: {array.size} elements do not fill shape {shape}") from None


class HttpFrontend:
    """The HTTP half of a :class:`~tdask.gateway.Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        routes: list[Any] = [
            (r"/v2/health/live", _Live),
            (r"/v2/health/ready", _Ready),
            (r"/v2/?", _ServerMetadata),
            (r"/metrics", _Metrics),
            (r"/v2/models/stats", _ModelStats),  # before the model routes: "stats" is no model
            (_MODEL + r"/stats", _ModelStats),
            (r"/v2/repository/index", _RepositoryIndex),
            (r"/v2/repository/models/([^/]+)/(load|unload)", _RepositoryControl),
            (r"/v2/(?:system|cuda)sharedmemory(?:/.*)?", _Unsupported),
            (r"/v2/(?:models/[^/]+/)?trace/setting", _Unsupported),
            (r"/v2/logging", _Unsupported),
            (_MODEL + r"/generate(_stream)?", _Generate),
            (_MODEL + r"/?", _ModelMetadata),
            (_MODEL + r"/ready", _ModelReady),
            (_MODEL + r"/config", _ModelConfig),
            (_MODEL + r"/infer", _Infer),
        ]
        app = tornado.web.Application(
            [(path, cls, {"gateway": gateway}) for path, cls in routes],
            default_handler_class=_NotFound,
            default_handler_args={"gateway": gateway},
        )
        limits = gateway.limits
        self.server = _Server(
            app,
            max_connections=limits.max_connections,
            ssl_options=gateway.front_door.ssl_context(),
            decompress_request=False,  # the infer handler inflates, within its own cap
            max_body_size=limits.max_request_bytes,
            max_buffer_size=limits.max_request_bytes + (1 << 20),
            idle_connection_timeout=limits.header_timeout,  # tornado's header timeout, and the idle one
            body_timeout=limits.body_timeout,
        )

    def listen(self, host: str, port: int) -> int:
        """Bind ``host:port`` and serve; returns the port bound.

        Accepting backs off when out of file descriptors (one warning per 10 s, not a traceback
        per attempt: :func:`~tdask.gateway.limits.accept_with_backoff`).
        """
        sockets = tornado.netutil.bind_sockets(port, host)
        for sock in sockets:
            self.server._sockets[sock.fileno()] = sock
            self.server._handlers[sock.fileno()] = accept_with_backoff(sock, self.server._handle_connection)
        return int(sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop accepting connections."""
        self.server.stop()


class _Server(tornado.httpserver.HTTPServer):
    """tornado's HTTP server with a cap on open connections: past it, 503 and close."""

    def initialize(self, *args: Any, max_connections: int = 1000, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        if len(self._connections) >= self.max_connections:
            body = json.dumps({"error": f"the gateway has {self.max_connections} connections open; try later"})
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            _answer_and_close(stream, (head + body).encode())
            return
        # tornado answers a request it cannot parse (a bad Content-Length or chunk size) with a
        # bare 400 written here; make it a KServe error.
        write = stream.write

        def write_kserve(data: bytes | memoryview) -> Any:
            return write(_MALFORMED if data == _BARE_400 else data)

        stream.write = write_kserve  # type: ignore[method-assign]
        super().handle_stream(stream, address)


_BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_MALFORMED_BODY = json.dumps({"error": "malformed HTTP request (its framing: Content-Length, chunks, headers)"})
_MALFORMED = (
    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(_MALFORMED_BODY)}\r\nConnection: close\r\n\r\n{_MALFORMED_BODY}"
).encode()


def _answer_and_close(stream: tornado.iostream.IOStream, data: bytes) -> None:
    try:
        future = stream.write(data)
    except tornado.iostream.StreamClosedError:
        return
    future.add_done_callback(lambda _: stream.close())
