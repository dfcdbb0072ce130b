"""Decoupled Triton models over gRPC ``ModelStreamInfer``: every response, in order, and cancellation.

Triton's HTTP endpoint refuses models with ``model_transaction_policy { decoupled: true }``; its
gRPC stream carries any number of responses per request. :class:`TritonStreamClient` opens one
``ModelStreamInfer`` call per request on the worker's own server (a grpc.aio channel to
127.0.0.1), asks for Triton's empty final response (``triton_enable_empty_final_response``) so
the end of a request is always flagged (``triton_final_response``), and yields each response as
it arrives. Closing the iterator early, or the ``cancelled`` event being set, cancels the call:
Triton then marks the request cancelled, which a python-backend model sees through
``is_cancelled()``.

Only decoupled models take this path; the others keep the HTTP client
(:mod:`tdask.triton.http_client`), which is cheaper per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from tdask.triton.interface import InferResult, TritonInferError

__all__ = ["TritonStreamClient", "TritonStreamError"]

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class TritonStreamError(TritonInferError):
    """Triton failed a streamed request (a :class:`~tdask.triton.interface.TritonInferError`).

    Parameters
    ----------
    code
        The gRPC status name of the call (``"INVALID_ARGUMENT"``, ``"DEADLINE_EXCEEDED"``,
        ``"UNAVAILABLE"``...), or ``None`` for an error Triton sent inside the stream (it carries
        no code).
    message
        Triton's message.
    """

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message, code=code)


def _parameter(value: str | bool | int | float) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


def _parameter_value(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _decode(response: pb.ModelInferResponse) -> InferResult:
    outputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for index, spec in enumerate(response.outputs):
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""
        shape = [int(d) for d in spec.shape]
        if spec.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw).reshape(shape) if raw else np.empty(shape, dtype=object)
        else:
            dtype = triton_to_np_dtype(spec.datatype)
            if dtype is None:
                raise TritonStreamError(None, f"output {spec.name!r} has datatype {spec.datatype}, unknown to numpy")
            array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        outputs[spec.name] = array
        datatypes[spec.name] = spec.datatype
    parameters = {key: _parameter_value(value) for key, value in response.parameters.items()}
    # Every response carries it once the empty final response is asked for; a model that is not
    # decoupled answers once.
    final = bool(parameters.pop("triton_final_response", True))
    return InferResult(outputs, datatypes, parameters, final=final)


class TritonStreamClient:
    """``ModelStreamInfer`` calls to one Triton server, one call per request.

    A :class:`~tdask.triton.interface.StreamClient`.

    Parameters
    ----------
    url
        ``host:port`` of the server's gRPC endpoint (``TritonServer.grpc_url``).

    Create it inside the event loop that uses it (a grpc.aio channel belongs to one loop).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        """The configuration Triton loaded ``model`` with, in Triton's JSON form."""
        from google.protobuf.json_format import MessageToDict

        try:
            answer = await self.stub.ModelConfig(pb.ModelConfigRequest(name=model, version=version))
        except grpc.aio.AioRpcError as exc:
            raise TritonStreamError(exc.code().name, exc.details() or str(exc)) from None
        return dict(MessageToDict(answer.config, preserving_proto_field_name=True))

    async def stream(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        *,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
        timeout: float | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> AsyncGenerator[InferResult, None]:
        """Send one request and yield its responses in order, the last with ``final=True``.

        Parameters
        ----------
        model, model_version
            The model (``""``: the version Triton picks).
        inputs
            ``name -> (C-contiguous array, Triton datatype)``.
        request_id, parameters
            Triton's request id and request parameters.
        timeout
            Seconds the whole call may take (Triton's gRPC deadline).
        cancelled
            When set, the call is cancelled and the iterator ends without a final response.

        Raises
        ------
        TritonStreamError
            Triton refused or failed the request, or the deadline passed (``DEADLINE_EXCEEDED``).
        """
        request = pb.ModelInferRequest(model_name=model, model_version=model_version, id=request_id)
        for key, value in (parameters or {}).items():
            request.parameters[key].CopyFrom(_parameter(value))
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        for name, (array, datatype) in inputs.items():
            tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
            request.inputs.append(tensor)
            if datatype == "BYTES":
                serialized = serialize_byte_tensor(array)
                request.raw_input_contents.append(serialized.item() if serialized.size else b"")
            else:
                request.raw_input_contents.append(array.tobytes())
        call = self.stub.ModelStreamInfer(timeout=timeout)
        watcher: asyncio.Task[Any] | None = None
        if cancelled is not None:
            watcher = asyncio.ensure_future(cancelled.wait())
            watcher.add_done_callback(lambda _: call.cancel())
        try:
            await call.write(request)
            await call.done_writing()
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise TritonStreamError(None, "the stream ended without a final response")
                if message.error_message:
                    raise TritonStreamError(None, message.error_message)
                response = _decode(message.infer_response)
                yield response
                if response.final:
                    return
        except asyncio.CancelledError:
            if cancelled is not None and cancelled.is_set() and not _task_cancelling():
                return  # our own call.cancel(): the request was cancelled, nothing more to send
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and cancelled is not None and cancelled.is_set():
                return
            raise TritonStreamError(exc.code().name, exc.details() or str(exc)) from None
        finally:
            if watcher is not None:
                watcher.cancel()
            if not call.done():
                call.cancel()

    async def close(self) -> None:
        """Close the channel (calls still running are cancelled)."""
        with contextlib.suppress(Exception):
            await self.channel.close()


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
