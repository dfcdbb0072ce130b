"""The one error tree of tdask.

Every error a caller can see derives from :class:`TdaskError` and says which operator, which
request and which worker it concerns, so that a failure in a pipeline of several operators can be
traced to its origin::

    TdaskError
    ├── OperatorUnavailableError      no worker hosts the operator (or its setup failed)
    ├── InvalidRequestError           bad input: dtype, shape, missing/extra input, parameters
    ├── OperatorError                 the operator (or its Triton model) raised
    ├── WorkerLostError               the worker serving the request died, retries exhausted
    ├── RequestTimeoutError           the request's deadline passed (also a ``TimeoutError``)
    └── DataPlaneError                a tensor could not be fetched from its owner

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
    "WorkerLostError",
    "RequestTimeoutError",
    "DataPlaneError",
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


class WorkerLostError(TdaskError):
    """The worker serving the request left, and the request could not be served elsewhere."""


class RequestTimeoutError(TdaskError, TimeoutError):
    """The request's deadline passed before its final response arrived."""


class DataPlaneError(TdaskError):
    """A tensor could not be fetched: its owner left, or it was already released."""


_ERRORS: dict[str, type[TdaskError]] = {
    cls.__name__: cls
    for cls in (
        TdaskError,
        OperatorUnavailableError,
        InvalidRequestError,
        OperatorError,
        WorkerLostError,
        RequestTimeoutError,
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
        return {
            "type": type(exc).__name__,
            "message": str(exc) if foreign else exc.message,
            "remote_type": exc.remote_type or type(exc).__name__,
            "traceback": exc.remote_traceback or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
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
    return cls(
        msg.get("message", "unknown error"),
        operator=operator,
        request_id=request_id,
        worker=worker,
        remote_type=msg.get("remote_type"),
        remote_traceback=msg.get("traceback"),
    )
