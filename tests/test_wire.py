"""tdask's wire (tdask/wire.py): framing, handshake, limits, keepalive, TLS and fallback, on real
sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import dask
import msgpack
import numpy as np
import pytest
from distributed.comm.core import CommClosedError

from tdask import Deployment, InvalidRequestError, OperatorConfig, RemoteOperator
from tdask.host import PLUGIN_NAME
from tdask.transport.wire import WIRE_VERSION, MessageTooLargeError, WireSession, open_session
from tdask.transport.wire_server import WireServer
from tests.conftest import assert_no_children, wait_for
from tests.operators import Identity

pytestmark = pytest.mark.timeout(120)

HELLO = {"op": "hello", "wire": WIRE_VERSION, "requester": "raw peer"}


def frame(messages: object) -> bytes:
    """One frame as a peer would write it (a list of message dicts, unless testing otherwise)."""
    payload = msgpack.packb(messages, use_bin_type=True)
    return struct.pack("<I", len(payload)) + payload


async def echo_server(ssl_context=None) -> tuple[WireServer, list[str]]:
    """A wire server that answers every message with itself."""
    requesters: list[str] = []

    def accept(session: WireSession, requester: str):
        requesters.append(requester)
        return lambda message: session.send({"op": "echo", "echo": message})

    server = WireServer(accept)
    await server.start("127.0.0.1", ssl_context=ssl_context)
    return server, requesters


async def recording_server() -> tuple[WireServer, list[WireSession], list[dict]]:
    """A wire server that keeps its sessions and every message it receives."""
    sessions: list[WireSession] = []
    received: list[dict] = []

    def accept(session: WireSession, requester: str):
        sessions.append(session)
        return received.append

    server = WireServer(accept)
    await server.start("127.0.0.1")
    return server, sessions, received


async def raw_connect(address: str, opening: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    if opening:
        writer.write(opening)
        await writer.drain()
    return reader, writer


async def hung_up(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the other end closes the connection within ``timeout`` (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except TimeoutError:  # still open (TimeoutError is an OSError: caught first)
        return False
    except OSError:  # reset
        pass
    return True


@contextlib.contextmanager
def wire_warnings() -> Iterator[list[str]]:
    """The warnings the wire (session and server) logs meanwhile (tdask's logger does not propagate to caplog)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    handler = Keep()
    logs = [logging.getLogger("tdask.transport.wire"), logging.getLogger("tdask.transport.wire_server")]
    for log in logs:
        log.addHandler(handler)
    try:
        yield lines
    finally:
        for log in logs:
            log.removeHandler(handler)


# -- framing and batching ------------------------------------------------------------------


def test_messages_go_both_ways_in_order_whatever_their_size():
    async def main():
        server, requesters = await echo_server()
        received: list[dict] = []
        done = asyncio.Event()
        sent = [{"op": "x", "i": i, "blob": bytes(2**20) if i % 100 == 7 else b"x"} for i in range(500)]

        def on_message(message):
            received.append(message["echo"])
            if len(received) == len(sent):
                done.set()

        session = await open_session(server.address, "tester", on_message, timeout=5)
        for message in sent:
            session.send(message)
            if message["i"] % 50 == 0:
                await asyncio.sleep(0)  # some in one frame, some in frames of their own
        await asyncio.wait_for(done.wait(), 30)
        await session.close()
        await server.close()
        return requesters, received, sent

    requesters, received, sent = asyncio.run(main())
    assert requesters == ["tester"]
    assert [m["i"] for m in received] == list(range(500))
    assert all(r["blob"] == s["blob"] for r, s in zip(received, sent, strict=True))


def feed_in_pieces(stream: bytes, rng: random.Random, steps: list[int]) -> tuple[list[dict], WireSession]:
    """Hand ``stream`` to a fresh session in pieces of random sizes; what it delivered, and it."""
    got: list[dict] = []
    session = WireSession("test", got.append)
    position = 0
    while position < len(stream):
        step = rng.choice(steps)
        session.data_received(stream[position : position + step])
        position += step
    return got, session


def test_frames_split_anywhere_are_reassembled():
    async def main():
        rng = random.Random(7)
        messages = [{"op": "x", "i": i, "data": bytes(rng.randrange(0, 3000))} for i in range(200)]
        messages[150]["data"] = rng.randbytes(3_000_000)  # one frame larger than the receive buffer
        stream = b"".join(frame(messages[i : i + 3]) for i in range(0, len(messages), 3))
        got, session = feed_in_pieces(stream, rng, [1, 2, 3, 5, 100, 4096, 20000, 300_000])
        return messages, got, len(session._rbuf)

    messages, got, room = asyncio.run(main())
    assert [dict(m) for m in got] == messages
    assert room == 64 * 1024  # the room the large frame took is not kept


async def frame_reader_server() -> tuple[asyncio.Server, str, list[list[dict]], list[int]]:
    """A raw server reading wire frames: what arrived, frame by frame, and each frame's length.

    A payload frame (version 2) is recorded as a list of its one message, the payload under the
    key the message names, and its length as the message's plus the payload's.
    """
    frames: list[list[dict]] = []
    lengths: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("<I", await reader.readexactly(4))
                if length & 0x80000000:
                    (size,) = struct.unpack("<Q", await reader.readexactly(8))
                    message = msgpack.unpackb(await reader.readexactly(length & 0x7FFFFFFF))
                    message[message.pop("payload")] = await reader.readexactly(size)
                    lengths.append((length & 0x7FFFFFFF) + size)
                    frames.append([message])
                    continue
                lengths.append(length)
                frames.append(msgpack.unpackb(await reader.readexactly(length)))
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", frames, lengths


_X_PAYLOAD = msgpack.packb({"op": "x", "payload": "bytes"}, use_bin_type=True)


def payload_frame(message: dict, key: str, payload: bytes) -> bytes:
    """A payload frame as a peer would write it (version 2): flagged length, payload length, message, payload."""
    packed = msgpack.packb({**message, "payload": key}, use_bin_type=True)
    return struct.pack("<IQ", len(packed) | 0x80000000, len(payload)) + packed + payload


def test_a_lone_message_leaves_at_once_and_a_burst_in_one_write():
    """The hot path kept: a message after a quiet spell is written inside send() (no loop
    iteration), and what piles up in one iteration leaves as one frame."""

    async def main():
        server, address, frames, _ = await frame_reader_server()
        session = await open_session(address, "tester", lambda message: None, timeout=5)
        await asyncio.sleep(0.05)
        session.send({"op": "lone"})
        written_at_once = session.queued_bytes == 0 and session._transport.get_write_buffer_size() == 0
        await asyncio.sleep(0.05)
        for i in range(10):  # the first leaves at once (the previous write was alone), the rest together
            session.send({"op": "burst", "i": i})
        await asyncio.sleep(0.05)
        for i in range(10):  # now the session is in a burst: all ten in one frame
            session.send({"op": "burst", "i": 10 + i})
        await asyncio.sleep(0.2)
        await session.close()
        server.close()
        return written_at_once, frames

    written_at_once, frames = asyncio.run(main())
    assert written_at_once
    assert [len(f) for f in frames] == [1, 1, 1, 9, 10]  # hello, lone, burst: 1 + 9, burst: 10
    assert [m["i"] for f in frames[2:] for m in f] == list(range(20))


# -- the handshake and its deadline ----------------------------------------------------------


@pytest.mark.parametrize(
    "opening",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # someone else's protocol: a 1 GB "frame"
        struct.pack("<I", 2**31) + b"x" * 16,  # a huge first frame is refused before it is read
        frame([{"op": "submit", "request": {}}]),  # no hello first
        frame([{"op": "hello", "wire": 999, "requester": "future"}]),  # another wire version
        frame([["hello"]]),  # a message that is not a dict
        frame({"op": "hello", "wire": WIRE_VERSION, "requester": "x"}),  # a frame that is not a list
    ],
)
def test_a_peer_that_does_not_say_hello_is_dropped(opening):
    async def main():
        server, requesters = await echo_server()
        reader, writer = await raw_connect(server.address, opening)
        closed = await asyncio.wait_for(reader.read(), 10)  # EOF: the server hung up
        writer.close()
        await server.close()
        return closed, requesters

    closed, requesters = asyncio.run(main())
    assert closed == b"" and requesters == []


