"""Test model: a_out = 2 * a reversed, b_out = -b, c_out = c + 1, d_out = ~d, e_out = e tiled k times."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a, b, c, d, e = (pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in "abcde")
            k = int(json.loads(request.parameters() or "{}").get("k", 1))
            outputs = {
                "a_out": (a[::-1] * 2).astype(np.float32),
                "b_out": (-b).astype(np.int8),
                "c_out": (c + 1).astype(np.float16),
                "d_out": np.logical_not(d),
                "e_out": np.tile(e, k).astype(np.uint64),
                "sizes": np.array([a.size, b.size, c.size, d.size, e.size], dtype=np.int32),
            }
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in outputs.items()]))
        return responses
