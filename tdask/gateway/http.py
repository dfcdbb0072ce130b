"""KServe v2 over HTTP/1.1 (tornado): health, metadata and infer, with Triton's binary tensor extension.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/{m}[/versions/{v}]``,
``GET .../ready``, ``GET .../config``, ``POST .../infer``. Infer bodies are JSON, or JSON followed by
binary tensors (``Inference-Header-Content-Length``: the JSON's length; each binary input says its
``binary_data_size``); outputs are JSON ``data`` unless ``binary_data`` (per output) or
``binary_data_output`` (per request) asks for the binary form. Compressed bodies (gzip, deflate)
are accepted.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import tornado.httpserver
import tornado.netutil
import tornado.web

from tdask.exceptions import TdaskError
from tdask.gateway.kserve import datatype_of, raw_bytes, status_of, to_array

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


class _Live(_Handler):
    async def get(self) -> None:
        self.set_status(200)
        self.finish()


class _ServerMetadata(_Handler):
    async def get(self) -> None:
        self.send_json({"name": "tdask", "version": "0.1.0", "extensions": ["binary_tensor_data", "parameters"]})


class _ModelMetadata(_Handler):
    async def get(self, name: str, version: str | None) -> None:
        if not await self.gateway.is_ready(name, version):
            self.send_json({"error": f"unknown model {name!r} (no worker hosts it)"}, 404)
            return
        versions = [str(v) for n, v in await self.gateway.models() if n == name]
        self.send_json({"name": name, "versions": versions, "platform": "tdask", "inputs": [], "outputs": []})


class _ModelConfig(_Handler):
    async def get(self, name: str, version: str | None) -> None:
        if not await self.gateway.is_ready(name, version):
            self.send_json({"error": f"unknown model {name!r} (no worker hosts it)"}, 404)
            return
        self.send_json({"name": name, "platform": "tdask", "max_batch_size": 0, "input": [], "output": []})


class _ModelReady(_Handler):
    async def get(self, name: str, version: str | None) -> None:
        self.set_status(200 if await self.gateway.is_ready(name, version) else 400)
        self.finish()


class _Infer(_Handler):
    async def post(self, name: str, version: str | None) -> None:
        try:
            header, inputs = _parse_request(self.request.body, self.request.headers.get(_HEADER_LENGTH))
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
    """The JSON header and the input arrays of a KServe infer body; ``ValueError`` if malformed."""
    try:
        length = int(header_length) if header_length is not None else len(body)
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the request body is not KServe v2 JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs", []), list):
        raise ValueError("the request body must be a JSON object with a list of 'inputs'")
    view = memoryview(body)
    offset = length
    inputs: dict[str, np.ndarray] = {}
    for spec in header.get("inputs", []):
        try:
            name, datatype, shape = spec["name"], spec["datatype"], [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError("every input needs a 'name', a 'datatype' and a 'shape'") from None
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if offset + int(size) > len(body):
                raise ValueError(f"input {name!r}: binary_data_size {size} runs past the body's end")
            inputs[name] = to_array(name, datatype, shape, view[offset : offset + int(size)])
            offset += int(size)
        elif "data" in spec:
            inputs[name] = _from_json(name, datatype, shape, spec["data"])
        else:
            raise ValueError(f"input {name!r} has neither 'data' nor 'binary_data_size'")
    return header, inputs


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    flat = np.asarray(data, dtype=object).reshape(-1) if datatype == "BYTES" else np.asarray(data).reshape(-1)
    if datatype == "BYTES":
        array = np.array([x.encode() if isinstance(x, str) else bytes(x) for x in flat], dtype=object)
    else:
        from tritonclient.utils import triton_to_np_dtype

        dtype = triton_to_np_dtype(datatype)
        if dtype is None:
            raise ValueError(f"input {name!r}: datatype {datatype!r} is not supported")
        array = flat.astype(dtype)
    try:
        return array.reshape(shape)
    except ValueError:
        raise ValueError(f"input {name!r}: {array.size} elements do not fill shape {shape}") from None


class HttpFrontend:
    """The HTTP half of a :class:`~tdask.gateway.Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        routes: list[Any] = [
            (r"/v2/health/live", _Live),
            (r"/v2/health/ready", _Live),
            (r"/v2/?", _ServerMetadata),
            (_MODEL + r"/?", _ModelMetadata),
            (_MODEL + r"/ready", _ModelReady),
            (_MODEL + r"/config", _ModelConfig),
            (_MODEL + r"/infer", _Infer),
        ]
        app = tornado.web.Application([(path, cls, {"gateway": gateway}) for path, cls in routes])
        self.server = tornado.httpserver.HTTPServer(app, decompress_request=True, max_body_size=1 << 31)

    def listen(self, host: str, port: int) -> int:
        """Bind ``host:port`` and serve; returns the port bound."""
        sockets = tornado.netutil.bind_sockets(port, host)
        self.server.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop accepting connections."""
        self.server.stop()
