"""KServe v2 over gRPC (grpc.aio): Triton's ``GRPCInferenceService``, with streaming.

Implemented: ``ServerLive``, ``ServerReady``, ``ServerMetadata``, ``ModelReady``, ``ModelMetadata``,
``ModelConfig``, ``ModelInfer`` and ``ModelStreamInfer``; the rest (shared memory, repository
control, statistics, tracing) answer ``UNIMPLEMENTED``. Tensors travel in
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
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tdask.exceptions import TdaskError
from tdask.gateway.kserve import datatype_of, raw_bytes, status_of, to_array

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
        shape = list(spec.shape)
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

    async def _abort(self, context: Any, exc: BaseException) -> None:
        _, code = status_of(exc)
        if code == "INTERNAL" and not isinstance(exc, TdaskError):
            logger.error("gateway (gRPC): %r", exc, exc_info=exc)
        await context.abort(getattr(grpc.StatusCode, code), str(exc))

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - KServe's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="tdask", version="0.1.0", extensions=["binary_tensor_data"])

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ModelReadyResponse(ready=await self.gateway.is_ready(request.name, request.version))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        if not await self.gateway.is_ready(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r} (no worker hosts it)")
        versions = [str(v) for n, v in await self.gateway.models() if n == request.name]
        return pb.ModelMetadataResponse(name=request.name, versions=versions, platform="tdask")

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        if not await self.gateway.is_ready(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r} (no worker hosts it)")
        from tritonclient.grpc import model_config_pb2

        config = model_config_pb2.ModelConfig(name=request.name, platform="tdask")
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            response = await self.gateway.infer(
                request.model_name, request.model_version, _inputs(request), _parameters(request.parameters)
            )
            return _response(request, response)
        except Exception as exc:
            await self._abort(context, exc)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def serve(request: Any) -> None:
            try:
                parameters = _parameters(request.parameters)
                empty_final = bool(parameters.get("triton_enable_empty_final_response", False))
                async for response in self.gateway.stream(
                    request.model_name, request.model_version, _inputs(request), parameters
                ):
                    if response.final and not response.outputs and not empty_final:
                        continue
                    queue.put_nowait(
                        pb.ModelStreamInferResponse(infer_response=_response(request, response, final=response.final))
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
        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.server = grpc.aio.server(options=unlimited)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(gateway), self.server)

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` and serve; returns the port bound."""
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot bind gRPC on {host}:{port}")
        await self.server.start()
        return int(bound)

    async def stop(self) -> None:
        """Stop serving; in-flight calls are cancelled after a short grace."""
        await self.server.stop(grace=1.0)
