"""tdask's wire (tdask/wire.py): framing, handshake and fallback, on real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import dask
import msgpack
import numpy as np
import pytest

from tdask import Deployment, OperatorConfig, RemoteOperator
from tdask.request_plane.wire import WireServer, WireSession, open_session
from tests.conftest import assert_no_children
from tests.operators import Identity

pytestmark = pytest.mark.timeout(120)


def frame(messages: object) -> bytes:
    """One frame as a peer would write it (a list of message dicts, unless testing otherwise)."""
    payload = msgpack.packb(messages, use_bin_type=True)
    return struct.pack("<I", len(payload)) + payload


async def echo_server() -> tuple[WireServer, list[str]]:
    """A wire server that answers every message with itself, numbered per session."""
    requesters: list[str] = []

    def accept(session: WireSession, requester: str):
        requesters.append(requester)
        return lambda message: session.send({"echo": message})

    server = WireServer(accept)
    await server.start("127.0.0.1")
    return server, requesters


def test_messages_go_both_ways_in_order_whatever_their_size():
    async def main():
        server, requesters = await echo_server()
        received: list[dict] = []
        done = asyncio.Event()
        sent = [{"i": i, "blob": bytes(2**20) if i % 100 == 7 else b"x"} for i in range(500)]

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


def test_frames_split_anywhere_are_reassembled():
    async def main():
        rng = random.Random(7)
        messages = [{"i": i, "data": bytes(rng.randrange(0, 3000))} for i in range(200)]
        stream = b"".join(frame(messages[i : i + 3]) for i in range(0, len(messages), 3))
        got: list[dict] = []
        session = WireSession("test", got.append)
        position = 0
        while position < len(stream):
            step = rng.choice([1, 2, 3, 5, 100, 4096, 20000])
            session.data_received(stream[position : position + step])
            position += step
        return messages, got

    messages, got = asyncio.run(main())
    assert [dict(m) for m in got] == messages


@pytest.mark.parametrize(
    "opening",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # someone else's protocol: a 1 GB "frame"
        struct.pack("<I", 2**31) + b"x" * 16,  # a huge first frame is refused before it is read
        frame([{"op": "submit", "request": {}}]),  # no hello first
        frame([{"op": "hello", "wire": 999, "requester": "future"}]),  # another wire version
        frame([["hello"]]),  # a message that is not a dict
        frame({"op": "hello", "wire": 1, "requester": "x"}),  # a frame that is not a list
    ],
)
def test_a_peer_that_does_not_say_hello_is_dropped(opening):
    async def main():
        server, requesters = await echo_server()
        host, port = server.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(opening)
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 10)  # EOF: the server hung up
        writer.close()
        await server.close()
        return closed, requesters

    closed, requesters = asyncio.run(main())
    assert closed == b"" and requesters == []


def test_closing_the_server_closes_its_sessions():
    from tests.conftest import async_wait_for

    async def main():
        server, _ = await echo_server()
        echoes: list[dict] = []
        session = await open_session(server.address, "tester", echoes.append, timeout=5)
        session.send({"ping": 1})
        await async_wait_for(lambda: echoes, message="the server never echoed the ping")  # the session is live
        await server.close()
        await asyncio.wait_for(session.read_forever(), 10)
        with pytest.raises(Exception, match="closed"):
            session.send({"ping": 2})

    asyncio.run(main())


def test_unreachable_wire_falls_back_to_dask_comm():
    """A worker whose wire cannot be reached (here: its listener closed, as a firewall would make
    it) is still served, over Dask's comm; with the wire port taken, a worker starts without one."""
    from tdask.host import PLUGIN_NAME

    def close_wire(dask_worker):
        plugin = dask_worker.plugins[PLUGIN_NAME]
        plugin.direct.wire._server.close()  # the address stays advertised: callers dial it and fail
        return plugin.direct.wire.address

    def transports(dask_worker):
        plugin = dask_worker.plugins[PLUGIN_NAME]
        return plugin.direct._wire_address(), sorted({type(s).__name__ for s in plugin.direct.sessions})

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
