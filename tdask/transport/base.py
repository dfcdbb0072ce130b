"""The transport contract: one connection carrying one-way messages both ways.

A message is a small dict whose ``"op"`` is a str (what the messages mean is
:mod:`tdask.protocol`'s business; a transport only checks their shape, :func:`check_shape`).
:class:`tdask.transport.wire.WireSession` (tdask's wire) and
:class:`tdask.transport.dask_comm.Session` (a Dask comm) implement :class:`Transport`; the planes
hold one without knowing which (:func:`tdask.transport.connect` picks it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["MessageHandler", "MessageTooLargeError", "ProtocolError", "Transport", "check_shape"]

#: Called with each incoming message, in the event loop's thread.
MessageHandler = Callable[[dict[str, Any]], None]


class ProtocolError(ValueError):
    """A peer sent something that is not a tdask message: its connection is closed."""


class MessageTooLargeError(ValueError):
    """A message does not fit in one frame of its transport (``tdask.wire.max-frame``); nothing was sent."""


def check_shape(message: Any) -> str:
    """Return the op of ``message`` if it is shaped as a message (a dict with a str ``op``).

    What the transports check on every incoming message; :func:`tdask.protocol.check_message`
    (used by the planes, which know the ops) checks the op and its fields too.

    Raises
    ------
    ProtocolError
        ``message`` is not a dict with a str ``op``.
    """
    if type(message) is not dict:
        raise ProtocolError(f"a message must be a dict, got {type(message).__name__}")
    op = message.get("op")
    if type(op) is not str:
        raise ProtocolError("a message needs a str 'op'")
    return op


@runtime_checkable
class Transport(Protocol):
    """One connection carrying one-way messages (dicts, see :mod:`tdask.protocol`) both ways.

    Incoming messages are checked with :func:`check_shape` and handed to the handler the
    transport was opened with; a peer that sends anything else is disconnected.
    """

    #: Who is at the other end, for log lines.
    name: str
    #: Set once the connection is closed (by either end).
    closed: asyncio.Event
    #: Whether the data plane's shortcut rides this connection (host tensors as data calls);
    #: where it does not, tensors move over Dask's comm.
    carries_data: bool

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message``; raises ``CommClosedError`` once the connection is closed."""

    def send_with_payload(self, message: dict[str, Any], key: str, payload: memoryview) -> None:
        """Send ``message`` with ``payload`` as its field ``key`` (its last), without copying it if it can."""

    async def drain(self) -> None:
        """Wait while the peer reads slower than this side writes (backpressure)."""

    async def read_forever(self) -> None:
        """Return once the connection is closed (messages are delivered as they arrive)."""

    async def close(self) -> None:
        """Close after writing what is queued."""

    def abort(self) -> None:
        """Close at once, dropping what is queued."""