def test_a_peer_that_says_nothing_is_closed_at_the_hello_deadline():
    """Connections that never say hello (or only part of one) are closed after
    tdask.wire.hello-timeout, with one warning for all of them; a session that did stays."""

    async def main():
        server, requesters = await echo_server()
        got: list[dict] = []
        session = await open_session(server.address, "tester", got.append, timeout=5)
        start = time.monotonic()
        silent = [await raw_connect(server.address), await raw_connect(server.address, frame([HELLO])[:6])]
        silent += [await raw_connect(server.address) for _ in range(3)]
        while len(server._sessions) < 6:  # all accepted
            await asyncio.sleep(0.01)
        await asyncio.gather(*(hung_up(reader, 5) for reader, _ in silent))
        elapsed = time.monotonic() - start
        for _, writer in silent:
            writer.close()
        session.send({"op": "still there"})
        while not got:
            await asyncio.sleep(0.01)
        open_sessions = len(server._sessions)
        await session.close()
        await server.close()
        return elapsed, got, open_sessions, requesters

    with dask.config.set({"tdask.wire.hello-timeout": "0.5s"}), wire_warnings() as warnings:
        elapsed, got, open_sessions, requesters = asyncio.run(main())
    assert 0.45 < elapsed < 3, elapsed
    assert got[0]["echo"] == {"op": "still there"} and requesters == ["tester"]
    assert open_sessions == 1  # the silent ones are forgotten, not only closed
    assert len([w for w in warnings if "said no hello" in w]) == 1, warnings


def test_connections_beyond_the_cap_are_closed_at_once():
    async def main():
        server, requesters = await echo_server()
        held = [await raw_connect(server.address) for _ in range(4)]  # the cap, none said hello yet
        extra = [await raw_connect(server.address, frame([HELLO])) for _ in range(3)]
        start = time.monotonic()
        await asyncio.gather(*(hung_up(reader, 5) for reader, _ in extra))
        refused_within = time.monotonic() - start
        for _, writer in extra + held[:2]:
            writer.close()
        while len(server._sessions) > 2:
            await asyncio.sleep(0.01)
        got: list[dict] = []
        session = await open_session(server.address, "tester", got.append, timeout=5)  # room again
        session.send({"op": "ping"})
        while not got:
            await asyncio.sleep(0.01)
        still_open = [not writer.is_closing() and not reader.at_eof() for reader, writer in held[2:]]
        await session.close()
        await server.close()
        return refused_within, requesters, still_open

    with dask.config.set({"tdask.wire.max-connections": 4}), wire_warnings() as warnings:
        refused_within, requesters, still_open = asyncio.run(main())
    assert refused_within < 1.0
    assert requesters == ["tester"]  # the three beyond the cap were never read, hello or not
    assert still_open == [True, True]
    assert len([w for w in warnings if "max-connections" in w]) == 1, warnings  # once, not per connection


# -- frame size ----------------------------------------------------------------------------


