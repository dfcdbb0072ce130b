"""The front door: tdask operators served as models on Triton's KServe v2 HTTP and gRPC protocols.

Triton's own clients (``tritonclient.http``, ``tritonclient.grpc``, perf_analyzer, dashboards that
read model metadata) talk to a tdask deployment unchanged through a :class:`Gateway`::

    python -m tdask.gateway --scheduler-address tcp://127.0.0.1:8786 --http-port 8000 --grpc-port 8001

Every operator the scheduler's registry knows is a model: its name is the operator's name, its
version the operator's version. One KServe request becomes one tdask request
(:class:`~tdask.remote.RemoteOperator`); a streaming operator streams over gRPC's
``ModelStreamInfer`` (each tdask response one stream response, the last with the
``triton_final_response`` parameter set), and answers HTTP ``infer`` with its last response that
carried outputs. See :mod:`tdask.gateway.kserve` for the mapping of tensors, parameters and errors.
"""

from __future__ import annotations

from tdask.gateway.core import Gateway
from tdask.gateway.limits import FrontDoor, Limits

__all__ = ["FrontDoor", "Gateway", "Limits"]
