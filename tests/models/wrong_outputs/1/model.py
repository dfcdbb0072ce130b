"""``y = x + 1``, or a wrong answer as the request parameter ``mode`` says.

``ok`` (default), ``shape`` (last dimension 4 instead of 3), ``batch`` (one row more than the
request's batch), ``rank`` (flattened), ``missing`` (no output at all), ``extra`` (``y`` and an
undeclared ``z``), ``misnamed`` (``y`` named ``Y``), ``dtype`` (``y`` as INT32), ``none`` (the
response list holds ``None``).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            mode = json.loads(request.parameters() or "{}").get("mode", "ok")
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = x + 1
            if mode == "none":
                responses.append(None)
                continue
            outputs = {"y": y}
            if mode == "shape":
                outputs = {"y": np.concatenate([y, y[:, :1]], axis=1)}
            elif mode == "batch":
                outputs = {"y": np.concatenate([y, y[:1]], axis=0)}
            elif mode == "rank":
                outputs = {"y": y.reshape(-1)}
            elif mode == "missing":
                outputs = {}
            elif mode == "extra":
                outputs = {"y": y, "z": y}
            elif mode == "misnamed":
                outputs = {"Y": y}
            elif mode == "dtype":
                outputs = {"y": y.astype(np.int32)}
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
