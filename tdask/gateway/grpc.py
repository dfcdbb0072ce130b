"""KServe v2 over gRPC (grpc.aio): Triton's ``GRPCInferenceService``, with streaming.

Implemented: ``ServerLive``, ``ServerReady``, ``ServerMetadata``, ``ModelReady``, ``ModelMetadata``,
``ModelConfig``, ``ModelStatistics``, ``RepositoryIndex``, ``RepositoryModelLoad/Unload``,
``ModelInfer`` and ``ModelStreamInfer``; shared-memory status answers "none registered", and
registering shared memory, trace and log settings answer ``UNIMPLEMENTED`` with a message saying
so (:mod:`tdask.gateway.kserve` for the mapping). Tensors travel in
``raw_input_contents`` / ``raw_output_contents`` (Triton's binary layout), or typed ``contents``
on input. On ``ModelStreamInfer`` every request of the stream runs concurrently; each tdask
response is one stream response, carrying ``triton_final_response`` (a final response with no
outputs is sent only when the request set ``triton_enable_empty_final_response``, as Triton
does); an error is a stream response with ``error_message``. Closing the stream cancels its
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tdask.exceptions import TdaskError
from tdask.gateway.kserve import EXTENSIONS, UnsupportedError, datatype_of, raw_bytes, status_of, to_array
from tdask.gateway.limits import FrontDoor, check_shape

if TYPE_CHECKING:
    from tdask.gateway.core import Gateway
    from tdask.remote import Response

logger = logging.getLogger(__name__)

__all__ = ["GrpcFrontend"]

_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameters(message: Any) -> dict[str, Any]:
    out = {}
    for key, value in message.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def _set_parameter(target: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        target[key].int64_param = value
    elif isinstance(value, float):
        target[key].double_param = value
    else:
        target[key].string_param = str(value)


def _inputs(request: Any) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ValueError(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    inputs = {}
    for i, spec in enumerate(request.inputs):
        shape = check_shape(spec.name, list(spec.shape))
        if raw:
            inputs[spec.name] = to_array(spec.name, spec.datatype, shape, raw[i])
            continue
        field = _CONTENTS.get(spec.datatype)
        if field is None:
            raise ValueError(f"input {spec.name!r}: datatype {spec.datatype!r} is not supported in 'contents'")
        values = list(getattr(spec.contents, field))
        if spec.datatype == "BYTES":
            array = np.array(values, dtype=object)
        else:
            from tritonclient.utils import triton_to_np_dtype

            array = np.array(values, dtype=triton_to_np_dtype(spec.datatype))
        try:
            inputs[spec.name] = array.reshape(shape)
        except ValueError:
            raise ValueError(f"input {spec.name!r}: {array.size} elements do not fill shape {shape}") from None
    return inputs


def _response(request: Any, response: Response, *, final: bool | None = None) -> Any:
    out = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version or "1")
    if request.id:
        out.id = request.id
    wanted = [o.name for o in request.outputs] or list(response.outputs)
    for name in wanted:
        if name not in response.outputs:
            raise ValueError(f"model {request.model_name!r} has no output {name!r}")
        array = np.asarray(response.outputs[name])
        out.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        out.raw_output_contents.append(bytes(raw_bytes(array)))
    for key, value in response.parameters.items():
        _set_parameter(out.parameters, key, value)
    if final is not None:
        out.parameters["triton_final_response"].bool_param = final
    return out


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - KServe's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=await self.gateway.not_ready() is None)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="tdask", version="0.1.0", extensions=list(EXTENSIONS))

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ModelReadyResponse(ready=await self.gateway.model_ready(request.name, request.version))

    # Errors raised by these escape to _guarded, which answers them with their KServe status.
    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return json_format.ParseDict(
            await self.gateway.model_metadata(request.name, request.version), pb.ModelMetadataResponse()
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        config = await self.gateway.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        stats = await self.gateway.statistics(request.name or None, request.version)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        index = await self.gateway.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in index])

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        if any(k == "config" or k.startswith("file:") for k in request.parameters):
            raise UnsupportedError("load parameters (a config or files) are not supported by the tdask gateway")
        await self.gateway.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self.gateway.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # Shared memory: none registered, and none can be (registering is UNIMPLEMENTED, saying so).
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.SystemSharedMemoryStatusResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.CudaSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:  # noqa: N802
        raise UnsupportedError("shared memory is not supported by the tdask gateway; send tensors in the request")

    SystemSharedMemoryUnregister = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = SystemSharedMemoryRegister

    async def TraceSetting(self, request: Any, context: Any) -> Any:  # noqa: N802
        raise UnsupportedError("tracing is not supported by the tdask gateway")

    async def LogSettings(self, request: Any, context: Any) -> Any:  # noqa: N802
        raise UnsupportedError("log settings are not supported by the tdask gateway")

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            with self.gateway.metrics.observe(request.model_name, request.model_version, "grpc"):
                response = await self.gateway.infer(
                    request.model_name, request.model_version, _inputs(request), _parameters(request.parameters)
                )
                return _response(request, response)
        except Exception as exc:
            _status(context, exc)  # not context.abort(): see _status
        return pb.ModelInferResponse()  # not sent: the status says the call failed

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def serve(request: Any) -> None:
            try:
                with self.gateway.metrics.observe(request.model_name, request.model_version, "grpc", "stream"):
                    parameters = _parameters(request.parameters)
                    empty_final = bool(parameters.get("triton_enable_empty_final_response", False))
                    async for response in self.gateway.stream(
                        request.model_name, request.model_version, _inputs(request), parameters
                    ):
                        if response.final and not response.outputs and not empty_final:
                            continue
                        queue.put_nowait(
                            pb.ModelStreamInferResponse(
                                infer_response=_response(request, response, final=response.final)
                            )
                        )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, TdaskError):
                    logger.error("gateway (gRPC stream): %r", exc, exc_info=exc)
                queue.put_nowait(pb.ModelStreamInferResponse(error_message=str(exc)))

        reading = True

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            queue.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(serve(request))
                    tasks.add(task)
                    task.add_done_callback(done)
            finally:
                reading = False
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                if item is not None:
                    yield item
                elif not reading and not tasks and queue.empty():
                    break
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, *tasks, return_exceptions=True)


class GrpcFrontend:
    """The gRPC half of a :class:`~tdask.gateway.Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        limits = gateway.limits
        options = [
            # Over the limit: RESOURCE_EXHAUSTED from grpc's core, before the message is buffered whole.
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", limits.max_request_bytes),
            ("grpc.server_handshake_timeout_ms", int(limits.header_timeout * 1000)),
            ("grpc.max_connection_idle_ms", int(max(limits.header_timeout, limits.body_timeout) * 1000)),
        ]
        self.front_door = gateway.front_door
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=limits.max_connections)
        # Every method wrapped once, here (_guarded): no interceptor hop per call.
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            _Servicer(gateway), _Guarded(self.server, gateway.front_door)
        )

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` and serve (TLS when the front door has a certificate); returns the port bound."""
        door = self.front_door
        if door.tls_cert is not None and door.tls_key is not None:
            with open(door.tls_key, "rb") as key, open(door.tls_cert, "rb") as cert:
                pair = (key.read(), cert.read())
            ca = None
            if door.tls_ca is not None:
                with open(door.tls_ca, "rb") as f:
                    ca = f.read()
            credentials = grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)
            bound = self.server.add_secure_port(f"{host}:{port}", credentials)
        else:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot bind gRPC on {host}:{port}")
        await self.server.start()
        return int(bound)

    async def stop(self) -> None:
        """Stop serving; in-flight calls are cancelled after a short grace."""
        await self.server.stop(grace=1.0)


# Open to anybody, token or not: what a load balancer's health probe calls.
_OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})


class _Guarded:
    """The server, as the generated code that registers the servicer sees it.

    Each method is wrapped (:func:`_guarded`) and the wrapped ones registered on the real server.
    """

    def __init__(self, server: Any, front_door: FrontDoor) -> None:
        self.server = server
        self.front_door = front_door

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        return  # the same methods come to add_registered_method_handlers, where they are wrapped

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {
            name: _guarded(handler, None if f"/{service}/{name}" in _OPEN_METHODS else self.front_door.auth_token)
            for name, handler in handlers.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self.server.add_registered_method_handlers(service, wrapped)


_UNAUTHENTICATED = "unauthenticated: this gateway wants 'authorization' metadata 'Bearer <token>'"


def _authorized(context: Any, token: str) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, given = value.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    return False


def _status(context: Any, exc: BaseException) -> None:
    """Set the call's status from ``exc``, without raising.

    ``await context.abort(...)`` raised while handling ``exc`` chains the two, and the cycle
    through their tracebacks keeps the request (its tensors) alive until the garbage collector
    runs (issue 24: 0.8 -> 3.0 GB after four failed 300 MiB calls).
    """
    _, code = status_of(exc)
    if code == "INTERNAL" and not isinstance(exc, TdaskError):
        logger.error("gateway (gRPC): %r", exc, exc_info=exc)
    else:
        logger.debug("gateway (gRPC): %s: %s", type(exc).__name__, exc)
    context.set_code(getattr(grpc.StatusCode, code))
    context.set_details(str(exc))


def _guarded(handler: Any, token: str | None) -> Any:
    """``handler``'s method, checking the bearer ``token`` (if any) first.

    Any error the method lets out becomes its KServe status (``INTERNAL`` and a logged traceback
    only for what is not a tdask error).
    """
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            if token is not None and not _authorized(context, token):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            try:
                return await inner(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                _status(context, exc)
            return None

        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_stream is not None:
        inner_stream = handler.stream_stream

        async def stream(request_iterator: Any, context: Any) -> AsyncIterator[Any]:
            if token is not None and not _authorized(context, token):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            try:
                async for item in inner_stream(request_iterator, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                _status(context, exc)

        return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
    return handler  # KServe has no other kind of method