def test_a_frame_above_max_frame_is_refused_before_it_is_read():
    """A header announcing more than tdask.wire.max-frame closes the connection with nothing
    more sent (so nothing of it was waited for, let alone buffered); a frame of exactly the cap
    is taken."""

    async def main():
        server, sessions, received = await recording_server()
        cap = 2**20
        overhead = len(msgpack.packb([{"op": "big", "blob": bytes(2**17)}])) - 2**17
        blob = bytes(cap - overhead)  # a frame of exactly the cap
        exact = frame([{"op": "big", "blob": blob}])
        assert len(exact) == cap + 4
        reader, writer = await raw_connect(server.address, frame([HELLO]) + exact)
        while not received:
            await asyncio.sleep(0.01)
        writer.write(struct.pack("<I", cap + 1))  # the header alone
        await writer.drain()
        start = time.monotonic()
        await hung_up(reader, 5)
        refused_within = time.monotonic() - start
        buffered = len(sessions[0]._rbuf)  # its receive buffer: nothing reserved for the frame
        writer.close()
        await server.close()
        return received, refused_within, buffered

    with dask.config.set({"tdask.wire.max-frame": "1MiB"}), wire_warnings() as warnings:
        received, refused_within, buffered = asyncio.run(main())
    assert len(received) == 1 and len(received[0]["blob"]) > 2**20 - 100
    assert refused_within < 1.0 and buffered == 64 * 1024
    assert any(f"frame of {2**20 + 1} bytes" in w and "127.0.0.1:" in w for w in warnings), warnings


def test_send_refuses_a_message_above_max_frame_and_splits_a_batch_that_is():
    async def main():
        server, address, frames, lengths = await frame_reader_server()
        session = await open_session(address, "tester", lambda message: None, timeout=5)
        with pytest.raises(MessageTooLargeError, match="tdask.wire.max-frame"):
            session.send({"op": "big", "blob": bytes(70_000)})
        with pytest.raises(TypeError):
            session.send({"op": "odd", "value": object()})
        assert not session.closed.is_set() and session.queued_bytes == 0
        sent = [{"op": "part", "i": i, "blob": bytes(10_000)} for i in range(50)]  # 500 kB in one iteration
        for message in sent:
            session.send(message)
        session.send({"op": "last", "i": 50, "blob": bytes(65_536 - 30)})  # alone in its frame, just
        await asyncio.sleep(0.3)
        await session.close()
        server.close()
        return frames, lengths

    with dask.config.set({"tdask.wire.max-frame": "64KiB"}):
        frames, lengths = asyncio.run(main())
    assert max(lengths) <= 65_536 and len(frames) >= 1 + 500_000 // 65_536
    assert [m["i"] for f in frames[1:] for m in f] == list(range(51))


def test_a_payload_leaves_uncopied_in_a_frame_of_its_own_and_in_order():
    """send_with_payload: each payload leaves as a frame of its own (the message, then the raw
    bytes), in order with plain messages, which still share frames; its size is checked against
    max-frame as send's is."""
    import numpy as np

    async def main():
        server, address, frames, lengths = await frame_reader_server()
        session = await open_session(address, "tester", lambda message: None, timeout=5)
        arrays = [np.arange(n, dtype=np.int64) for n in (0, 1, 3000, 7000)]  # up to 56 KB each
        for i, array in enumerate(arrays):
            session.send({"op": "plain", "i": 2 * i})
            session.send_with_payload({"op": "with", "i": 2 * i + 1, "shape": [array.size]}, "bytes", array.data)
        with pytest.raises(MessageTooLargeError, match="tdask.wire.max-frame"):
            session.send_with_payload({"op": "big"}, "bytes", memoryview(bytes(70_000)))
        session.send({"op": "last", "i": 8})
        session.send({"op": "last", "i": 9})
        await asyncio.sleep(0.3)
        await session.close()
        server.close()
        return frames, lengths, arrays

    with dask.config.set({"tdask.wire.max-frame": "64KiB"}):
        frames, lengths, arrays = asyncio.run(main())
    messages = [m for f in frames[1:] for m in f]
    assert [m["i"] for m in messages] == list(range(10)) and max(lengths) <= 65_536
    with_payload = [f for f in frames[1:] if f[0]["op"] == "with"]
    assert len(with_payload) == 4 and all(len(f) == 1 for f in with_payload)  # a frame each
    assert [m["op"] for m in frames[-1]] == ["last", "last"]  # plain messages still share a frame
    for i, array in enumerate(arrays):
        got = messages[2 * i + 1]
        assert got["op"] == "with" and got["shape"] == [array.size]
        assert np.array_equal(np.frombuffer(got["bytes"], dtype=np.int64), array)


def test_a_payload_is_read_straight_into_a_buffer_of_its_own():
    """The receiver's field is a memoryview of a fresh, writable numpy buffer holding exactly the
    payload (not a slice of the session's receive buffer, not a copy out of msgpack), whether the
    payload arrived with its header or after it, split anywhere."""

    async def main():
        rng = random.Random(11)
        payloads = [rng.randbytes(n) for n in (0, 1, 5000, 70_000, 3_000_000)]
        stream = b""
        for i, data in enumerate(payloads):
            stream += frame([{"op": "plain", "i": i}]) + payload_frame({"op": "with", "i": i}, "bytes", data)
        got, session = feed_in_pieces(stream, rng, [1, 3, 7, 100, 4096, 20000, 300_000, 2_000_000])
        return payloads, got, len(session._rbuf)

    payloads, got, room = asyncio.run(main())
    assert [(m["op"], m["i"]) for m in got] == [(op, i) for i in range(len(payloads)) for op in ("plain", "with")]
    for data, message in zip(payloads, got[1::2], strict=True):
        view = message["bytes"]
        assert isinstance(view, memoryview) and isinstance(view.obj, np.ndarray) and view.obj.base is None
        assert not view.readonly and len(view) == len(data) and bytes(view) == data
        assert "payload" not in message
    assert room == 64 * 1024  # the session's own buffer never grew for a payload


