"""The wire: a lean message transport for direct request sessions on ``tcp://`` and ``tls://`` clusters.

Why it exists: a direct-plane request crosses processes twice per hop (six times through the
hello world's ``encoder_decoder``), each crossing a one-way message of a few hundred bytes. On
Dask's TCP comm such a message costs two coroutines, Tornado's IOStream buffering and an epoll
re-registration per read: a ping-pong between two processes measured 320-360 us round trip on
this project's 2-core machine, against 120-140 us for an :class:`asyncio.Protocol` on the same
kind of socket (docs/performance.md). Here a message is handled in the event loop's read
callback itself; a lone message is written at once, and messages that pile up (under load) leave
together, one write per loop iteration.

What does not change: the scheduler sessions, every RPC, and the data plane (tensors above the
inline threshold) stay on Dask's comm; ``ucx://`` clusters use Dask's comm for direct sessions
too, as does everyone with ``tdask.request.direct-transport: dask``, and a worker that cannot be
reached on its wire port is reached over Dask's comm instead (all decided in
:mod:`tdask.transport.registry`). On
``tls://`` clusters the wire runs over TLS with the cluster's own Dask security contexts
(:func:`wire_ssl_context`): mutual authentication, exactly as on Dask's comm.

Format: each frame is a 4-byte little-endian length and a msgpack list of messages, each a dict
whose ``"op"`` is a str. The caller's first message is ``{"op": "hello", "wire": WIRE_VERSION,
"requester": ...}``. Anything else closes the connection, with a warning naming the peer.

A message carrying a tensor's memory (:meth:`WireSession.send_with_payload`, version 2) is a
frame of its own: the length with its top bit set (the msgpack message's), an 8-byte length of
the payload, the message (its ``"payload"`` field names the key the payload belongs to), then
the payload's raw bytes. Neither end copies them: the sender hands the tensor's memory to the
socket, the receiver reads it straight into a fresh uninitialised buffer (a numpy ``uint8``
array, given as a memoryview) that becomes the message's field, where a msgpack ``bin`` would have been read into the
session's buffer and copied out once more (docs/performance.md).

Limits (``tdask.wire.*``, docs/design.md): a connection must say hello within
``hello-timeout``, in a first frame of at most 64 KiB, and a worker holds at most
``max-connections`` (both :mod:`tdask.transport.wire_server`, the listening half); no frame is
above ``max-frame`` (a header announcing more closes the
connection before its payload is read; :meth:`WireSession.send` refuses a larger message with
:class:`MessageTooLargeError` and splits batches); a peer that stops reading pauses the session
(writers that can wait ``await session.drain()``), and one that lets ``max-buffer`` bytes pile
up is cut off. Sockets get Dask's TCP keepalive and ``TCP_USER_TIMEOUT``
(``distributed.comm.timeouts.tcp``), so a peer that vanishes is noticed as on Dask's comm.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any, cast

import msgpack
import numpy as np
from distributed.comm import parse_address
from distributed.comm.core import CommClosedError
from distributed.comm.tcp import set_tcp_timeout

from tdask.config import get_bytes
from tdask.transport.base import MessageHandler, MessageTooLargeError, ProtocolError, check_shape

logger = logging.getLogger(__name__)

WIRE_VERSION = 2  # 2: payloads in frames of their own, outside msgpack
_HEADER = struct.Struct("<I")  # a frame's length
_PAYLOAD_FLAG = 0x80000000  # set in a frame's length: a message and a raw payload follow
_PAYLOAD_HEADER = struct.Struct("<IQ")  # the message's length (flagged), the payload's length
_HEADER_SMALL = struct.Struct("<IB")  # a frame's length and a msgpack fixarray header (< 16 items)
_MAX_HELLO = 64 * 1024  # the first frame, before the peer said who it is
# The transport's own write buffer, above the kernel's (~4 MiB on loopback): past this, writing
# pauses and messages wait in the session's queue, where they are counted against max-buffer.
_TRANSPORT_HIGH = 256 * 1024
_TRANSPORT_LOW = 64 * 1024
_HANDSHAKE_TIMEOUT = 60.0  # asyncio's default TLS handshake timeout, used when hello-timeout is null
_READ_SIZE = 64 * 1024  # a session's receive buffer; it grows for a larger frame
_MIN_READ = 16 * 1024  # room left for the next read, or the buffer is compacted
_KEEP_READ = 1024 * 1024  # buffers grown past this are dropped once empty
_PACK_SIZE = 16 * 1024  # the packer's initial buffer (msgpack's default is 256 KiB)


class _Parts(list):  # a payload frame as [header and message, payload]: written as it is, not copied
    nbytes = 0


class WireProtocolError(ProtocolError):
    """The peer does not speak this wire (a bad hello): the connection is closed."""


def wire_ssl_context(address: str, args: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The TLS context of the wire next to ``address``: the cluster's own on ``tls://``, else None.

    Parameters
    ----------
    address : str
        The worker's Dask address; its scheme decides, so both ends agree.
    args : Mapping
        ``security.get_listen_args("worker")`` on the worker, the caller's ``connection_args``.

    Returns
    -------
    ssl.SSLContext or None
        Dask's context (mutual authentication, no hostname check) on ``tls://``; None on ``tcp://``.

    Raises
    ------
    ValueError
        On ``tls://`` without a context: the wire never falls back to plain TCP there.
    """
    if parse_address(address)[0] != "tls":
        return None
    context = args.get("ssl_context")
    if not isinstance(context, ssl.SSLContext):
        raise ValueError(f"{address} is a TLS address, but no ssl_context came with its security settings")
    return context


