"""The one error tree of tdask.

Every error a caller can see derives from :class:`TdaskError` and says which operator, which
request and which worker it concerns, so that a failure in a pipeline of several operators can be
traced to its origin::

    TdaskError
    ├── OperatorUnavailableError      no worker hosts the operator (or its setup failed)
    ├── InvalidRequestError           bad input: dtype, shape, missing/extra input, parameters,
    │                                 timeout, or a tensor form tdask does not decode
    ├── OperatorError                 the operator (or its Triton model) raised
    │   └── ExecutionTimeoutError     its execution ran past the operator's execution timeout
    ├── WorkerLostError               the worker serving the request died, retries exhausted
    ├── SchedulerLostError            the scheduler (tdask's broker and registry) cannot be reached
    ├── RequestTimeoutError           the request's deadline passed (also a ``TimeoutError``)
    ├── RequestCancelledError         the request was cancelled before its final response
    ├── ClientClosedError             the caller's ``Client`` closed with the request in flight
    ├── DataPlaneError                a tensor could not be fetched from its owner
    └── DeploymentFileError           a deployment file is invalid (names file, line and field)

Errors cross process boundaries as small dicts (:func:`error_to_msg` / :func:`error_from_msg`)
so that the scheduler, which relays them, never unpickles user exceptions.
"""

from __future__ import annotations

import traceback
from typing import Any

__all__ = [
    "TdaskError",
    "OperatorUnavailableError",
    "InvalidRequestError",
    "OperatorError",
    "ExecutionTimeoutError",
    "WorkerLostError",
    "SchedulerLostError",
    "RequestTimeoutError",
    "RequestCancelledError",
    "ClientClosedError",
    "DataPlaneError",
    "DeploymentFileError",
    "MainGuardError",
]


class TdaskError(Exception):
    """Base of all tdask errors; carries ``operator``, ``request_id`` and ``worker``."""

    def __init__(
        self,
        message: str,
        *,
        operator: str | None = None,
        request_id: str | None = None,
        worker: str | None = None,
        remote_type: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.operator = operator
        self.request_id = request_id
        self.worker = worker
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        where = []
        if self.operator is not None:
            where.append(f"operator={self.operator!r}")
        if self.request_id is not None:
            where.append(f"request_id={self.request_id!r}")
        if self.worker is not None:
            where.append(f"worker={self.worker!r}")
        return f"{self.message} ({', '.join(where)})" if where else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._context()))

    def _context(self) -> dict[str, Any]:
        return {
            "operator": self.operator,
            "request_id": self.request_id,
            "worker": self.worker,
            "remote_type": self.remote_type,
            "remote_traceback": self.remote_traceback,
        }


def _rebuild(cls: type[TdaskError], message: str, context: dict[str, Any]) -> TdaskError:
    return cls(message, **context)


class OperatorUnavailableError(TdaskError):
    """No worker hosts the operator within the wait bound, or its setup failed on every host."""


class InvalidRequestError(TdaskError, ValueError):
    """The request is malformed: wrong dtype or shape, missing or extra input, bad parameters."""


class OperatorError(TdaskError):
    """The operator raised while serving the request; ``remote_type`` names the exception."""


class ExecutionTimeoutError(OperatorError, TimeoutError):
    """The operator's execution of the request ran past its execution timeout.

    ``OperatorConfig.execution_timeout_s`` (default ``tdask.operator.execution-timeout``): the
    request is answered with this at that time, not at its own deadline, and the operator is
    recovered (a Triton model's worker restarts) while its other hosts serve on.
    """


class WorkerLostError(TdaskError):
    """The worker serving the request left, and the request could not be served elsewhere."""


class RequestTimeoutError(TdaskError, TimeoutError):
    """The request's deadline passed before its final response arrived."""


class SchedulerLostError(TdaskError):
    """The scheduler, which runs tdask's broker and registry, cannot be reached.

    Requests queued or leased through the broker when it went are lost with it; new requests
    that need the registry (no host of their operator is known to the caller) fail with this
    until the scheduler is back.
    """


