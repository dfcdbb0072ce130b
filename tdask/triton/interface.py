"""What an operator sees of Triton, whichever server kind serves it: clients, results, errors.

Both server kinds (:class:`~tdask.triton.server.TritonServer`, a ``tritonserver`` process, and
:class:`~tdask.triton.inprocess.InProcessServer`, Triton's core in the worker) hand out clients
that satisfy :class:`InferClient` (one answer per request) and :class:`StreamClient` (decoupled
models: any number of answers). Every client answers with an :class:`InferResult` and fails with
a :class:`TritonInferError`, so :class:`~tdask.triton.operator.TritonCoreOperator` serves both
kinds alike. The servers' own surface is :class:`~tdask.triton.base.TritonServerBase`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "RESERVED_PARAMETERS",
    "InferClient",
    "InferResult",
    "MetricsSource",
    "ReservedParameterError",
    "StreamClient",
    "TritonInferError",
    "check_parameters",
]

#: Where a server's Prometheus metrics come from: ``host:port`` of a ``/metrics`` endpoint, or a
#: function returning the text (what :class:`tdask.host.metrics.TritonMetrics` reads).
MetricsSource = str | Callable[[], str]

#: Request parameters that Triton interprets itself (tritonclient refuses them too).
RESERVED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers", "binary_data_output"}
)
_RESERVED_PREFIX = "triton_"


class TritonInferError(Exception):
    """Triton refused or failed a request (or a model query), whichever client made it.

    Parameters
    ----------
    message
        Triton's own text.
    status
        The HTTP status Triton's HTTP endpoint answers this error with (400: invalid request,
        404: unknown model, 500: the model failed); set by the clients of unary calls.
    code
        The gRPC status name Triton's gRPC endpoint answers it with (``"INVALID_ARGUMENT"``,
        ``"DEADLINE_EXCEEDED"``, ``"UNAVAILABLE"``...); set by the clients of streamed calls,
        ``None`` for an error Triton sent inside a stream (it carries none).

    Attributes
    ----------
    message : str
        Triton's own text.
    status : int or None
        As given.
    code : str or None
        As given.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class ReservedParameterError(ValueError):
    """A request parameter that Triton interprets itself (the caller's mistake)."""


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Refuse a reserved request parameter, with tritonclient's wording.

    Parameters
    ----------
    parameters
        A request's parameters.

    Raises
    ------
    ReservedParameterError
        A key of ``parameters`` is one Triton interprets itself (or starts with ``triton_``).
    """
    for key in parameters:
        if key in RESERVED_PARAMETERS or key.startswith(_RESERVED_PREFIX):
            raise ReservedParameterError(f'Parameter "{key}" is a reserved parameter and cannot be specified.')


@dataclass
class InferResult:
    """One answer of Triton: a unary call's only one, or one of a stream's.

    Attributes
    ----------
    outputs : dict of str to numpy.ndarray
        The output tensors (read-only arrays where they lie over a response buffer).
    datatypes : dict of str to str
        Each output's Triton datatype, as the server sent it.
    parameters : dict
        The response's parameters.
    in_shm : dict of str to list of int
        Outputs Triton wrote into a shared-memory region instead of the answer: name to shape.
    final : bool
        Whether this is the request's last answer (always true for a unary call).
    """

    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    parameters: dict[str, Any]
    in_shm: dict[str, list[int]] = field(default_factory=dict)
    final: bool = True


@runtime_checkable
class InferClient(Protocol):
    """Unary inference on one Triton server: one answer per request.

    Implemented by :class:`~tdask.triton.http_client.TritonHttpClient` (a ``tritonserver``'s HTTP
    endpoint) and :class:`~tdask.triton.inprocess_client.InProcessClient` (Triton's C API).
    """

    async def model_metadata(self, model: str) -> dict[str, Any]:
        """The model's metadata (``name``, ``versions``, ``inputs``, ``outputs``), as Triton's JSON.

        Raises
        ------
        TritonInferError
            Triton refused (404: no such model loaded).
        """
        ...

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        *,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """Run one inference.

        Parameters
        ----------
        model
            The model's name.
        inputs
            Input names to (C-contiguous array, Triton datatype).
        model_version
            A version, or ``""`` for the one Triton picks.
        request_id
            Triton's request id (shows in its logs).
        parameters
            Request parameters for the model.
        timeout
            Seconds the call may take; ``None``: no bound.

        Returns
        -------
        InferResult
            The outputs, their datatypes and the response parameters.

        Raises
        ------
        TritonInferError
            Triton refused or failed the request (:attr:`TritonInferError.status` says how).
        ReservedParameterError
            A parameter is one Triton interprets itself.
        TimeoutError
            No answer within ``timeout`` seconds.
        """
        ...

    async def close(self) -> None:
        """Release what the client holds (connections); calls in flight end on their own."""
        ...


@runtime_checkable
class StreamClient(Protocol):
    """Streamed inference on one Triton server, for decoupled models: any number of answers.

    Implemented by :class:`~tdask.triton.grpc_stream.TritonStreamClient` (a ``tritonserver``'s
    gRPC ``ModelStreamInfer``) and :class:`~tdask.triton.inprocess_client.InProcessClient`.
    """

    def stream(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        *,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
        timeout: float | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> AsyncGenerator[InferResult, None]:
        """Send one request and yield its answers in order, the last with ``final=True``.

        Parameters
        ----------
        model, model_version
            The model (``""``: the version Triton picks).
        inputs
            ``name -> (C-contiguous array, Triton datatype)``.
        request_id, parameters
            Triton's request id and request parameters.
        timeout
            Seconds the whole call may take.
        cancelled
            When set, the request is cancelled in Triton and the iteration ends without a final
            answer.

        Raises
        ------
        TritonInferError
            Triton refused or failed the request, or the deadline passed (``code`` says which:
            ``"DEADLINE_EXCEEDED"`` for the deadline).
        """
        ...

    async def close(self) -> None:
        """Release what the client holds; calls still running are cancelled."""
        ...