def _set_keepalive(transport: asyncio.BaseTransport) -> None:
    """TCP keepalive and ``TCP_USER_TIMEOUT`` exactly as Dask's comm sets them (``timeouts.tcp``)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        # distributed's helper wants a Tornado stream: it only asks closed() and .socket.
        set_tcp_timeout(SimpleNamespace(closed=lambda: False, socket=sock))
    except AssertionError:  # distributed.comm.timeouts.tcp below 11 s: Dask's comm refuses it too
        logger.warning("wire: distributed.comm.timeouts.tcp is too low for TCP keepalive; not set")


def _array_head(count: int) -> bytes:
    """The msgpack header of an array of ``count`` items."""
    if count < 16:
        return bytes((0x90 | count,))
    if count < 0x10000:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _preview(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


class WireSession(asyncio.BufferedProtocol):
    """One connection carrying one-way messages both ways (a :class:`~tdask.transport.base.Transport`).

    Parameters
    ----------
    name : str
        For log lines.
    on_message : callable, optional
        Called with every incoming message, in the event loop's read callback. None: the
        server installs its hello handler, and the first frame is limited to 64 KiB.
    on_close : callable, optional
        Called once the connection is lost.

    Attributes
    ----------
    peer : str
        ``host:port`` of the other end, once connected (for log lines).
    """

    #: Host tensors ride the wire as data calls (the data plane's shortcut).
    carries_data = True

    def __init__(
        self, name: str, on_message: MessageHandler | None = None, on_close: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.closed = asyncio.Event()
        self.peer = "?"
        self._on_close = on_close
        self._on_message: MessageHandler = on_message if on_message is not None else self._no_handler
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._outbox: list[bytes | _Parts] = []  # packed messages, in order
        self._queued = 0  # their bytes
        self._flush_pending = False
        self._last_batch = 0  # messages in the last write: more than one means a burst
        self._paused = False
        self._resumed = asyncio.Event()  # set unless paused: what drain() waits for
        self._resumed.set()
        self._rbuf = bytearray(_READ_SIZE)  # what was read: frames from _rstart to _rend
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._need = 0  # bytes of the incomplete frame at _rstart, once its header is read
        # A payload being read straight into its own buffer: (message, key, buffer, bytes read).
        self._payload: tuple[dict[str, Any], str, np.ndarray, int] | None = None
        self._payloads = 0  # payload frames in the outbox (they leave as frames of their own)
        self._max_frame = get_bytes("tdask.wire.max-frame")
        self._max_buffer = max(get_bytes("tdask.wire.max-buffer"), self._max_frame)
        self._limit = self._max_frame if on_message is not None else _MAX_HELLO
        self._packer = msgpack.Packer(use_bin_type=True, buf_size=_PACK_SIZE)

    @property
    def queued_bytes(self) -> int:
        """Bytes of packed messages waiting in this session (not yet handed to the transport)."""
        return self._queued

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; set its write-buffer limits and TCP keepalive."""
        # No isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)  # asyncio and uvloop set TCP_NODELAY
        if self.closed.is_set():  # given up on during the TLS handshake (the hello deadline)
            self._transport.abort()
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        self._transport.set_write_buffer_limits(high=_TRANSPORT_HIGH, low=_TRANSPORT_LOW)
        _set_keepalive(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Mark the session closed, drop what is queued and wake :meth:`drain`."""
        self.closed.set()
        self._outbox.clear()
        self._queued = self._payloads = 0
        self._payload = None
        self._resumed.set()  # wake drain(): the next send() raises
        if self._on_close is not None:
            self._on_close()

    def pause_writing(self) -> None:
        """The transport's buffer is above its high-water mark: keep messages here."""
        self._paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        """The transport's buffer drained: write what waited and wake :meth:`drain`."""
        self._paused = False
        if self._outbox:
            self._schedule_flush()
        self._resumed.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next read lands: this session's own buffer, with room for at least 16 KiB."""
        # Reads land in this session's own buffer: asyncio's plain protocols get a fresh 256 KiB
        # bytes object per read, which under Dask's MALLOC_TRIM_THRESHOLD_ can cost an
        # mmap/mremap/munmap per message (measured: ~35 us of worker CPU per request).
        if self._payload is not None:  # the rest of a payload: straight into its own buffer
            _, _, buffer, got = self._payload
            return buffer.data[got:]
        if len(self._rbuf) - self._rend < _MIN_READ:
            self._make_room()
        return self._rview[self._rend :]

    def _make_room(self) -> None:
        """Move the incomplete frame to the front, into a larger buffer if it needs one."""
        pending = self._rend - self._rstart
        size = max(_READ_SIZE, pending + _MIN_READ)
        if self._need > size:  # a large frame: room for all of it once the peer said hello (as
            # Dask's comm); before, room grows with what arrived (a header alone reserves nothing)
            size = self._need + _MIN_READ if self._limit > _MAX_HELLO else max(size, min(self._need, 2 * pending))
        if size <= len(self._rbuf):  # then _rstart > 0: there was room before it
            self._rbuf[:pending] = self._rbuf[self._rstart : self._rend]
        else:
            buffer = bytearray(size)
            buffer[:pending] = self._rview[self._rstart : self._rend]
            self._rbuf, self._rview = buffer, memoryview(buffer)
        self._rstart, self._rend = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        """Split the frames read, check each message's shape and hand it on; close on a bad one."""
        if self._payload is not None:  # nbytes more of a payload, read into its own buffer
            message, key, buffer, got = self._payload
            got += nbytes
            if got < len(buffer):
                self._payload = (message, key, buffer, got)
                return
            self._payload = None
            message[key] = buffer.data
            problem = self._deliver(message)
            if problem is not None:
                self._close_after(problem)
            return
        self._rend += nbytes
        if self._rend - self._rstart < self._need:
            return  # a frame still arriving
        rbuf, view = self._rbuf, self._rview
        offset, end = self._rstart, self._rend
        need = 0
        problem = None
        while end - offset >= 4:
            (length,) = _HEADER.unpack_from(rbuf, offset)
            if length & _PAYLOAD_FLAG:
                if end - offset < _PAYLOAD_HEADER.size:
                    need = _PAYLOAD_HEADER.size
                    break
                length, size = _PAYLOAD_HEADER.unpack_from(rbuf, offset)
                length &= ~_PAYLOAD_FLAG
                if length + size > self._limit:  # refused before the payload is read
                    problem = f"a frame of {length + size} bytes, above this connection's limit of {self._limit}"
                    break
                start = offset + _PAYLOAD_HEADER.size
                if end - start < length:
                    need = _PAYLOAD_HEADER.size + length
                    break
                offset = start + length
                carried, problem = self._payload_message(view[start:offset])
                if problem is not None or carried is None:
                    break
                key = carried.pop("payload")
                buffer = np.empty(size, np.uint8)  # no zeroing: the socket writes every byte
                here = min(size, end - offset)
                if here:
                    buffer[:here] = np.frombuffer(rbuf, np.uint8, here, offset)
                offset += here
                if here < size:  # the rest goes straight into the buffer (get_buffer)
                    self._payload = (carried, key, buffer, here)
                    break
                carried[key] = buffer.data
                problem = self._deliver(carried)
                if problem is not None:
                    break
                continue
            if length > self._limit:  # refused before its payload is read, let alone held
                problem = f"a frame of {length} bytes, above this connection's limit of {self._limit}"
                break
            start = offset + 4
            if end - start < length:
                need = 4 + length
                break
            try:
                messages = msgpack.unpackb(
                    view[start : start + length], raw=False, use_list=False, strict_map_key=False
                )
            except Exception as exc:
                problem = f"a frame that is not msgpack ({exc})"
                break
            offset = start + length
            if type(messages) is not tuple:
                problem = f"a frame holding {_preview(messages)}, not a list of messages"
                break
            for message in messages:
                problem = self._deliver(message)
                if problem is not None:
                    break
            if problem is not None:
                break
        if problem is not None:
            self._close_after(problem)
            return
        self._need = need
        if offset < end:
            self._rstart = offset  # an incomplete frame: the next read appends to it
        else:
            self._rstart = self._rend = 0
            if len(rbuf) > _KEEP_READ:  # after a large frame: do not keep its room
                self._rbuf = bytearray(_READ_SIZE)
                self._rview = memoryview(self._rbuf)

    def _payload_message(self, data: memoryview) -> tuple[dict[str, Any] | None, str | None]:
        """The message of a payload frame, or why it is refused."""
        try:
            message = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=False)
        except Exception as exc:
            return None, f"a payload frame whose message is not msgpack ({exc})"
        if type(message) is not dict or type(message.get("payload")) is not str:
            return None, f"a payload frame holding {_preview(message)}, not a message naming its payload"
        return message, None

    def _deliver(self, message: Any) -> str | None:
        """Hand one message on; why the connection must close, or None."""
        try:
            check_shape(message)
            self._on_message(message)
        except ProtocolError as exc:  # not a message, or one its handler refused
            return f"{_preview(message)}: {exc}"
        except Exception:
            logger.exception("wire session %s: handling %s failed", self.name, message["op"])
        return None

    def _close_after(self, problem: str) -> None:
        self._rstart = self._rend = self._need = 0
        self._payload = None
        logger.warning("wire session %s (peer %s): closing after %s", self.name, self.peer, problem)
        self.abort()

    def data_received(self, data: bytes) -> None:
        """Take ``data`` as if read into the buffer (transports use get_buffer/buffer_updated)."""
        view = memoryview(data)
        while view and not self.closed.is_set():
            room = self.get_buffer(len(view))
            n = min(len(room), len(view))
            room[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def _no_handler(self, message: dict[str, Any]) -> None:
        raise WireProtocolError("no handler for this connection's messages")

    # -- the session surface ----------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message``; write it at once unless this session is in a burst.

        Messages queued in one loop iteration leave together at the next (one system call for
        the lot). A message that is alone, and follows a write that was alone too, does not
        wait for that: sequential traffic pays no extra loop iteration per message, and under
        load (several messages per write) the batching that saves CPU stays.

        Parameters
        ----------
        message : dict
            Packed here, at once (msgpack); its ``"op"`` must be a str for the peer to take it.

        Raises
        ------
        CommClosedError
            The session is closed, or this message took its queue past ``tdask.wire.max-buffer``
            while the peer was not reading (the session is then aborted: a lost peer).
        MessageTooLargeError
            The message alone is above ``tdask.wire.max-frame``; the session stays open.
        TypeError
            The message holds something msgpack cannot encode; the session stays open.
        """
        self._check_open()
        data = self._packer.pack(message)
        size = len(data)
        if size > _KEEP_READ:  # do not keep the room a large message took
            self._packer = msgpack.Packer(use_bin_type=True, buf_size=_PACK_SIZE)
        self._enqueue(data, size)

    def _check_open(self) -> None:
        if self.closed.is_set() or self._transport is None or self._transport.is_closing():
            raise CommClosedError(f"tdask wire session {self.name} is closed")

    def _enqueue(self, data: bytes | _Parts, size: int) -> None:
        if size >= self._max_frame:
            raise MessageTooLargeError(
                f"a message of {size} bytes does not fit in one frame of tdask's wire "
                f"(tdask.wire.max-frame: {self._max_frame} bytes)"
            )
        self._outbox.append(data)
        self._queued += size
        if type(data) is _Parts:
            self._payloads += 1
        if self._paused or self._flush_pending:
            if self._paused and self._queued > self._max_buffer:
                self._overflow()
            return  # the flush already scheduled (or resume_writing) writes it, in order
        self._schedule_flush()
        if self._last_batch <= 1:
            self._write_outbox()

    def send_with_payload(self, message: dict[str, Any], key: str, payload: memoryview) -> None:
        """Queue ``message`` plus ``key``: ``payload``, in a payload frame of its own, not copied.

        The peer receives the message with ``payload``'s bytes under ``key`` (a memoryview of a
        numpy ``uint8`` array it owns: read straight from the socket into it); here the payload (a tensor's
        memory, which must not change until written) goes to the transport as it is. Raises as
        :meth:`send` does.
        """
        self._check_open()
        payload = payload.cast("B") if payload.format != "B" or payload.ndim != 1 else payload
        packed = self._packer.pack({**message, "payload": key})
        parts = _Parts((_PAYLOAD_HEADER.pack(len(packed) | _PAYLOAD_FLAG, len(payload)) + packed, payload))
        parts.nbytes = size = _PAYLOAD_HEADER.size + len(packed) + len(payload)
        self._enqueue(parts, size)

    def _overflow(self) -> None:
        queued = self._queued
        logger.warning(
            "wire session %s (peer %s): the peer is not reading and %d bytes are queued "
            "(tdask.wire.max-buffer: %d); closing",
            self.name,
            self.peer,
            queued,
            self._max_buffer,
        )
        self.abort()
        raise CommClosedError(
            f"tdask wire session {self.name} closed: its peer stopped reading ({queued} bytes queued)"
        )

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._write_outbox()

    def _write_outbox(self) -> None:
        transport = self._transport
        if self._paused or not self._outbox or transport is None or transport.is_closing():
            return
        batch = self._outbox
        count = len(batch)
        self._last_batch = count
        size = self._queued
        if size + 5 <= self._max_frame and not self._payloads:  # the usual case: the lot in one frame
            if count < 16:
                batch.insert(0, _HEADER_SMALL.pack(size + 1, 0x90 | count))
            else:
                head = _array_head(count)
                batch.insert(0, _HEADER.pack(len(head) + size) + head)
            self._outbox = []
            self._queued = 0
            transport.writelines(cast(list[bytes], batch))  # no payload frame among them
            return
        self._write_frames(force=False)

    def _write_frames(self, force: bool) -> None:
        """Write the queue as frames of at most max-frame bytes; unless ``force``, stop once paused.

        Runs of plain messages share frames; each payload frame leaves as it is, in order.
        """
        transport = self._transport
        assert transport is not None
        batch, self._outbox = self._outbox, []
        index, count, limit = 0, len(batch), self._max_frame
        while index < count and (force or not self._paused) and not transport.is_closing():
            entry = batch[index]
            if type(entry) is _Parts:
                transport.writelines(entry)
                self._queued -= entry.nbytes
                self._payloads -= 1
                index += 1
                continue
            stop, size = index, 0
            while stop < count:  # the longest run from index that fits one frame (one message always does)
                entry = batch[stop]
                if type(entry) is _Parts:
                    break
                item = len(entry)
                items = stop - index + 1
                head = 1 if items < 16 else 3 if items < 0x10000 else 5
                if stop > index and size + item + head > limit:
                    break
                size += item
                stop += 1
            head_bytes = _array_head(stop - index)
            run = cast(list[bytes], batch[index:stop])  # plain messages only
            transport.writelines([_HEADER.pack(len(head_bytes) + size) + head_bytes, *run])
            self._queued -= size
            index = stop
        if index < count:
            self._outbox = batch[index:] + self._outbox

    async def drain(self) -> None:
        """Wait while the peer is not keeping up (the transport's buffer is above its high-water mark).

        Writers that can wait call this before :meth:`send`, so that a slow reader slows them
        instead of growing this session's queue. Returns at once when the session is closed
        (the next :meth:`send` raises).
        """
        while self._paused and not self.closed.is_set():
            await self._resumed.wait()

    async def read_forever(self) -> None:
        """Return once the connection is closed (messages are delivered as they arrive)."""
        await self.closed.wait()

    async def close(self) -> None:
        """Close after writing what is queued (even while paused: the transport holds it)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._outbox:
                self._write_frames(force=True)
            transport.close()
        self.closed.set()
        self._resumed.set()

    def abort(self) -> None:
        """Close at once, dropping what is queued."""
        if self._transport is not None:
            self._transport.abort()
        self._outbox.clear()
        self._queued = self._payloads = 0
        self.closed.set()
        self._resumed.set()


async def open_session(
    address: str,
    requester: str,
    on_message: MessageHandler,
    *,
    timeout: float | None,
    ssl_context: ssl.SSLContext | None = None,
) -> WireSession:
    """Connect to a worker's wire and say who we are.

    Parameters
    ----------
    address : str
        The wire's ``host:port`` (the worker's ``tdask_wire_address``).
    requester : str
        This caller's name, told to the worker in the hello.
    on_message : callable
        Called with every message from the worker.
    timeout : float or None
        Seconds to connect (TLS handshake included).
    ssl_context : ssl.SSLContext, optional
        On ``tls://`` clusters, the caller's own Dask context (:func:`wire_ssl_context`); the
        hostname is not checked, as on Dask's comm (the context says so).

    Returns
    -------
    WireSession
        Open, its hello written.
    """
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