class RequestCancelledError(TdaskError):
    """The request was cancelled before its final response, by something other than its caller.

    For example the operator's task was cancelled on its worker, or a streamed request was read
    again after it had been closed. A caller cancelling its own task still sees
    ``asyncio.CancelledError``, as asyncio requires.
    """


class ClientClosedError(TdaskError):
    """The caller's ``distributed.Client`` closed with the request in flight.

    Also raised for a request made through a client that is already closed.
    """


class DataPlaneError(TdaskError):
    """A tensor could not be fetched: its owner left, or it was already released.

    ``owner`` and ``tensor_id`` name the tensor that could not be read (when known), so that a
    caller can tell a tensor it placed itself (it places it again and re-sends the request)
    from one it only forwarded (the error goes back to whoever placed that one).
    """

    def __init__(
        self,
        message: str,
        *,
        owner: str | None = None,
        tensor_id: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.owner = owner
        self.tensor_id = tensor_id

    def _context(self) -> dict[str, Any]:
        return {**super()._context(), "owner": self.owner, "tensor_id": self.tensor_id}


class DeploymentFileError(TdaskError, ValueError):
    """A deployment file (``tdask serve FILE``, ``Deployment.from_file``) is invalid.

    Raised before anything starts. ``file``, ``line`` and ``field`` (a dotted path such as
    ``operators[1].max_inflight_requests``) locate the first problem; ``errors`` lists every
    problem found as ``(line, field, message)``; the message has one ``file:line: field: ...``
    line per problem.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        errors: list[tuple[int | None, str, str]] | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.file = file
        self.line = line
        self.field = field
        self.errors = list(errors or [])

    def _context(self) -> dict[str, Any]:
        return {**super()._context(), "file": self.file, "line": self.line, "field": self.field, "errors": self.errors}


_ERRORS: dict[str, type[TdaskError]] = {
    cls.__name__: cls
    for cls in (
        TdaskError,
        OperatorUnavailableError,
        InvalidRequestError,
        OperatorError,
        ExecutionTimeoutError,
        WorkerLostError,
        SchedulerLostError,
        RequestTimeoutError,
        RequestCancelledError,
        ClientClosedError,
        DataPlaneError,
    )
}


def error_to_msg(exc: BaseException, operator: str | None = None) -> dict[str, Any]:
    """Describe ``exc`` as a msgpack-friendly dict, keeping its tdask type when it has one.

    An error that came from another operator further down a pipeline keeps its context
    (operator, request, worker) in the message, so the caller sees where it started.
    """
    if isinstance(exc, TdaskError):
        foreign = exc.operator is not None and exc.operator != operator
        msg: dict[str, Any] = {
            "type": type(exc).__name__,
            "message": str(exc) if foreign else exc.message,
            "remote_type": exc.remote_type or type(exc).__name__,
            "traceback": exc.remote_traceback or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
        if isinstance(exc, DataPlaneError):
            msg["owner"], msg["tensor_id"] = exc.owner, exc.tensor_id
        return msg
    return {
        "type": "OperatorError",
        "message": f"{type(exc).__name__}: {exc}",
        "remote_type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def error_from_msg(
    msg: dict[str, Any],
    *,
    operator: str | None,
    request_id: str | None,
    worker: str | None,
) -> TdaskError:
    """Rebuild the typed error described by :func:`error_to_msg`, with its context."""
    cls = _ERRORS.get(msg.get("type", ""), OperatorError)
    extra: dict[str, Any] = {}
    if cls is DataPlaneError:
        extra = {"owner": msg.get("owner"), "tensor_id": msg.get("tensor_id")}
    return cls(
        msg.get("message", "unknown error"),
        operator=operator,
        request_id=request_id,
        worker=worker,
        remote_type=msg.get("remote_type"),
        remote_traceback=msg.get("traceback"),
        **extra,
    )


class MainGuardError(TdaskError, RuntimeError):
    """A script starts a :class:`~tdask.Deployment` at its top level, outside ``if __name__ == "__main__":``.

    Its workers are new Python processes (multiprocessing's spawn) that import the script again,
    and each would start the deployment again: raised before anything starts (in the script's
    process), or in such a worker process as it imports the script.
    """
