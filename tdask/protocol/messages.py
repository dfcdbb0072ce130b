"""tdask's messages: op and RPC names, request and response shapes, constructors, checks.

See :mod:`tdask.protocol` for the table of messages and the tensor entries they carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypedDict

from tdask import data_plane
from tdask.exceptions import error_to_msg
from tdask.transport import WIRE_ADDRESS
from tdask.transport.base import ProtocolError, check_shape

__all__ = [
    "DataAction",
    "Op",
    "Rpc",
    "ProtocolError",
    "RequestMsg",
    "ResponseMsg",
    "check_message",
    "check_shape",
    "operator_key",
]


class Op:
    """Names of the one-way session messages (see the module docstring for their fields)."""

    HELLO: Final = "hello"
    SUBMIT: Final = "submit"
    CANCEL: Final = "cancel"
    CREDIT: Final = "credit"
    RESPOND: Final = "respond"
    STATS: Final = "stats"
    REQUESTS: Final = "requests"
    WITHDRAW: Final = "withdraw"
    REQUESTER_LEFT: Final = "requester-left"
    REPLIES: Final = "replies"
    REFUSED: Final = "refused"
    DATA: Final = "data"
    DATA_REPLY: Final = "data-reply"


class DataAction:
    """What a :attr:`Op.DATA` message asks of the owner's tensor store (the wire's data calls)."""

    # A tensor travels as "tensor": [dtype, shape] and "bytes" (its memory, the last field:
    # the wire sends it without a copy), the parts of the inline "nd" form.
    FETCH: Final = "fetch"  # tensor_id -> tensor, bytes
    PUT: Final = "put"  # tensor_id, tensor, bytes
    RELEASE: Final = "release"  # tensor_ids


class Rpc:
    """Names of tdask's Dask comm handlers (``scheduler.handlers`` / ``worker.handlers``)."""

    # scheduler (the broker)
    SESSION: Final = "tdask_session"
    REGISTER: Final = "tdask_register"
    UNREGISTER: Final = "tdask_unregister"
    HOSTS: Final = "tdask_hosts"
    OPERATORS: Final = "tdask_operators"
    SIGNATURES: Final = "tdask_signatures"  # each hosted operator's signature (tdask.protocol.signature)
    LATEST: Final = "tdask_latest"
    # worker (the host)
    DIRECT: Final = "tdask_direct"
    WIRE_ADDRESS: Final = WIRE_ADDRESS  # the transport's own (tdask.transport.registry)
    HOST_STATS: Final = "tdask_host_stats"
    RETIRE: Final = "tdask_retire"  # stop being given requests, finish what is held (scale-down)
    MODEL: Final = "tdask_model"  # load, unload or reload a hosted Triton model
    # scheduler (a deployment that owns it: tdask scale / adapt / update / model)
    CONTROL: Final = "tdask_control"
    # worker (the data plane, defined with its handlers in tdask.data_plane)
    FETCH: Final = data_plane.FETCH
    PUT: Final = data_plane.PUT
    RELEASE: Final = data_plane.RELEASE
    STORE_STATS: Final = data_plane.STORE_STATS


# Fields each op must carry; checked on receipt by check_message (cheap: a few dict lookups).
_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    Op.HELLO: ("wire", "requester"),
    Op.SUBMIT: ("request",),
    Op.CANCEL: ("request_ids",),
    Op.CREDIT: ("operator", "n"),
    Op.RESPOND: ("responses",),
    Op.STATS: ("stats",),
    Op.REQUESTS: ("operator", "requests"),
    Op.WITHDRAW: ("keys",),
    Op.REQUESTER_LEFT: ("requester",),
    Op.REPLIES: ("replies",),
    Op.REFUSED: ("id",),
    Op.DATA: ("call", "action"),
    Op.DATA_REPLY: ("call", "status"),
}


def check_message(message: Any) -> str:
    """Return the op of ``message``, or raise :class:`ProtocolError` if it is not a valid message.

    Checks the shape only (a dict, a known ``op``, its fields present); handlers may then read
    the fields without guarding against a malformed peer.
    """
    if type(message) is not dict:
        raise ProtocolError(f"a message must be a dict, got {type(message).__name__}")
    op = message.get("op")
    if type(op) is not str or op not in _FIELDS:
        raise ProtocolError(f"unknown message op {str(op)[:100]!r}")
    for name in _FIELDS[op]:
        if name not in message:
            raise ProtocolError(f"message {op!r} lacks its field {name!r}")
    return op


def check_request(request: Any) -> None:
    """Refuse a submitted request whose routing fields are malformed (:class:`ProtocolError`)."""
    if type(request) is not dict:
        raise ProtocolError(f"a request must be a dict, got {type(request).__name__}")
    if type(request.get("id")) is not str or type(request.get("operator")) is not str:
        raise ProtocolError("a request needs a string 'id' and 'operator'")
    inputs = request.get("inputs")
    if inputs is not None and type(inputs) is not dict and not isinstance(inputs, Mapping):  # dict first: fast
        raise ProtocolError("a request's 'inputs' must be a mapping")
    parameters = request.get("parameters")
    if parameters is not None and type(parameters) is not dict and not isinstance(parameters, Mapping):
        raise ProtocolError("a request's 'parameters' must be a mapping")
    placed = request.get("placed")
    if placed is not None and (type(placed) not in (list, tuple) or not all(type(i) is str for i in placed)):
        raise ProtocolError("a request's 'placed' must be a list of tensor ids")
    deadline = request.get("deadline")
    if deadline is not None and not isinstance(deadline, (int, float)):
        raise ProtocolError("a request's 'deadline' must be a number or None")


