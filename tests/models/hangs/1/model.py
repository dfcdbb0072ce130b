"""``y = x + 1``; ``x[0] == -1`` makes ``execute`` loop for ever (a hung model), ``x[0] == -2`` sleeps ``x[1]`` ms."""

import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            while x.size and x[0] == -1:
                time.sleep(0.05)
            if x.size > 1 and x[0] == -2:
                time.sleep(x[1] / 1000)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", x + 1)]))
        return responses