@pytest.mark.parametrize(
    "bad, ops",
    [
        (payload_frame({"op": "empty"}, "bytes", b""), ["empty", "after"]),  # the control: an empty payload is fine
        (payload_frame({"op": "x"}, "bytes", b"")[:4] + struct.pack("<Q", 100_000_000) + _X_PAYLOAD, []),  # too large
        (payload_frame({"op": "x"}, "bytes", b"abc").replace(b"payload", b"pay_oad"), []),  # names no payload
        (struct.pack("<IQ", 3 | 0x80000000, 1) + b"\xc1\xc1\xc1" + b"x", []),  # not msgpack
        (payload_frame({"op": 5}, "bytes", b"abc"), []),  # a message whose op is not a str
    ],
    ids=["control", "too-large", "no-payload-key", "not-msgpack", "bad-op"],
)
def test_a_bad_payload_frame_closes_the_connection(bad, ops):
    """A payload frame above the limit (refused before its payload is read), without a payload
    key, not msgpack, or holding a malformed message closes the connection."""

    async def main():
        server, sessions, received = await recording_server()
        reader, writer = await raw_connect(server.address, frame([HELLO]) + bad + frame([{"op": "after"}]))
        closed = await hung_up(reader, 1.0)
        writer.close()
        await server.close()
        return [m["op"] for m in received], closed

    got, closed = asyncio.run(main())
    assert got == ops
    assert closed == (not ops)


def test_a_payload_frame_before_hello_is_refused():
    async def main():
        server, sessions, received = await recording_server()
        reader, writer = await raw_connect(server.address, payload_frame({"op": "hello"}, "x", bytes(70_000)))
        closed = await hung_up(reader, 2.0)
        writer.close()
        await server.close()
        return closed, received

    closed, received = asyncio.run(main())
    assert closed and received == []


# -- backpressure --------------------------------------------------------------------------


def test_a_peer_that_stops_reading_pauses_the_session_then_is_cut_off():
    """A raw peer says hello and does not read: the worker's side queues at most
    tdask.wire.max-buffer, drain() blocks until the peer reads again, and when the peer stops
    for good and the queue passes the cap, the session is aborted (a lost peer)."""
    message_size = 256 * 1024

    async def main():
        server, sessions, _ = await recording_server()
        reader, writer = await raw_connect(server.address, frame([HELLO]))
        while not sessions:
            await asyncio.sleep(0.01)
        (session,) = sessions
        blob = bytes(message_size)
        peak = 0

        def send() -> None:
            nonlocal peak
            session.send({"op": "data", "blob": blob})
            peak = max(peak, session.queued_bytes + session._transport.get_write_buffer_size())

        # 1. Until the kernel's buffers and the transport's are full: writing pauses.
        sent = 0
        while not session._paused:
            send()
            sent += 1
            await asyncio.sleep(0)
        drain = asyncio.create_task(session.drain())
        await asyncio.sleep(0.3)
        blocked = not drain.done()
        # 2. The peer reads again: the session resumes, drain() returns.
        read = 0
        while not drain.done():
            read += len(await asyncio.wait_for(reader.read(2**20), 5))
        # 3. The peer stops for good; a writer that does not drain fills the queue to the cap.
        closed_by = None
        for _ in range(10_000):
            try:
                send()
            except CommClosedError as exc:
                closed_by = exc
                break
            sent += 1
            await asyncio.sleep(0)
        hung = await hung_up(reader, 5)
        writer.close()
        await server.close()
        return blocked, read, sent, peak, closed_by, session.closed.is_set(), hung

    with dask.config.set({"tdask.wire.max-buffer": "4MiB", "tdask.wire.max-frame": "1MiB"}):
        with wire_warnings() as warnings:
            blocked, read, sent, peak, closed_by, closed, hung = asyncio.run(main())
    assert blocked and read > 0
    assert closed_by is not None and closed and hung
    # What the session held: at most max-buffer and the message that overflowed it, plus the
    # transport's own buffer (its high-water mark and one frame).
    assert peak <= 4 * 2**20 + message_size + 256 * 1024 + 2**20, peak
    assert sent * message_size < 64 * 2**20  # bounded, not "as much as the sender produces"
    assert any("not reading" in w and "127.0.0.1:" in w for w in warnings), warnings


# -- messages validated ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "kept"),
    [
        (frame({"op": "x"}), 0),  # a frame that is not a list
        (frame([["x"]]), 0),  # a message that is not a dict
        (frame([{"op": 1}]), 0),  # an op that is not a str
        (frame([{"no": "op"}]), 0),  # no op
        (struct.pack("<I", 1) + b"\xc1", 0),  # not msgpack at all
        (frame([{"op": "fine"}, 5]), 1),  # the good ones before it are delivered
    ],
)
def test_a_bad_message_closes_the_connection_with_a_warning_naming_the_peer(bad, kept):
    async def main():
        server, sessions, received = await recording_server()
        reader, writer = await raw_connect(server.address, frame([HELLO]) + frame([{"op": "first"}]) + bad)
        local = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
        await hung_up(reader, 5)
        writer.close()
        open_sessions = len(server._sessions)
        await server.close()
        return received, local, open_sessions

    with wire_warnings() as warnings:
        received, local, open_sessions = asyncio.run(main())
    assert [m["op"] for m in received] == ["first"] + ["fine"] * kept
    assert open_sessions == 0
    assert len(warnings) == 1 and local in warnings[0] and "raw peer" in warnings[0], warnings


# -- TCP keepalive and user timeout ----------------------------------------------------------


def tcp_options(sock: socket.socket) -> tuple[int, ...]:
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE)]
    options += [(socket.IPPROTO_TCP, o) for o in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)]
    options += [(socket.IPPROTO_TCP, 18)]  # TCP_USER_TIMEOUT
    return tuple(sock.getsockopt(level, option) for level, option in options)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_USER_TIMEOUT is Linux's")
