"""The wire: a lean message transport for direct request sessions on plain-TCP clusters.

Why it exists: a direct-plane request crosses processes twice per hop (six times through the
hello world's ``encoder_decoder``), each crossing a one-way message of a few hundred bytes. On
Dask's TCP comm such a message costs two coroutines, Tornado's IOStream buffering and an epoll
re-registration per read: a ping-pong between two processes measured 320-360 us round trip on
this project's 2-core machine, against 120-140 us for an :class:`asyncio.Protocol` on the same
kind of socket (docs/performance.md). Here a message is handled in the event loop's read
callback itself; a lone message is written at once, and messages that pile up (under load) leave
together, one write per loop iteration.

What does not change: the scheduler sessions, every RPC, and the data plane (tensors above the
inline threshold) stay on Dask's comm; clusters on ``tls://`` or ``ucx://`` use Dask's comm for
direct sessions too (:func:`wire_wanted`), as does everyone with
``tdask.request.direct-transport: dask``. A worker that cannot be reached on its wire port is
reached over Dask's comm instead.

Format: each frame is a 4-byte little-endian length and a msgpack list of messages (dicts).
The caller's first message is ``{"op": "hello", "wire": WIRE_VERSION, "requester": ...}``;
anything else, or a first frame above 64 KiB, closes the connection. Like Dask's ``tcp://``
comm, the wire has no authentication: clusters that need it use TLS, where it stays off.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import dask.config
import msgpack
from distributed.comm import parse_address
from distributed.comm.core import CommClosedError

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
_HEADER = struct.Struct("<I")
_MAX_FRAME = 2**32 - 1
_MAX_HELLO = 64 * 1024


class WireProtocolError(ValueError):
    """The peer does not speak this wire (a bad hello): the connection is closed."""


MessageHandler = Callable[[dict[str, Any]], None]
# Called with a new session and its requester's name; returns the handler of its messages.
AcceptHandler = Callable[["WireSession", str], MessageHandler]


def wire_wanted(address: str) -> bool:
    """Whether direct sessions to/from ``address`` should use the wire (plain TCP only)."""
    if dask.config.get("tdask.request.direct-transport") != "wire":
        return False
    try:
        return parse_address(address)[0] == "tcp"
    except ValueError:
        return False


class WireSession(asyncio.Protocol):
    """One connection carrying one-way messages both ways; the same surface as
    :class:`tdask.request_plane.Session` (``send``, ``closed``, ``read_forever``, ``close``)."""

    def __init__(
        self, name: str, on_message: MessageHandler | None = None, on_close: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.closed = asyncio.Event()
        self._on_close = on_close
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._outbox: list[dict[str, Any]] = []
        self._flush_pending = False
        self._last_batch = 0  # messages in the last write: more than one means a burst
        self._paused = False
        self._buffer = bytearray()
        self._limit = _MAX_FRAME if on_message is not None else _MAX_HELLO

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport  # asyncio sets TCP_NODELAY on TCP sockets itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self._outbox.clear()
        if self._on_close is not None:
            self._on_close()

    def pause_writing(self) -> None:
        self._paused = True  # the peer reads slower than we write: keep messages here

    def resume_writing(self) -> None:
        self._paused = False
        if self._outbox:
            self._schedule_flush()

    def data_received(self, data: bytes) -> None:
        held = bool(self._buffer)
        if held:
            self._buffer += data
        view = memoryview(self._buffer) if held else memoryview(data)
        offset, end = 0, len(view)
        try:
            while end - offset >= _HEADER.size:
                (length,) = _HEADER.unpack_from(view, offset)
                if length > self._limit:
                    raise ValueError(f"a frame of {length} bytes is above this connection's limit of {self._limit}")
                start = offset + _HEADER.size
                if end - start < length:
                    break
                messages = msgpack.unpackb(
                    view[start : start + length], raw=False, use_list=False, strict_map_key=False
                )
                offset = start + length
                if not isinstance(messages, (list, tuple)):
                    raise ValueError(f"a frame must hold a list of messages, not {type(messages).__name__}")
                for message in messages:
                    self._deliver(message)
        except Exception as exc:
            view.release()
            self._buffer = bytearray()
            logger.warning("wire session %s: closing after a bad message: %s", self.name, exc)
            self.abort()
            return
        # Keep what is left of an incomplete frame (no copy while a large frame accumulates).
        rest = None if offset == 0 else bytes(view[offset:])
        view.release()
        if rest is not None:
            self._buffer = bytearray(rest)
        elif not held:
            self._buffer = bytearray(data)

    def _deliver(self, message: dict[str, Any]) -> None:
        if self._on_message is None:
            raise ValueError("no handler for this connection's messages")
        try:
            self._on_message(message)
        except WireProtocolError:
            raise
        except Exception:
            logger.exception("wire session %s: handling %s failed", self.name, message.get("op"))

    # -- the Session surface ----------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message``; write it at once unless this session is in a burst.

        Messages queued in one loop iteration leave together at the next (one system call for
        the lot). A message that is alone, and follows a write that was alone too, does not
        wait for that: sequential traffic pays no extra loop iteration per message, and under
        load (several messages per write) the batching that saves CPU stays.
        """
        if self.closed.is_set() or self._transport is None or self._transport.is_closing():
            raise CommClosedError(f"tdask wire session {self.name} is closed")
        self._outbox.append(message)
        if self._paused or self._flush_pending:
            return  # the flush already scheduled (or resume_writing) writes it, in order
        self._schedule_flush()
        if self._last_batch <= 1:
            self._write_outbox()

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._write_outbox()

    def _write_outbox(self) -> None:
        if self._paused or not self._outbox or self._transport is None or self._transport.is_closing():
            return
        batch, self._outbox = self._outbox, []
        self._last_batch = len(batch)
        try:
            payload = msgpack.packb(batch, use_bin_type=True)
        except Exception:
            logger.exception("wire session %s: cannot encode %d messages; closing", self.name, len(batch))
            self.abort()
            return
        if len(payload) > _MAX_FRAME:
            logger.error("wire session %s: %d bytes of messages exceed one frame; closing", self.name, len(payload))
            self.abort()
            return
        self._transport.writelines([_HEADER.pack(len(payload)), payload])

    async def drain(self) -> None:
        """Wait while writing is paused (placeholder until the bounded buffer lands)."""

    async def read_forever(self) -> None:
        """Return once the connection is closed (messages are delivered as they arrive)."""
        await self.closed.wait()

    async def close(self) -> None:
        """Close after writing what is queued."""
        if self._transport is not None and not self._transport.is_closing():
            self._write_outbox()
            self._transport.close()
        self.closed.set()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self.closed.set()


