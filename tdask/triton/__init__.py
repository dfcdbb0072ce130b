"""Triton Inference Server in tdask: one Triton server per worker process, and its models as operators.

- :mod:`~tdask.triton.base`: :class:`TritonServerBase`, the one interface of both server kinds
  (lifecycle, models, clients, health, metrics, exit callbacks), and :class:`TritonServerError`.
- :mod:`~tdask.triton.interface`: what the servers' clients are (:class:`InferClient`,
  :class:`StreamClient`), answer (:class:`InferResult`) and raise (:class:`TritonInferError`).
- :mod:`~tdask.triton.options`: :class:`TritonOptions`, what a server runs with, in either kind;
  :mod:`~tdask.triton.factory`: :func:`make_server` and :func:`start_server`, the kind
  ``tdask.triton.mode`` names.
- :mod:`~tdask.triton.binary`: which ``tritonserver`` to run (``$TDASK_TRITONSERVER``, ``PATH``,
  ``/opt/tritonserver``, or the one bundled in nvidia-pytriton), what it needs around it, and its
  command line (:func:`~tdask.triton.binary.server_args`).
- :mod:`~tdask.triton.process`: the server's process group, its shared-memory regions and logs;
  stopping it and sweeping up after servers whose owner died; :mod:`~tdask.triton.reaper`, the
  program that ends a dead owner's or server's stubs.
- :mod:`~tdask.triton.model_config`: a model's ``config.pbtxt`` with a load-time override merged in.
- :mod:`~tdask.triton.server`: :class:`TritonServer`, a ``tritonserver`` subprocess, with
  :mod:`~tdask.triton.http_client` (the lean HTTP client on every request's hot path),
  :mod:`~tdask.triton.grpc_stream` (decoupled models) and :mod:`~tdask.triton.shared_memory`.
- :mod:`~tdask.triton.inprocess`: Triton in the worker's own process (the default mode), over
  :mod:`~tdask.triton.capi` (the C API binding), :mod:`~tdask.triton.shim` (the completions and
  the C shim that keeps Triton's callbacks off the GIL),
  :mod:`~tdask.triton.inprocess_setup` (its backends and C API options),
  :mod:`~tdask.triton.inprocess_client` and :mod:`~tdask.triton.responses` (responses read into
  numpy, large outputs without a copy).
- :mod:`~tdask.triton.operator`: ``TritonCoreOperator``, a model as a tdask operator. It is not
  imported here, so the server side never depends on the operator API; workers import it by
  name when an ``OperatorConfig`` says ``implementation="triton"``.
"""

from tdask.triton.base import TritonServerBase
from tdask.triton.binary import find_tritonserver
from tdask.triton.factory import make_server, start_server
from tdask.triton.interface import InferClient, InferResult, StreamClient, TritonInferError
from tdask.triton.model_config import merge_model_config
from tdask.triton.options import TritonOptions
from tdask.triton.server import TritonServer, TritonServerError

__all__ = [
    "InferClient",
    "InferResult",
    "StreamClient",
    "TritonInferError",
    "TritonOptions",
    "TritonServer",
    "TritonServerBase",
    "TritonServerError",
    "find_tritonserver",
    "make_server",
    "merge_model_config",
    "start_server",
]
