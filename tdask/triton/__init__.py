"""Triton Inference Server in tdask: one real ``tritonserver`` per worker process, and its models as operators.

- :mod:`~tdask.triton.binary`: which ``tritonserver`` to run (``$TDASK_TRITONSERVER``, ``PATH``,
  ``/opt/tritonserver``, or the one bundled in nvidia-pytriton) and what it needs around it.
- :mod:`~tdask.triton.process`: the server's process group, its shared-memory regions and logs;
  stopping it and sweeping up after servers whose owner died.
- :mod:`~tdask.triton.model_config`: a model's ``config.pbtxt`` with a load-time override merged in.
- :mod:`~tdask.triton.server`: :class:`TritonServer`, the lifecycle (start, load, unload, stop).
- :mod:`~tdask.triton.http_client`: the lean HTTP client on every request's hot path.
- :mod:`~tdask.triton.inprocess`: Triton in the worker's own process (the default mode), over
  :mod:`~tdask.triton.capi` (the C API binding and the C shim's callbacks) and
  :mod:`~tdask.triton.responses` (responses read into numpy, large outputs without a copy).
- :mod:`~tdask.triton.operator`: ``TritonCoreOperator``, a model as a tdask operator. It is not
  imported here, so the server side never depends on the operator API; workers import it by
  name when an ``OperatorConfig`` says ``implementation="triton"``.
"""

from tdask.triton.binary import find_tritonserver
from tdask.triton.model_config import merge_model_config
from tdask.triton.server import TritonServer, TritonServerError

__all__ = ["TritonServer", "TritonServerError", "find_tritonserver", "merge_model_config"]