async def open_session(
    address: str, requester: str, on_message: MessageHandler, *, timeout: float | None, ssl_context: Any = None
) -> WireSession:
    """Connect to a worker's wire (``host:port``) and say who we are."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    _, session = await asyncio.wait_for(
        loop.create_connection(
            lambda: WireSession(f"to {address}", on_message), host.strip("[]"), int(port), ssl=ssl_context
        ),
        timeout,
    )
    session.send({"op": "hello", "wire": WIRE_VERSION, "requester": requester})  # written at once, alone:
    return session  # the server reads the first frame with a small limit


class WireServer:
    """A worker's wire listener: each caller's connection becomes a :class:`WireSession`."""

    def __init__(self, accept: AcceptHandler) -> None:
        self._accept = accept
        self._server: asyncio.Server | None = None
        self._sessions: set[WireSession] = set()  # until they close: aborted with the server
        self.address: str | None = None

    async def start(self, host: str, port: int = 0, *, ssl_context: Any = None) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, host, port, ssl=ssl_context)
        bound = self._server.sockets[0].getsockname()
        self.address = f"[{host}]:{bound[1]}" if ":" in host else f"{host}:{bound[1]}"
        return self.address

    def _new_session(self) -> WireSession:
        session = WireSession("incoming", on_close=lambda: self._sessions.discard(session))
        session._on_message = lambda message: self._hello(session, message)
        session._limit = _MAX_HELLO
        self._sessions.add(session)
        return session

    def _hello(self, session: WireSession, message: dict[str, Any]) -> None:
        if (
            not isinstance(message, dict)
            or message.get("op") != "hello"
            or message.get("wire") != WIRE_VERSION
            or not message.get("requester")
        ):
            raise WireProtocolError(f"expected a wire version {WIRE_VERSION} hello, got {str(message)[:200]}")
        requester = str(message["requester"])
        session.name = f"from {requester}"
        session._limit = _MAX_FRAME
        session._on_message = self._accept(session, requester)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self._sessions):
            session.abort()
