"""``TritonCoreOperator``: an operator that is one model of a Triton model repository.

The model runs on the worker's own Triton server (:class:`~tdask.triton.base.TritonServerBase`,
started on first use by the worker plugin): Triton's core in the worker process (the default), or
one real ``tritonserver`` per worker process (:mod:`tdask.triton.server`). The operator uses it
through that interface alone, whichever kind it is. At setup the operator loads its model in
explicit mode, with the override given as ``OperatorConfig.parameters["config"]`` merged into the
repository's ``config.pbtxt`` (typically ``instance_group`` and ``parameters``); each request then
becomes one inference on the server's :meth:`~tdask.triton.base.TritonServerBase.client` (over
Triton's C API in process; over HTTP on 127.0.0.1 to a ``tritonserver``,
:mod:`tdask.triton.http_client` says why not gRPC). A decoupled model
(``model_transaction_policy { decoupled: true }``) is streamed instead, on the server's
:meth:`~tdask.triton.base.TritonServerBase.stream_client` (gRPC to a ``tritonserver``, which HTTP
refuses: :mod:`tdask.triton.grpc_stream`): every response it sends reaches the caller in order,
the last one final, and cancelling the request cancels the model's request.

Errors keep their meaning across the boundary: Triton's INVALID_ARG (HTTP 400: bad dtype, shape,
missing or unexpected input, and the models' own parameter checks) becomes
:class:`~tdask.exceptions.InvalidRequestError`, a passed deadline
:class:`~tdask.exceptions.RequestTimeoutError`, anything else
:class:`~tdask.exceptions.OperatorError` with Triton's message (every client raises
:class:`~tdask.triton.interface.TritonInferError`). A dead server is reported as such (with its
exit status), not as a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from tdask.config import get_seconds
from tdask.data_plane import count_host_copy, is_device_array
from tdask.exceptions import (
    InvalidRequestError,
    OperatorError,
    OperatorUnavailableError,
    RequestTimeoutError,
    TdaskError,
)
from tdask.operator import Operator, Request
from tdask.protocol.signature import triton_signature
from tdask.triton.base import TritonServerBase, TritonServerError
from tdask.triton.interface import (
    InferClient,
    InferResult,
    ReservedParameterError,
    StreamClient,
    TritonInferError,
    check_parameters,
)
from tdask.triton.shared_memory import SharedMemoryClient, ShmTransport, gpu_instance_device, host_array

__all__ = ["KIND_GPU_OUTPUTS_IN_HOST_MEMORY", "TritonCoreOperator"]

#: The :func:`~tdask.data_plane.count_host_copy` label of a ``KIND_GPU`` model's outputs that
#: came back in Triton's HTTP body, so staged through host memory (tests look for it by name).
KIND_GPU_OUTPUTS_IN_HOST_MEMORY = "KIND_GPU outputs in host memory"


def _config_override(value: Any, operator: str) -> dict[str, Any] | None:
    """``parameters["config"]`` as a dict: a mapping, a JSON string, or absent."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"operator {operator!r}: parameters['config'] is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"operator {operator!r}: parameters['config'] must be a mapping of Triton model-config keys, "
            f"got {type(value).__name__}"
        )
    return dict(value)


def _triton_parameters(parameters: Mapping[str, Any]) -> dict[str, str | bool | int | float]:
    """Request parameters in the types Triton's protocol carries (string, bool, int64, double)."""
    out: dict[str, str | bool | int | float] = {}
    for key, value in parameters.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(key, str) or not isinstance(value, (str, bool, int, float)):
            raise TypeError(
                f"request parameter {key!r} is a {type(value).__name__}; a Triton model takes only "
                "str, bool, int or float parameters"
            )
        out[key] = value
    return out