def test_both_ends_have_dasks_tcp_keepalive_and_user_timeout():
    from distributed.comm import connect, listen

    async def main():
        server, sessions, _ = await recording_server()
        session = await open_session(server.address, "tester", lambda message: None, timeout=5)
        while not sessions:
            await asyncio.sleep(0.01)
        ours = [tcp_options(s._transport.get_extra_info("socket")) for s in (session, sessions[0])]
        # Dask's own comm, for comparison: the same options on both ends.
        accepted = []
        listener = listen("tcp://127.0.0.1:0", lambda comm: accepted.append(comm))
        await listener.start()
        comm = await connect(listener.contact_address)
        theirs = tcp_options(comm.stream.socket)
        await comm.close()
        listener.stop()
        await session.close()
        await server.close()
        return ours, theirs

    with dask.config.set({"distributed.comm.timeouts.tcp": "30s"}):
        ours, theirs = asyncio.run(main())
    assert theirs == (1, 10, 2, 10, 30_000)  # SO_KEEPALIVE, idle, interval, probes, user timeout (ms)
    assert ours == [theirs, theirs]


VANISHING_PEER = r"""
import asyncio, json, subprocess, sys, time
import dask
from tdask.transport.wire import open_session
from tdask.transport.wire_server import WireServer

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


async def main():
    served = []

    def accept(session, requester):
        served.append(session)
        return lambda message: session.send({"op": "pong"})

    server = WireServer(accept)
    await server.start("127.0.0.1")
    answered = asyncio.Event()
    caller = await open_session(server.address, "caller", lambda message: answered.set(), timeout=5)
    caller.send({"op": "ping"})
    await asyncio.wait_for(answered.wait(), 5)
    # From now on every packet is silently dropped: no RST, no FIN, as when a host vanishes.
    subprocess.run(["iptables", "-A", "INPUT", "-p", "tcp", "-j", "DROP"], check=True)
    start = time.monotonic()
    caller.send({"op": "ping", "blob": b"x" * 1000})  # outstanding, never acknowledged
    closed = {}

    async def watch(name, session):
        await session.closed.wait()
        closed[name] = round(time.monotonic() - start, 2)

    await asyncio.wait_for(asyncio.gather(watch("caller", caller), watch("worker", served[0])), 90)
    print(json.dumps(closed))


with dask.config.set({"distributed.comm.timeouts.tcp": sys.argv[1]}):
    asyncio.run(main())
"""


