"""Decoupled: streams ``count`` responses, then the final flag; stops when cancelled."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._stream, args=(request,), daemon=True).start()
        return None

    def _stream(self, request):
        sender = request.get_response_sender()
        parameters = json.loads(request.parameters() or "{}")
        delay = float(parameters.get("delay", 0))
        marker = parameters.get("marker")
        count = int(pb_utils.get_input_tensor_by_name(request, "count").as_numpy()[0])
        sent = 0
        for i in range(count):
            if sender.is_cancelled():
                break
            if delay:
                time.sleep(delay)
            out = pb_utils.Tensor("i", np.array([i], dtype=np.int32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            sent += 1
        if marker:
            with open(marker, "w") as f:
                f.write(str(sent))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