class TritonCoreOperator(Operator):
    """One model of a Triton model repository, served by the worker's Triton server.

    ``name`` is the model's name in the repository (``parameters["model"]`` may name another);
    ``version`` is the model version used when Triton has it loaded, else the latest one.
    ``parameters["config"]`` overrides the model config at load, e.g.
    ``{"instance_group": [{"kind": "KIND_GPU", "count": 2}], "parameters": {"delay": "0.001"}}``
    (keys not given keep the repository's values).

    Every request in a batch is sent to Triton at once, so Triton's own scheduler (instances,
    dynamic batching) decides how they run. Request parameters pass through as Triton request
    parameters; the request's deadline bounds the call. A cancelled or timed-out call is
    abandoned (its connection closed); Triton finishes it and drops the answer.
    """

    #: A decoupled model's client (``None``: one answer per request, on :attr:`client`).
    stream_client: StreamClient | None = None
    #: Large tensors through Triton's shared-memory extension (``None``: in the requests).
    shm: ShmTransport | None = None

    async def setup(self) -> None:
        """Load the model on the worker's Triton server and connect to it."""
        self.model = str(self.parameters.get("model", self.name))
        self.override = _config_override(self.parameters.get("config"), self.name)
        self.server: TritonServerBase = await self.context.triton_server()
        await self.server.load_model(self.model, self.override, timeout_s=get_seconds("tdask.triton.load-timeout"))
        # Triton in this process (tdask.triton.mode: in-process) answers through the C API;
        # a worker's tritonserver over HTTP (and gRPC for decoupled models).
        self.client: InferClient = self.server.client()
        where = self.server.address
        metadata = await self.client.model_metadata(self.model)
        # name -> (Triton datatype, dims with -1 for "any"): checked before a request goes out,
        # since Triton itself lets some mismatches through (a 0-d tensor for dims [-1]).
        self.input_specs = {
            i["name"]: (i["datatype"], [int(d) for d in i.get("shape", [])]) for i in metadata.get("inputs", [])
        }
        # Checked on every answer (:meth:`_check_outputs`): Triton 2.51's python backend passes
        # an output of another datatype, shape or rank than its config declares straight through.
        self.output_specs = {
            o["name"]: (o["datatype"], [int(d) for d in o.get("shape", [])]) for o in metadata.get("outputs", [])
        }
        versions = [str(v) for v in metadata.get("versions", [])]
        self.model_version = str(self.version) if str(self.version) in versions else ""
        if not self.model_version:
            self.logger.info(
                "model %r has no version %s loaded (loaded: %s); serving its latest version",
                self.model,
                self.version,
                versions,
            )
        config = self.server.model_config(self.model, self.override)
        # A batching model's tensors all start with the batch dimension (metadata shows it as -1):
        # an answer's must equal the request's.
        self.batched = int(config.get("max_batch_size") or 0) > 0
        self.reshaped = {o.get("name") for o in config.get("output", []) if o.get("reshape")}
        # What the gateway shows as this model's metadata and config, and checks requests against.
        self._signature = triton_signature(metadata, config)
        if (config.get("model_transaction_policy") or {}).get("decoupled"):
            # Triton's HTTP endpoint refuses decoupled models: stream them (over gRPC to a
            # tritonserver). Chosen here, once, so that other models' requests take no extra step.
            self.stream_client = self.server.stream_client()
            self.required_inputs = sorted(
                i["name"] for i in config.get("input", []) if not i.get("optional") and i["name"] in self.input_specs
            )
            self._serve = self._serve_stream  # type: ignore[method-assign]
            self.logger.info("Triton model %r is decoupled: its responses are streamed (%s)", self.model, where)
        # Large tensors (and, for KIND_GPU instances, device tensors) through shared memory
        # (tdask.triton.shared-memory, tdask/triton/shared_memory.py), for a client that speaks
        # the extension (a tritonserver's HTTP path); the decoupled path streams, and Triton in
        # this process reads and writes tdask's buffers directly.
        self.gpu_model = gpu_instance_device(config) is not None
        if self.stream_client is None and isinstance(self.client, SharedMemoryClient):
            output_specs = {
                o["name"]: (o["datatype"], [int(d) for d in o.get("shape", [])]) for o in metadata.get("outputs", [])
            }
            try:
                self.shm = ShmTransport.from_config(self.client, config, output_specs, self.server.shm_region_prefix)
            except ValueError as exc:
                raise ValueError(f"operator {self.name!r}: {exc}") from None
            if self.shm is not None:
                self.logger.info(
                    "model %r: tensors from %d bytes through %s shared memory",
                    self.model,
                    self.shm.threshold,
                    self.shm.kind,
                )
        self.server.add_exit_callback(self._on_server_exit)
        self.logger.info("Triton model %r ready on %s (server %s)", self.model, where, self.server.pid)

    def signature(self) -> dict[str, Any] | None:
        """The model's signature as Triton shows it (inputs, outputs, ``max_batch_size``, platform)."""
        return getattr(self, "_signature", None)

    def _on_server_exit(self, returncode: int) -> None:
        # Runs in the server's watcher thread; TritonServer itself logs the log tail.
        self.logger.error("Triton server of operator %r exited (status %s)", self.name, returncode)

    def on_execution_timeout(self, requests: list[Request]) -> None:
        """A request ran past the execution timeout: restart the worker (and its Triton server).

        Triton cannot interrupt a model's ``execute()`` (a python-backend instance that hangs
        holds its instance for good, and unloading the model waits for it), so the worker
        restarts with a fresh server; the requests it holds are served again elsewhere.
        """
        ids = [r.request_id for r in requests]
        self.context.restart_worker(
            f"Triton model {self.model!r} ran past its execution timeout on requests {ids}; "
            "a model's execution cannot be interrupted"
        )

    async def teardown(self) -> None:
        """Close the clients; the worker stops the server (and with it the model)."""
        self.server.remove_exit_callback(self._on_server_exit)
        if self.shm is not None:
            await self.shm.close()
        with contextlib.suppress(Exception):
            await self.client.close()
        if self.stream_client is not None:
            await self.stream_client.close()

    #: Set while the model is unloaded by model control (its requests are refused, not sent).
    unloaded = False

    async def model_control(self, action: str) -> None:
        """``"load"``, ``"unload"`` or ``"reload"`` this operator's model on the worker's Triton server.

        Triton's explicit model control (:meth:`TritonServerBase.load_model` /
        :meth:`~TritonServerBase.unload_model`, in either server kind); a load of a loaded model
        reloads it (new files in the repository take effect), Triton finishing what runs first.
        While unloaded, requests are answered :class:`~tdask.exceptions.OperatorUnavailableError`.
        """
        if action == "unload":
            self.unloaded = True
            await self.server.unload_model(self.model)
            self.logger.info("Triton model %r unloaded by model control", self.model)
            return
        if action not in ("load", "reload"):
            raise ValueError(f"model action must be load, unload or reload, got {action!r}")
        await self.server.load_model(self.model, self.override, timeout_s=get_seconds("tdask.triton.load-timeout"))
        self.unloaded = False
        self.logger.info("Triton model %r %sed by model control", self.model, action)

    async def execute(self, requests: list[Request]) -> None:
        """Send every request to Triton concurrently and answer each with its own result."""
        if self.unloaded:
            for request in requests:
                error = OperatorUnavailableError(
                    f"model {self.model!r} is unloaded on this worker (tdask model load {self.name} loads it)",
                    operator=self.name,
                    request_id=request.request_id,
                )
                await request.response_sender().send(error=error)
            return
        if len(requests) == 1:  # the common case at low load: no extra task per request
            await self._serve(requests[0])
        else:
            await asyncio.gather(*(self._serve(request) for request in requests))

    async def _serve(self, request: Request) -> None:
        # Cancellation: the worker cancels this batch's task (and with it the HTTP call, whose
        # connection is closed) once every request of the batch is cancelled; a cancelled
        # request's answer is never sent.
        sender = request.response_sender()
        try:
            outputs, parameters = await self._infer(request)
        except TdaskError as exc:
            await sender.send(error=exc)
            return
        await sender.send(outputs=outputs, parameters=parameters)

    async def _inputs(self, request: Request) -> dict[str, tuple[Any, str]]:
        """The request's inputs with their Triton datatypes, checked against the model.

        Host arrays, except device (cupy) arrays when CUDA shared memory takes them to the model.

        Raises the request's timeout when its deadline passed, :class:`InvalidRequestError` for an
        input the model does not take.
        """
        remaining = request.remaining_s
        if remaining is not None and remaining <= 0:
            raise self._timeout(request)
        inputs = {}
        keep_device = self.shm is not None and self.shm.kind == "cuda"  # CUDA shared memory takes cupy as is
        for name, value in (await request.fetch_inputs()).items():
            try:
                array = value if keep_device and is_device_array(value) else host_array(value)
            except TypeError as exc:
                raise request.error(f"input {name!r} {exc}") from None
            datatype = np_to_triton_dtype(array.dtype)
            if datatype is None:
                raise request.error(f"input {name!r} has dtype {array.dtype}, which Triton does not support")
            self._check_input(request, name, datatype, array.shape)
            inputs[name] = (array, datatype)
        return inputs

    async def _infer(self, request: Request) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One inference; raises a tdask error that says what went wrong."""
        inputs = await self._inputs(request)
        try:
            parameters = _triton_parameters(request.parameters)
        except TypeError as exc:
            raise request.error(str(exc)) from None

        remaining = request.remaining_s
        if remaining is not None and remaining <= 0:
            raise self._timeout(request)
        began = time.monotonic()
        call: dict[str, Any] = {
            "model_version": self.model_version,
            "request_id": str(request.request_id),
            "parameters": parameters,
            "timeout": remaining,
        }
        try:
            result: InferResult | None = None
            if self.shm is not None:
                result = await self.shm.infer(self.model, inputs, **call)
            if result is None:  # nothing worth shared memory, or no region free: the HTTP body
                body = {name: (host_array(array), datatype) for name, (array, datatype) in inputs.items()}
                result = await self.client.infer(self.model, body, **call)
                if self.shm is not None:
                    self.shm.learn(inputs, result)
                if self.gpu_model:  # a KIND_GPU model's outputs staged through host memory by Triton
                    count_host_copy(
                        sum(int(a.nbytes) for a in result.outputs.values()), KIND_GPU_OUTPUTS_IN_HOST_MEMORY
                    )
        except TimeoutError:
            raise self._timeout(request) from None
        except ReservedParameterError as exc:
            raise request.error(str(exc)) from None
        except TritonInferError as exc:
            raise await self._triton_error(request, exc) from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise await self._error(request, None, f"connection to Triton lost: {exc!r}") from None
        except TritonServerError as exc:  # the server broke (e.g. a stub died): the worker restarts
            raise await self._error(request, None, str(exc)) from None
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug(
                "request %s of %s: Triton answered in %.1f ms",
                request.request_id,
                self.name,
                (time.monotonic() - began) * 1e3,
            )
        self._check_outputs(request, result, inputs, complete=True)
        return result.outputs, result.parameters

    async def _serve_stream(self, request: Request) -> None:
        """A decoupled model: forward every response Triton streams, in order, the last one final.

        Cancelling the request (its batch task, or ``request.cancelled`` when it shares a batch)
        cancels the gRPC call, so Triton marks the request cancelled and the model can stop.
        """
        sender = request.response_sender()
        try:
            async for response in self._stream(request):
                await sender.send(outputs=response.outputs, parameters=response.parameters, final=response.final)
        except TdaskError as exc:
            if not request.finished:
                await sender.send(error=exc)

    async def _stream(self, request: Request) -> AsyncIterator[InferResult]:
        """The responses of one request to a decoupled model; raises a tdask error that says what went wrong."""
        assert self.stream_client is not None
        inputs = await self._inputs(request)
        missing = [name for name in self.required_inputs if name not in inputs]
        if missing:
            raise request.error(f"model {self.model!r} needs input(s) {missing}, missing from the request")
        try:
            parameters = _triton_parameters(request.parameters)
            check_parameters(parameters)
        except (TypeError, ReservedParameterError) as exc:
            raise request.error(str(exc)) from None
        remaining = request.remaining_s
        if remaining is not None and remaining <= 0:
            raise self._timeout(request)
        responses = self.stream_client.stream(
            self.model,
            inputs,
            model_version=self.model_version,
            request_id=str(request.request_id),
            parameters=parameters,
            timeout=remaining,
            cancelled=request.cancelled,
        )
        try:
            async for response in responses:
                self._check_outputs(request, response, inputs, complete=False)
                yield response
        except TritonInferError as exc:
            raise await self._triton_error(request, exc) from None
        except TritonServerError as exc:  # the server broke (e.g. a stub died): the worker restarts
            raise await self._error(request, None, str(exc)) from None
        finally:
            await responses.aclose()

    def _check_outputs(
        self, request: Request, result: InferResult, inputs: Mapping[str, tuple[Any, str]], *, complete: bool
    ) -> None:
        """Refuse an answer that does not fit the model's config: names, datatypes, shapes, batch size.

        ``complete``: the answer must hold every declared output (a one-response model's; a
        decoupled model may spread its outputs over its responses).

        Raises
        ------
        OperatorError
            Naming the operator, the request and every output that is wrong.
        """
        specs = self.output_specs
        if not specs:  # nothing declared (the model's metadata lists no outputs): nothing to check
            return
        problems = []
        if complete:
            missing = sorted(set(specs) - set(result.outputs))
            if missing:
                problems.append(f"no output {', '.join(map(repr, missing))}")
        batch = None
        if self.batched and inputs:
            first = next(iter(inputs.values()))[0]
            batch = int(first.shape[0]) if first.ndim else None
        for name, array in result.outputs.items():
            spec = specs.get(name)
            if spec is None:
                problems.append(f"output {name!r}, which its config does not declare")
                continue
            want_type, dims = spec
            datatype = result.datatypes.get(name)
            if datatype is not None and datatype != want_type:
                problems.append(f"output {name!r} as {datatype} (declared {want_type})")
            if name in self.reshaped:
                continue
            shape = [int(n) for n in array.shape]
            if len(shape) != len(dims) or any(d != -1 and d != n for d, n in zip(dims, shape, strict=True)):
                problems.append(f"output {name!r} of shape {shape} (declared {dims}, -1: any size)")
            elif batch is not None and shape[0] != batch:
                problems.append(f"output {name!r} of shape {shape}: batch dimension {shape[0]} for a batch of {batch}")
        if problems:
            declared = ", ".join(f"{n} {t} {d}" for n, (t, d) in sorted(specs.items()))
            raise OperatorError(
                f"model {self.model!r} answered wrongly: {'; '.join(problems)}; its config declares {declared}",
                operator=self.name,
                request_id=request.request_id,
                remote_type="Triton model output mismatch",
            )

    def _check_input(self, request: Request, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        """Refuse an input the model does not declare, or of another dtype or rank."""
        spec = self.input_specs.get(name)
        if spec is None:
            raise request.error(f"model {self.model!r} has no input {name!r} (its inputs: {sorted(self.input_specs)})")
        want_type, dims = spec
        if datatype != want_type:
            raise request.error(f"input {name!r} is {datatype}, model {self.model!r} expects {want_type}")
        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape, strict=True)):
            raise request.error(
                f"input {name!r} has shape {list(shape)}, model {self.model!r} expects {dims} (-1: any size)"
            )

    async def _triton_error(self, request: Request, exc: TritonInferError) -> TdaskError:
        """Map a failure Triton reported to the tdask error of the same meaning.

        A unary call's error carries the HTTP status Triton gives it, a streamed call's the gRPC
        code (see :class:`~tdask.triton.interface.TritonInferError`).
        """
        if exc.code == "DEADLINE_EXCEEDED":
            return self._timeout(request)
        if exc.code == "INVALID_ARGUMENT":
            return InvalidRequestError(exc.message, operator=self.name, request_id=request.request_id)
        if exc.code == "UNAVAILABLE":
            return await self._error(request, None, f"connection to Triton lost: {exc.message}")
        if "Stub process" in exc.message and self.server.is_alive():
            # A python-backend stub died. Triton 2.5x neither restarts it nor unloads the model
            # cleanly (unload hangs), so the instance stays broken: restart the worker, which
            # starts a fresh server, and let its requests be served again.
            self.context.restart_worker(f"a Triton python-backend stub of model {self.model!r} died")
        if exc.status is not None:
            return await self._error(request, exc.status, exc.message)
        return OperatorError(
            exc.message,
            operator=self.name,
            request_id=request.request_id,
            remote_type=f"Triton gRPC {exc.code or 'stream error'}",
        )

    def _timeout(self, request: Request) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"the request's deadline passed before Triton model {self.model!r} answered",
            operator=self.name,
            request_id=request.request_id,
        )

    async def _error(self, request: Request, status: int | None, message: str) -> TdaskError:
        """Map Triton's answer (an HTTP status, or ``None``: no answer) to the tdask error of the same meaning."""
        if status == 400:  # Triton's INVALID_ARG (and the models' own parameter checks)
            return InvalidRequestError(message, operator=self.name, request_id=request.request_id)
        if status is None and self.server.is_alive():
            # A dropped connection is usually the server dying: the socket closes before the
            # process is reaped. Give the exit a moment to be seen, so the worker can restart
            # and have the request served again instead of answering with this error.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait(), 1.0)
        if not self.server.is_alive():
            message = (
                f"the worker's Triton server exited (status {self.server.returncode}); "
                f"model {self.model!r} is gone ({message})"
            )
        return OperatorError(
            message,
            operator=self.name,
            request_id=request.request_id,
            remote_type=f"Triton HTTP {status}" if status is not None else "Triton unreachable",
        )