@pytest.mark.cluster
def test_a_peer_that_vanishes_silently_is_noticed_within_the_tcp_timeout():
    """Both ends of a session notice, within distributed.comm.timeouts.tcp, a peer whose packets
    are all dropped (in a network namespace of this test's own, on its own 127.0.0.1) while
    the caller has data outstanding: the caller through TCP_USER_TIMEOUT, the worker through
    keepalive. Without them the caller would retransmit for ~15 minutes and the worker would
    wait forever. 11 s is the lowest timeout Dask's set_tcp_timeout accepts (10 probes + 1)."""
    missing = [tool for tool in ("unshare", "ip", "iptables") if shutil.which(tool) is None]
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or missing:
        pytest.skip(f"needs Linux, root and unshare/ip/iptables (missing: {missing or 'root'})")
    probe = subprocess.run(["unshare", "--net", "iptables", "-L", "-n"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace with iptables here: {probe.stderr.strip()[:300]}")
    timeout = 11
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", VANISHING_PEER, f"{timeout}s"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    closed = json.loads(result.stdout.strip().splitlines()[-1])
    assert timeout - 3 < closed["caller"] < timeout + 4, closed
    assert timeout - 3 < closed["worker"] < timeout + 4, closed


# -- TLS -----------------------------------------------------------------------------------


def temporary_security():
    pytest.importorskip("cryptography", reason="Security.temporary() generates its certificates with cryptography")
    from distributed.security import Security

    return Security.temporary()


def test_tls_wire_serves_its_clusters_peers_and_refuses_others():
    """With the cluster's TLS contexts the wire carries messages; a plain-TCP peer, and a TLS
    peer whose certificate is from another CA, are refused without a session."""
    security, stranger = temporary_security(), temporary_security()

    async def main():
        server, requesters = await echo_server(security.get_listen_args("worker")["ssl_context"])
        got: list[dict] = []
        session = await open_session(
            server.address,
            "tls caller",
            got.append,
            timeout=5,
            ssl_context=security.get_connection_args("client")["ssl_context"],
        )
        session.send({"op": "ping"})
        while not got:
            await asyncio.sleep(0.01)
        encrypted = session._transport.get_extra_info("ssl_object") is not None
        keepalive = tcp_options(session._transport.get_extra_info("socket"))[0]
        # A peer that speaks the wire in the clear.
        reader, writer = await raw_connect(server.address, frame([HELLO]))
        plain_refused = await hung_up(reader, 5)
        writer.close()
        # A peer that connects and says nothing: the handshake is bounded by the hello deadline,
        # and its session, never made, is forgotten all the same.
        reader, writer = await raw_connect(server.address)
        start = time.monotonic()
        silent_closed = await hung_up(reader, 5) and time.monotonic() - start
        writer.close()
        # A TLS peer of another cluster.
        try:
            other = await open_session(
                server.address,
                "stranger",
                lambda message: None,
                timeout=5,
                ssl_context=stranger.get_connection_args("client")["ssl_context"],
            )
        except OSError:  # ssl.SSLError among them
            pass  # refused in the handshake
        else:  # TLS 1.3: the server's refusal arrives once the client thinks it is done
            await asyncio.wait_for(other.read_forever(), 5)
        # The server never tells a session whose handshake failed: it is forgotten at its deadline.
        for _ in range(300):
            if len(server._sessions) == 1:
                break
            await asyncio.sleep(0.01)
        sessions_left = len(server._sessions)
        await session.close()
        await server.close()
        return got, encrypted, keepalive, plain_refused, silent_closed, sessions_left, requesters

    with dask.config.set({"tdask.wire.hello-timeout": "0.5s"}):
        got, encrypted, keepalive, plain_refused, silent_closed, sessions_left, requesters = asyncio.run(main())
    assert got[0]["echo"] == {"op": "ping"} and encrypted and keepalive == 1
    assert plain_refused and 0.4 < silent_closed < 3, silent_closed
    assert sessions_left == 1 and requesters == ["tls caller"]


def caller_sessions(dep: Deployment) -> list[str]:
    plane = dep.client.extensions["tdask"].plane
    return sorted(type(s).__name__ for s in plane._workers.values())


@pytest.mark.cluster
def test_tls_deployment_serves_over_the_wire():
    """A tls:// cluster's direct sessions are wire sessions over TLS (the caller's own Dask
    context); a request too large for one wire frame is an InvalidRequestError that leaves
    the session and the plane as they were."""
    security = temporary_security()
    operators = [OperatorConfig(name="identity", implementation=Identity)]
    small_frames = dask.config.set({"tdask.wire.max-frame": "64KiB"})  # read as a session opens
    with small_frames, Deployment(operators, protocol="tls", security=security, dashboard_address=None) as dep:
        (wire,) = dep.client.run(
            lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].direct.listener.wire_address()
        ).values()
        assert wire is not None and wire.startswith("127.0.0.1:")
        identity = RemoteOperator("identity", client=dep.client)
        assert identity.infer(inputs={"x": np.arange(4)}).outputs["x"].tolist() == [0, 1, 2, 3]
        assert caller_sessions(dep) == ["WireSession"]
        plane = dep.client.extensions["tdask"].plane
        (session,) = plane._workers.values()
        assert session._transport.get_extra_info("ssl_object") is not None
        many = {f"x{i}": np.arange(1000) for i in range(10)}  # 80 kB inline: not one frame
        with pytest.raises(InvalidRequestError, match="max-frame"):
            identity.infer(inputs=many)
        assert identity.infer(inputs={"x": np.arange(2)}).outputs["x"].tolist() == [0, 1]
        (after,) = plane._workers.values()
        assert after is session and not plane._streams and not plane._outstanding
        assert all(load == 0 for load in plane._load.values())
    assert_no_children()


# -- uvloop ----------------------------------------------------------------------------------


@pytest.mark.cluster
def test_wire_under_uvloop():
    """uvloop's transports are not asyncio.Transport: the wire works there too, in-process
    (frames, keepalive, backpressure), and in a Deployment, whose workers run on uvloop by
    default (tdask.worker.event-loop: auto) and on asyncio when asked to."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")

    async def main():
        server, requesters = await echo_server()
        got: list[dict] = []
        session = await open_session(server.address, "tester", got.append, timeout=5)
        for i in range(100):
            session.send({"op": "x", "i": i, "blob": bytes(100_000 if i % 10 == 0 else 10)})
        while len(got) < 100:
            await asyncio.sleep(0.01)
        keepalive = tcp_options(session._transport.get_extra_info("socket"))
        await session.close()
        await server.close()
        return type(asyncio.get_running_loop()).__module__, [m["echo"]["i"] for m in got], keepalive

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop_module, order, keepalive = runner.run(main())
    assert loop_module.startswith("uvloop") and order == list(range(100))
    assert keepalive[0] == 1 and keepalive[-1] == 30_000

    def loop_of_worker(dask_worker):
        loop = type(asyncio.get_running_loop()).__module__
        malloc = (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_"))
        return loop, dask_worker.plugins[PLUGIN_NAME].direct.listener.wire_address(), dask_worker._tick_interval, malloc

    operators = [OperatorConfig(name="identity", implementation=Identity)]
    # Also Dask's tick (100 ms in the processes a Deployment starts, unless the user set one) and
    # the workers' malloc settings (tdask.worker.malloc; {} keeps Dask's).
    cases = (
        ("auto", "uvloop", "20ms", 0.1, None, ("67108864", "16777216")),
        ("asyncio", "asyncio", "50ms", 0.05, {}, ("65536", None)),
    )
    for choice, expected, tick, tick_s, malloc, worker_malloc in cases:
        # A Nanny writes its pre-spawn environment into this process's (earlier tests' nannies
        # too), where it would outrank the next deployment's config: clear it for each case.
        for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
            os.environ.pop(key, None)
        config = {"tdask.worker.event-loop": choice, "distributed.admin.tick.interval": tick}
        if malloc is not None:
            config["tdask.worker.malloc"] = malloc
        with dask.config.set(config):
            with Deployment(operators, dashboard_address=None) as dep:
                ((worker_loop, wire, worker_tick, got_malloc),) = dep.client.run(loop_of_worker).values()
                assert worker_loop.startswith(expected) and wire is not None, (choice, worker_loop)
                assert worker_tick == tick_s and dep.cluster.scheduler._tick_interval == tick_s
                assert got_malloc == worker_malloc
                response = RemoteOperator("identity", client=dep.client).infer(inputs={"x": np.arange(3)})
                assert response.outputs["x"].tolist() == [0, 1, 2]
                assert caller_sessions(dep) == ["WireSession"]
    assert_no_children()


# -- one contract for both transports --------------------------------------------------------


def test_wire_and_dask_comm_sessions_have_one_surface():
    from tdask.transport import Transport
    from tdask.transport.dask_comm import Session

    for name in ("send", "send_with_payload", "drain", "read_forever", "close", "abort"):
        contract = getattr(Transport, name)
        for cls in (Session, WireSession):
            method = getattr(cls, name)
            assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(contract), (cls, name)
            assert list(inspect.signature(method).parameters) == list(inspect.signature(contract).parameters)
    # The data plane's shortcut rides the wire only: Dask's comm moves tensors with Dask's serialization.
    assert WireSession.carries_data is True and Session.carries_data is False

    async def main():
        server, _ = await echo_server()
        session = await open_session(server.address, "tester", lambda message: None, timeout=5)
        surface = (session.name, session.closed)
        await session.drain()  # not paused: returns at once
        session.abort()
        await asyncio.wait_for(session.read_forever(), 5)
        await session.drain()  # closed: returns at once
        with pytest.raises(CommClosedError):
            session.send({"op": "late"})
        await server.close()
        return surface

    name, closed = asyncio.run(main())
    assert name.startswith("to 127.0.0.1:") and isinstance(closed, asyncio.Event)


# -- the worker's side: lifecycle and fallback -------------------------------------------------


def test_closing_the_server_closes_its_sessions():
    from tests.conftest import async_wait_for

    async def main():
        server, _ = await echo_server()
        echoes: list[dict] = []
        session = await open_session(server.address, "tester", echoes.append, timeout=5)
        session.send({"op": "ping"})
        await async_wait_for(lambda: echoes, message="the server never echoed the ping")  # the session is live
        await server.close()
        await asyncio.wait_for(session.read_forever(), 10)
        with pytest.raises(Exception, match="closed"):
            session.send({"op": "ping"})

    asyncio.run(main())


@pytest.mark.cluster
def test_unreachable_wire_falls_back_to_dask_comm():
    """A worker whose wire cannot be reached (here: its listener closed, as a firewall would make
    it) is still served, over Dask's comm; with the wire port taken, a worker starts without one."""

    def close_wire(dask_worker):
        plugin = dask_worker.plugins[PLUGIN_NAME]
        plugin.direct.listener.wire._server.close()  # the address stays advertised: callers dial it and fail
        return plugin.direct.listener.wire.address

    def transports(dask_worker):
        plugin = dask_worker.plugins[PLUGIN_NAME]
        return plugin.direct.listener.wire_address(), sorted({type(s).__name__ for s in plugin.direct.sessions})

    operators = [OperatorConfig(name="identity", implementation=Identity)]
    with Deployment(operators, dashboard_address=None) as dep:
        (address,) = dep.client.run(close_wire).values()
        response = RemoteOperator("identity", client=dep.client).infer(inputs={"x": np.arange(4)})
        assert response.outputs["x"].tolist() == [0, 1, 2, 3]
        (found,) = dep.client.run(transports).values()
        assert found == (address, ["Session"]), found

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with dask.config.set({"tdask.worker.wire-port": taken.getsockname()[1]}):
            with Deployment(operators, dashboard_address=None) as dep:
                response = RemoteOperator("identity", client=dep.client).infer(inputs={"x": np.arange(2)})
                assert response.outputs["x"].tolist() == [0, 1]
                (found,) = dep.client.run(transports).values()
                assert found == (None, ["Session"]), found
    finally:
        taken.close()
    assert_no_children()


# -- backpressure on a real worker -------------------------------------------------------------

STALLED = "stalled caller"


def _worker_state(dask_worker) -> dict:
    """The worker's side of the stalled caller's wire session, and its one operator's slots."""
    plugin = dask_worker.plugins[PLUGIN_NAME]
    (hosted,) = plugin.serving.hosted.values()
    state = {"sessions": 0, "inflight": hosted.inflight, "waiting": len(hosted.waiting)}
    for session, requester in plugin.direct.sessions.items():
        if requester == STALLED:
            transport = session._transport
            state["sessions"] += 1
            state["paused"] = session._paused
            state["closed"] = session.closed.is_set()
            # What the worker holds for this caller: the session's queue and the transport's buffer.
            state["held"] = session.queued_bytes + (transport.get_write_buffer_size() if transport else 0)
            state["max_buffer"] = session._max_buffer
    return state


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[int, bool]:
    """Read what the worker sends until it closes the connection: (final replies, closed)."""
    sock.settimeout(timeout)
    buffer = bytearray()
    finals = 0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return finals, False
        except ConnectionResetError:
            return finals, True
        if not chunk:
            return finals, True
        buffer += chunk
        while len(buffer) >= 4:
            (size,) = struct.unpack_from("<I", buffer)
            if len(buffer) < 4 + size:
                break
            messages = msgpack.unpackb(bytes(buffer[4 : 4 + size]), raw=False)
            del buffer[: 4 + size]
            finals += sum(1 for m in messages for r in m.get("replies", []) if r["final"])


def _kernel_cuts_zero_windows() -> bool:
    """Linux >= 5.11: TCP_USER_TIMEOUT also ends a connection whose peer keeps a zero window."""
    if not sys.platform.startswith("linux"):
        return False
    numbers = [int(x) for x in os.uname().release.split("-")[0].split(".")[:2] if x.isdigit()]
    return tuple(numbers) >= (5, 11)


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.skipif(not _kernel_cuts_zero_windows(), reason="needs Linux >= 5.11 (user timeout on zero windows)")
def test_a_caller_that_stops_reading_its_answers_slows_the_worker_down_within_bounds():
    """A raw wire caller submits 200 requests whose answers are 60 KiB each (inline) and never
    reads. The worker's answers wait in ``drain()`` (tdask/request_plane/direct.py,
    DirectServer.answer) instead of queueing: what it holds for that caller stays under the
    transport's high-water mark plus one answer per slot, far below tdask.wire.max-buffer, and
    the caller is not cut off for it. The stalled answers hold the operator's slots, but only
    until the kernel's TCP user timeout (distributed.comm.timeouts.tcp, docs/design.md "Dead
    peers") ends the zero-window connection: then the worker cancels that caller's requests,
    frees every slot, and a normal caller of the same operator is served."""
    from tdask import protocol
    from tests.operators import Producer

    values, count, slots = 7680, 200, 4  # 60 KiB of float64 per answer: inline (threshold 64 KiB)
    answer = values * 8
    operators = [OperatorConfig(name="producer", implementation=Producer, max_inflight_requests=slots)]
    config = {
        "tdask.wire.max-buffer": "1MiB",
        "tdask.wire.max-frame": "256KiB",
        "distributed.comm.timeouts.tcp": "11s",  # the lowest Dask accepts: the bound on a stall
    }
    with dask.config.set(config), Deployment(operators, dashboard_address=None) as dep:
        (wire,) = dep.client.run(
            lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].direct.listener.wire_address()
        ).values()
        host, port = wire.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # a small window, filled at once
        sock.connect((host, int(port)))
        try:
            began = time.monotonic()
            sock.sendall(frame([protocol.hello(STALLED, WIRE_VERSION)]))
            for first in range(0, count, 20):
                request = {"operator": "producer/1", "inputs": {}, "parameters": {"n": values}}
                sock.sendall(frame([protocol.submit({**request, "id": f"r{i}"}) for i in range(first, first + 20)]))
            # 1. The caller reads nothing for 3 s: the worker stops writing and waits. (From the
            # moment the worker has taken the session: on a loaded machine that is not at once.)
            wait_for(lambda: dep.client.run(_worker_state).popitem()[1]["sessions"] == 1, timeout=10)
            states = []
            while time.monotonic() - began < 3:
                (state,) = dep.client.run(_worker_state).values()
                states.append(state)
                time.sleep(0.1)
            for state in states:
                assert state["sessions"] == 1 and not state["closed"], states  # not cut off
                # The transport's high-water mark (256 KiB) and the answers of the slots released at once.
                assert state["held"] <= 256 * 1024 + slots * (answer + 1024), state
                assert state["held"] < state["max_buffer"] == 2**20, state
            last = states[-1]
            assert last["paused"] and last["inflight"] == slots and last["waiting"] > 0, last

            # 2. A normal caller of the same operator: served once the kernel gives up the stalled one.
            response = RemoteOperator("producer", client=dep.client).infer(parameters={"n": 3}, timeout=60)
            assert response.outputs["data"].tolist() == [0.0, 1.0, 2.0]
            assert time.monotonic() - began < 11 + 15, "served well within the TCP user timeout"
            (state,) = dep.client.run(_worker_state).values()
            assert state == {"sessions": 0, "inflight": 0, "waiting": 0}, state  # every slot freed

            # 3. The stalled caller was cut off, having got at most what the kernel buffered.
            finals, closed = _read_until_closed(sock, 10)
            assert closed and finals < count, (finals, closed)
        finally:
            sock.close()
    assert_no_children()


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_a_request_cancelled_in_the_frame_that_submits_it_frees_its_slot():
    """A caller's submit and its cancel arriving in one frame: the request never runs, and the
    operator's one slot is free again for the next caller."""
    from tdask import protocol
    from tests.operators import Producer

    operators = [OperatorConfig(name="producer", implementation=Producer, max_inflight_requests=1)]
    with Deployment(operators, dashboard_address=None) as dep:
        (wire,) = dep.client.run(
            lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].direct.listener.wire_address()
        ).values()
        host, port = wire.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            request = {"id": "r0", "operator": "producer/1", "inputs": {}, "parameters": {"n": 3}}
            sock.sendall(frame([protocol.hello("quick canceller", WIRE_VERSION)]))
            sock.sendall(frame([protocol.submit(request), protocol.cancel(["r0"])]))
            response = RemoteOperator("producer", client=dep.client).infer(parameters={"n": 3}, timeout=5)
            assert response.outputs["data"].tolist() == [0.0, 1.0, 2.0]
    assert_no_children()


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_a_caller_whose_worker_stops_reading_waits_instead_of_queueing():
    """The other direction (tdask/request_plane/direct.py, DirectPlane._send_direct): the worker
    process is stopped (SIGSTOP) while a client keeps submitting 480 KiB requests (inline) to it.
    The client's submits wait in ``drain()``: what its session holds stays under the transport's
    high-water mark plus a message or two, below tdask.wire.max-buffer, and the session is not
    cut off; once the worker runs again, every request is answered, right, on that same session."""
    from tests.conftest import run_async

    tensors = {f"x{i}": np.full(7680, i, dtype=np.float64) for i in range(8)}  # 8 x 60 KiB, each inline
    size = sum(t.nbytes for t in tensors.values())
    count = 40  # 19 MB: far more than the kernel's socket buffers and max-buffer together
    operators = [OperatorConfig(name="identity", implementation=Identity)]
    config = {"tdask.wire.max-buffer": "2MiB", "tdask.wire.max-frame": "1MiB"}  # read as a session opens
    with dask.config.set(config), Deployment(operators, dashboard_address=None) as dep:
        (pid,) = dep.client.run(os.getpid).values()

        async def main(client):
            identity = RemoteOperator("identity", client=client)
            await identity.infer(inputs={"x": np.arange(3)})  # the session to the worker, on the wire
            plane = client.extensions["tdask"].plane
            (session,) = plane._workers.values()
            assert type(session).__name__ == "WireSession"
            held = []
            os.kill(pid, signal.SIGSTOP)
            try:
                calls = []
                for _ in range(count):  # one at a time: each either sends at once or waits in drain()
                    calls.append(asyncio.ensure_future(identity.infer(inputs=tensors, timeout=60)))
                    await asyncio.sleep(0.02)
                    held.append(session.queued_bytes + session._transport.get_write_buffer_size())
                    assert not session.closed.is_set(), "cut off while its submits could wait"
                paused = session._paused
            finally:
                os.kill(pid, signal.SIGCONT)
            responses = await asyncio.gather(*calls)
            same_session = list(plane._workers.values()) == [session] and not session.closed.is_set()
            return held, paused, responses, same_session

        held, paused, responses, same_session = run_async(dep.scheduler_address, main, timeout=90)
    assert paused, "the stopped worker's socket buffers never filled"
    assert max(held) <= 256 * 1024 + 2 * size + 4096, held
    assert max(held) < 2 * 2**20, held
    assert len(responses) == count
    for response in responses:
        assert all(np.array_equal(response.outputs[k], v) for k, v in tensors.items())
    assert same_session, "the session was replaced or closed"
    assert_no_children()