# -- requests and responses ----------------------------------------------------------------


class RequestMsg(TypedDict, total=False):
    """A request as it travels (``requester`` is set by the plane that sends it)."""

    id: str
    requester: str
    operator: str
    parameters: dict[str, Any]
    inputs: dict[str, Any]
    deadline: float | None
    attempt: int
    max_retries: int
    host_wait_s: float
    rehost_wait_s: float
    submitted: float  # set by the broker: when its wait for a host began
    nested: bool  # sent from inside an operator (part of a request already being served)
    hosted_before: bool  # the caller knew hosts of its operator (the broker may have restarted)
    target: str  # optional: the worker address the caller chose (direct plane)
    target_lost: str  # with target: "error" or "fallback" when the target hosts it no more
    placed: list[str]  # inputs the caller placed for this request alone: dropped by their owner as it answers


class ResponseMsg(TypedDict):
    """A response as it travels; exactly one per request has ``final`` set."""

    id: str
    requester: str | None
    operator: str | None
    worker: str | None
    outputs: dict[str, Any]
    parameters: dict[str, Any]
    error: dict[str, Any] | None
    final: bool


def operator_key(name: str, version: int | None = None) -> str:
    """Queue name of an operator version (``name/version``); ``None`` means version 1."""
    return f"{name}/{version or 1}"


def request_msg(
    *,
    request_id: str,
    operator: str,
    parameters: dict[str, Any],
    inputs: dict[str, Any],
    deadline: float | None,
    max_retries: int,
    host_wait_s: float,
    rehost_wait_s: float,
) -> RequestMsg:
    """A new request (attempt 0)."""
    return {
        "id": request_id,
        "operator": operator,
        "parameters": parameters,
        "inputs": inputs,
        "deadline": deadline,
        "attempt": 0,
        "max_retries": max_retries,
        "host_wait_s": host_wait_s,
        "rehost_wait_s": rehost_wait_s,
    }


def response_msg(
    *,
    request_id: str,
    requester: str | None,
    operator: str | None,
    worker: str | None,
    outputs: dict[str, Any],
    parameters: dict[str, Any],
    error: dict[str, Any] | None,
    final: bool,
) -> ResponseMsg:
    """A response (``error`` already encoded by :func:`tdask.exceptions.error_to_msg`)."""
    return {
        "id": request_id,
        "requester": requester,
        "operator": operator,
        "worker": worker,
        "outputs": outputs,
        "parameters": parameters,
        "error": error,
        "final": final,
    }


def error_reply(
    request_id: str,
    error: BaseException | dict[str, Any],
    *,
    requester: str | None = None,
    operator: str | None = None,
    worker: str | None = None,
) -> ResponseMsg:
    """A final response carrying only ``error`` (an exception, or one already encoded)."""
    return response_msg(
        request_id=request_id,
        requester=requester,
        operator=operator,
        worker=worker,
        outputs={},
        parameters={},
        error=error if isinstance(error, dict) else error_to_msg(error),
        final=True,
    )


# -- session messages ----------------------------------------------------------------------


def hello(requester: str, wire: int) -> dict[str, Any]:
    return {"op": Op.HELLO, "wire": wire, "requester": requester}


def submit(request: RequestMsg) -> dict[str, Any]:
    return {"op": Op.SUBMIT, "request": request}


def cancel(request_ids: list[str]) -> dict[str, Any]:
    return {"op": Op.CANCEL, "request_ids": request_ids}


def credit(operator: str, n: int) -> dict[str, Any]:
    return {"op": Op.CREDIT, "operator": operator, "n": n}


def respond(responses: list[ResponseMsg]) -> dict[str, Any]:
    return {"op": Op.RESPOND, "responses": responses}


def stats(values: dict[str, Any], host: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per operator ``values`` (``Serving.stats``), and the worker's own (data plane, Triton, time)."""
    return {"op": Op.STATS, "stats": values, "host": host or {}}


def requests(operator: str, leased: list[RequestMsg]) -> dict[str, Any]:
    return {"op": Op.REQUESTS, "operator": operator, "requests": leased}


def withdraw(keys: list[list[str]]) -> dict[str, Any]:
    return {"op": Op.WITHDRAW, "keys": keys}


def requester_left(requester: str) -> dict[str, Any]:
    return {"op": Op.REQUESTER_LEFT, "requester": requester}


def replies(responses: list[ResponseMsg]) -> dict[str, Any]:
    return {"op": Op.REPLIES, "replies": responses}


def refused(request_id: str) -> dict[str, Any]:
    return {"op": Op.REFUSED, "id": request_id}


def data(call: int, action: str, **fields: Any) -> dict[str, Any]:
    """A data-plane call on the wire (:class:`DataAction`); ``call`` numbers it for its reply."""
    return {"op": Op.DATA, "call": call, "action": action, **fields}


def data_reply(call: int, status: str, **fields: Any) -> dict[str, Any]:
    """The answer to :func:`data`.

    Status ``"OK"``, ``"missing"`` (fetch: not held) or ``"refused"`` (the owner cannot serve
    it here: the caller uses Dask's comm).
    """
    return {"op": Op.DATA_REPLY, "call": call, "status": status, **fields}
