"""tdask hello-world encoder, a Triton python-backend model.

Tiles the int64 ``input`` ``input_copies`` times, bitwise-inverts it and then sleeps
``delay * len(output)`` seconds, so that benchmarks can dial in a per-element cost.
It also returns ``input_copies`` so that the decoder can undo the tiling exactly.

``input_copies`` and ``delay`` come from the model config ``parameters`` and a request's
parameters of the same name override them. ``KIND_CPU`` instances use numpy, ``KIND_GPU``
instances use cupy on the instance's device (cupy is imported only there).

The file is self-contained on purpose: it runs unchanged in a stock Triton server
(``tritonserver --model-repository models``), where nothing of tdask is importable.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class BadParameterError(ValueError):
    """A parameter value that the model cannot use; reported to the caller, not raised."""


def parse_copies(value: Any, source: str) -> int:
    """Return ``value`` as a copies count (an integer >= 1).

    Accepts ints and decimal strings because config parameters are always strings and
    request parameters arrive as JSON (int or string).
    """
    copies: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        copies = value
    elif isinstance(value, float) and value.is_integer():
        copies = int(value)
    elif isinstance(value, str):
        try:
            copies = int(value.strip())
        except ValueError:
            copies = None
    if copies is None or copies < 1:
        raise BadParameterError(f"{source} 'input_copies' must be an integer >= 1, got {value!r}")
    return copies


def parse_delay(value: Any, source: str) -> float:
    """Return ``value`` as a per-element delay in seconds (a finite float >= 0)."""
    delay: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        delay = float(value)
    elif isinstance(value, str):
        try:
            delay = float(value.strip())
        except ValueError:
            delay = None
    if delay is None or not math.isfinite(delay) or delay < 0:
        raise BadParameterError(f"{source} 'delay' must be a number >= 0 (seconds per element), got {value!r}")
    return delay


def invalid_argument(message: str) -> Any:
    """A TritonError that reaches the client as INVALID_ARGUMENT (older backends: INTERNAL)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


def request_parameters(request: Any) -> dict[str, Any]:
    """Decode a request's parameters (the python backend hands them over as a JSON string)."""
    raw = request.parameters()
    if not raw:
        return {}
    parameters = json.loads(raw) if isinstance(raw, str) else dict(raw)
    return parameters if isinstance(parameters, dict) else {}


class TritonPythonModel:
    """The encoder; one object per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the config defaults and pick numpy or cupy for this instance.

        Bad config parameters raise here so that the load fails with a message that names them.
        """
        config = json.loads(args["model_config"])
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        source = f"model '{args['model_name']}' config parameter"
        self.copies = parse_copies(parameters.get("input_copies", "1"), source)
        self.delay = parse_delay(parameters.get("delay", "0"), source)
        self.gpu = args.get("model_instance_kind") == "GPU"
        self.device = None
        if self.gpu:
            import cupy  # only GPU instances need cupy

            self.cupy = cupy
            self.device = cupy.cuda.Device(int(args["model_instance_device_id"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer every request; a bad request gets an error response, the others are unaffected."""
        responses = []
        for request in requests:
            try:
                responses.append(self.execute_one(request))
            except BadParameterError as exc:
                responses.append(pb_utils.InferenceResponse(error=invalid_argument(f"encoder: {exc}")))
            except Exception as exc:  # noqa: BLE001 - answer the request instead of failing the batch
                message = f"encoder: {type(exc).__name__}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def execute_one(self, request: Any) -> Any:
        """Tile, invert, sleep and build the response of one request."""
        parameters = request_parameters(request)
        copies = self.copies
        if "input_copies" in parameters:
            copies = parse_copies(parameters["input_copies"], "request parameter")
        delay = self.delay
        if "delay" in parameters:
            delay = parse_delay(parameters["delay"], "request parameter")

        tensor = pb_utils.get_input_tensor_by_name(request, "input")
        if tensor is None:  # Triton skips its required-input check for models with an optional input
            raise BadParameterError("missing required input tensor 'input'")
        if self.gpu:
            with self.device:
                data = self.to_cupy(tensor)
                result = self.cupy.invert(self.cupy.tile(data, copies))
                self.device.synchronize()
            output = pb_utils.Tensor.from_dlpack("output", result)
        else:
            data = self.to_numpy(tensor)
            result = np.invert(np.tile(data, copies))
            output = pb_utils.Tensor("output", result)
        if delay:
            time.sleep(delay * result.size)
        copies_output = pb_utils.Tensor("input_copies", np.array([copies], dtype=np.int64))
        return pb_utils.InferenceResponse(output_tensors=[output, copies_output])

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """Host array of a tensor; a GPU tensor (possible with FORCE_CPU_ONLY_INPUT_TENSORS=no) is copied."""
        if tensor.is_cpu():
            return tensor.as_numpy()
        import cupy

        return cupy.from_dlpack(tensor).get()

    def to_cupy(self, tensor: Any) -> Any:
        """Device array of a tensor on this instance's device."""
        if tensor.is_cpu():
            return self.cupy.asarray(tensor.as_numpy())
        return self.cupy.asarray(self.cupy.from_dlpack(tensor))
