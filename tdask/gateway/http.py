"""KServe v2 over HTTP/1.1: health, metadata and infer, with Triton's binary tensor extension.

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
it runs over (chunked or inflated). The HTTP/1.1 machinery under the routes (connections,
parsing, keep-alive, timeouts, the connection cap) is :mod:`tdask.gateway.http_server`'s.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np

from tdask.exceptions import TdaskError
from tdask.gateway.http_server import Answer, Handler, HttpServer, Request, json_answer
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
from tdask.gateway.limits import check_parameters, check_shape

if TYPE_CHECKING:
    from tdask.gateway.core import Gateway

logger = logging.getLogger(__name__)

__all__ = ["HttpFrontend"]

_HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = _HEADER_LENGTH.lower()  # as the server's request headers name it
_MODEL = r"/v2/models/([^/]+)(?:/versions/([^/]+))?"


class _Handler(Handler):
    """A KServe route: the bearer token checked (the health routes aside); errors are KServe errors."""

    #: The methods the route answers (another: 405).
    methods: tuple[str, ...] = ("GET",)
    # Health endpoints answer without the bearer token (load balancers probe them).
    open_route = False

    def __init__(self, gateway: Gateway, request: Request, args: tuple[Any, ...]) -> None:
        super().__init__(request, gateway.limits.max_request_bytes)
        self.gateway = gateway
        self.args = args

    def start(self) -> Answer | None:
        if not self.open_route and not self.gateway.front_door.authorized(self.request.headers.get("authorization")):
            return json_answer(
                401,
                {"error": "unauthorized: this gateway wants 'Authorization: Bearer <token>'"},
                [("WWW-Authenticate", 'Bearer realm="tdask"')],
            )
        return None

    def send_json(self, body: Any, status: int = 200) -> None:
        self.request.send(status, json.dumps(body).encode(), "application/json")

    def send_error_message(self, exc: BaseException) -> None:
        status, _ = status_of(exc)
        if status == 500 and not isinstance(exc, TdaskError):
            logger.exception("gateway: %s %s failed", self.request.method, self.request.path)
        self.send_json({"error": str(exc)}, status)

    def uncaught(self, exc: Exception) -> None:
        status, _ = status_of(exc)
        if status == 500 and not isinstance(exc, (TdaskError, OSError)):
            logger.error("gateway: %s %s failed", self.request.method, self.request.path, exc_info=exc)
        else:  # the scheduler gone and the like: one line, no traceback
            logger.warning(
                "gateway: %s %s failed: %s: %s", self.request.method, self.request.path, type(exc).__name__, exc
            )
        self.send_json({"error": str(exc)}, status)

    def json_body(self) -> Any:
        return json.loads(self.body() or b"{}")


class _Ready(_Handler):
    """200 while the scheduler answers and some worker hosts an operator; 503 (with why) otherwise."""

    open_route = True

    async def respond(self) -> None:
        reason = await self.gateway.not_ready()
        if reason is not None:
            self.send_json({"error": f"not ready: {reason}"}, 503)
            return
        self.request.send(200)


class _Live(_Handler):
    open_route = True

    async def respond(self) -> None:
        self.request.send(200)


class _ServerMetadata(_Handler):
    async def respond(self) -> None:
        self.send_json({"name": "tdask", "version": "0.1.0", "extensions": list(EXTENSIONS)})


class _ModelMetadata(_Handler):
    async def respond(self) -> None:
        try:
            self.send_json(await self.gateway.model_metadata(*self.args))
        except Exception as exc:
            self.send_error_message(exc)


class _ModelConfig(_Handler):
    async def respond(self) -> None:
        try:
            self.send_json(await self.gateway.model_config(*self.args))
        except Exception as exc:
            self.send_error_message(exc)


class _ModelStats(_Handler):
    """``GET /v2/models[/{m}[/versions/{v}]]/stats``: Triton's statistics, from tdask's counts."""

    async def respond(self) -> None:
        try:
            name, version = self.args or (None, None)  # /v2/models/stats: every model
            self.send_json({"model_stats": await self.gateway.statistics(name, version)})
        except Exception as exc:
            self.send_error_message(exc)


class _RepositoryIndex(_Handler):
    methods = ("POST",)

    async def respond(self) -> None:
        try:
            body = self.json_body()
            ready = bool(body.get("ready", False)) if isinstance(body, dict) else False
            self.send_json(await self.gateway.repository_index(ready_only=ready))
        except Exception as exc:
            self.send_error_message(exc)


class _RepositoryControl(_Handler):
    """``POST /v2/repository/models/{m}/load|unload``: the Triton model's load / unload on its workers."""

    methods = ("POST",)

    async def respond(self) -> None:
        name, action = self.args
        try:
            body = self.json_body()
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

    methods = ("GET", "POST")

    async def respond(self) -> None:
        path, method = self.request.path, self.request.method
        if method == "GET" and path.endswith("/status") and "sharedmemory" in path:
            self.send_json([])
            return
        what = "shared memory is" if "sharedmemory" in path else "tracing is" if "trace" in path else "log settings are"
        hint = "; send tensors in the request body" if "sharedmemory" in path else ""
        self.send_error_message(UnsupportedError(f"{what} not supported by the tdask gateway ({method} {path}){hint}"))


