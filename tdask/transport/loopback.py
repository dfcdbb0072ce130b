"""In-process sessions: a caller and a listener of one process and one event loop, with no socket.

An operator that calls an operator hosted by its own worker (a worker hosting an orchestrator with
its models, as a Triton ensemble runs in one server) reaches it through this transport when
``tdask.request.in-process-calls`` is on (the default). Each message is packed when it is sent and
unpacked when it is delivered, with the wire's msgpack options, so both ends see what they would
see over a socket: fresh objects, tuples for lists, nothing the sender can change afterwards. What
is saved is everything else: the system calls, the other process's wake-up and its loop
iterations (docs/performance.md, "In-process calls").

Delivery is ``loop.call_soon``: in order, never inside the sender's call (the planes update their
own bookkeeping after ``send`` returns, as they may with a socket).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack
import numpy as np
from distributed.comm.core import CommClosedError

from tdask.transport.base import MessageHandler, ProtocolError, check_shape

logger = logging.getLogger(__name__)

__all__ = ["LoopbackSession", "pair"]


def _ignore(message: dict[str, Any]) -> None:
    """The handler of a listener's half until its acceptor gives one."""


class LoopbackSession:
    """One end of an in-process session (the :class:`~tdask.transport.base.Transport` contract).

    Made in pairs by :func:`pair`; what one end sends, the other's handler receives at the
    event loop's next turn.
    """

    #: The data plane's shortcut rides it: data calls are answered by the same process's store.
    carries_data = True

    def __init__(self, name: str, on_message: MessageHandler) -> None:
        self.name = name
        self.closed = asyncio.Event()
        self._on_message = on_message
        self._peer: LoopbackSession | None = None
        self._loop = asyncio.get_running_loop()
        self._packer = msgpack.Packer(use_bin_type=True)

    def send(self, message: dict[str, Any]) -> None:
        """Pack ``message`` now; the peer's handler gets it at the loop's next turn.

        Raises
        ------
        CommClosedError
            The session is closed.
        TypeError
            The message holds something msgpack cannot encode (as on the wire); the session stays open.
        """
        peer = self._check_open()
        self._loop.call_soon(peer._receive, self._packer.pack(message), None)

    def send_with_payload(self, message: dict[str, Any], key: str, payload: memoryview) -> None:
        """Send ``message`` with a copy of ``payload`` as its field ``key`` (a memoryview, as the wire delivers it)."""
        peer = self._check_open()
        data = np.empty(payload.nbytes, np.uint8)  # the sender may reuse its buffer once this returns
        data[:] = np.frombuffer(payload, np.uint8)
        self._loop.call_soon(peer._receive, self._packer.pack(message), (key, data.data))

    def _check_open(self) -> LoopbackSession:
        peer = self._peer
        if self.closed.is_set() or peer is None:
            raise CommClosedError(f"tdask session {self.name} is closed")
        return peer

    def _receive(self, data: bytes, payload: tuple[str, memoryview] | None) -> None:
        if self.closed.is_set():
            return  # aborted with messages still on their way: dropped, as a socket's buffer
        message = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=False)
        if payload is not None:
            message[payload[0]] = payload[1]
        try:
            check_shape(message)
            self._on_message(message)
        except ProtocolError as exc:  # one its handler refused: the session ends, as on the wire
            logger.warning("in-process session %s: closing after %s", self.name, exc)
            self.abort()
        except Exception:
            logger.exception("in-process session %s: handling %s failed", self.name, message.get("op"))

    async def drain(self) -> None:
        """Nothing to wait for: the peer is this process, and reads at the loop's next turn."""

    async def read_forever(self) -> None:
        """Return once the session is closed (messages are delivered as they are sent)."""
        await self.closed.wait()

    async def close(self) -> None:
        """Close once what was sent before has been delivered (both ends)."""
        if not self.closed.is_set():
            self._loop.call_soon(self.abort)  # after the deliveries already queued
        await self.closed.wait()

    def abort(self) -> None:
        """Close both ends at once; what is on its way is dropped."""
        self.closed.set()
        peer, self._peer = self._peer, None
        if peer is not None:
            peer.abort()

    def __repr__(self) -> str:
        return f"<LoopbackSession {self.name}{' closed' if self.closed.is_set() else ''}>"


def pair(caller_name: str, on_message: MessageHandler, listener_name: str) -> tuple[LoopbackSession, LoopbackSession]:
    """A connected pair: the caller's end (delivering to ``on_message``) and the listener's end.

    The listener's end delivers to nothing until its acceptor's handler is set as its
    ``_on_message`` (see :class:`tdask.transport.registry.LoopbackBackend`).
    """
    caller = LoopbackSession(caller_name, on_message)
    listener = LoopbackSession(listener_name, _ignore)
    caller._peer, listener._peer = listener, caller
    return caller, listener
