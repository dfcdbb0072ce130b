"""Misbehaves as the request parameter ``mode`` says: ``wrong-dtype`` or ``raise``.

Its load misbehaves as the config parameter ``init`` says (set it with a config override):
``raise`` (initialize raises) or ``hang`` (initialize never returns); anything else loads.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters") or {}
        init = (parameters.get("init") or {}).get("string_value", "")
        if init == "raise":
            raise RuntimeError("misbehaving model failed to initialize on purpose")
        while init == "hang":
            time.sleep(3600)

    def execute(self, requests):
        responses = []
        for request in requests:
            mode = json.loads(request.parameters() or "{}").get("mode", "wrong-dtype")
            if mode == "raise":
                raise RuntimeError("misbehaving model raised on purpose")
            data = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            out = pb_utils.Tensor("output", data.astype(np.float32))  # declared TYPE_INT64
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