class _Generate(_Handler):
    """``POST .../generate`` (one JSON answer) and ``.../generate_stream`` (server-sent events, one per response)."""

    methods = ("POST",)

    async def respond(self) -> None:
        name, version, stream = self.args
        endpoint = "generate_stream" if stream else "generate"
        request = self.request
        started = False
        try:
            with self.gateway.metrics.observe(name, version, "http", endpoint):
                await self.gateway.operator(name, version)
                try:
                    body = self.json_body()
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
                        request.start_stream(
                            200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
                        )
                        started = True
                    event = generate_outputs(name, version, response.outputs, response.parameters)
                    await request.write(f"data: {json.dumps(event)}\n\n".encode())
            if not started:
                request.send(200, b"", "text/event-stream")
                return
            request.finish()
        except Exception as exc:
            if not started:
                self.send_error_message(exc)
                return
            # Mid-stream: the status is sent; the error is the stream's last event.
            if not request.closed:
                await request.write(f"data: {json.dumps({'error': str(exc)})}\n\n".encode())
            request.finish()


class _Metrics(_Handler):
    """``GET /metrics``: the gateway's own Prometheus metrics."""

    async def respond(self) -> None:
        self.request.send(200, self.gateway.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")


class _ModelReady(_Handler):
    async def respond(self) -> None:
        self.request.send(200 if await self.gateway.model_ready(*self.args) else 400)


class _Infer(_Handler):
    """``POST .../infer``: the body streams in, checked against the limits as it comes."""

    methods = ("POST",)

    def start(self) -> Answer | None:
        refusal = super().start()
        self._inflater: Any = None
        self._raw = 0
        if refusal is not None:
            return refusal
        limits = self.gateway.limits
        encoding = self.request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            if encoding not in ("gzip", "x-gzip", "deflate") or limits.max_inflated_bytes <= 0:
                allowed = "gzip and deflate" if limits.max_inflated_bytes > 0 else "none (see --max-inflated-bytes)"
                return json_answer(
                    400, {"error": f"Content-Encoding {encoding!r} is not accepted; accepted: {allowed}"}, close=True
                )
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by its header
        return None

    def feed(self, chunk: bytes) -> Answer | None:
        if self._inflater is None:
            return self.add(chunk, self.limit)
        self._raw += len(chunk)
        if self._raw > self.limit:  # what is sent, compressed or not, is within max_request_bytes too
            return self.over(self.limit)
        limit = self.gateway.limits.max_inflated_bytes
        try:
            while chunk:
                out = self._inflater.decompress(chunk, max(limit - self._size + 1, 1))
                refusal = self.add(out, limit)
                if refusal is not None:
                    return refusal
                chunk = self._inflater.unconsumed_tail
        except zlib.error as exc:
            return json_answer(400, {"error": f"the body cannot be inflated: {exc}"}, close=True)
        return None

    async def respond(self) -> None:
        name, version = self.args
        body = self.body()
        try:
            if self._inflater is not None and not self._inflater.eof:
                raise ValueError("the compressed body is truncated")
            if self._inflater is not None and self._inflater.unused_data:
                raise ValueError("the body has bytes after its compressed data")
            with self.gateway.metrics.observe(name, version, "http"):
                header, inputs = _parse_request(body, self.request.headers.get(_HEADER_LENGTH_KEY))
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
            self.request.send(200, encoded, "application/json")
            return
        self.request.send(200, [encoded, *blobs], "application/octet-stream", [(_HEADER_LENGTH, str(len(encoded)))])


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
        self.gateway = gateway
        # The first route whose pattern matches the whole path is the request's (its method
        # not among the route's: 405). Infer first: the most called, and no other route's path.
        routes: list[tuple[str, type[_Handler]]] = [
            (_MODEL + r"/infer", _Infer),
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
        ]
        self._routes = [(re.compile(pattern), cls) for pattern, cls in routes]
        self.server: HttpServer | None = None

    def _route(self, request: Request) -> Handler | Answer:
        path = request.path
        for pattern, cls in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if request.method not in cls.methods:
                allowed = ", ".join(cls.methods)
                return json_answer(
                    405,
                    {"error": f"method {request.method} is not allowed on {path} (allowed: {allowed})"},
                    [("Allow", allowed)],
                )
            args = tuple(unquote(arg) if arg and "%" in arg else arg for arg in match.groups())
            return cls(self.gateway, request, args)
        return json_answer(404, {"error": f"no KServe v2 route {request.method} {path}"})

    def listen(self, host: str, port: int) -> int:
        """Bind ``host:port`` and serve; returns the port bound.

        Accepting backs off when out of file descriptors (one warning per 10 s, not a traceback
        per attempt: :func:`~tdask.gateway.limits.accept_with_backoff`).
        """
        if self.server is None:
            self.server = HttpServer(self._route, self.gateway.limits, self.gateway.front_door.ssl_context())
        return self.server.listen(host, port)

    def stop(self) -> None:
        """Stop accepting connections and close the open ones."""
        if self.server is not None:
            self.server.stop()
