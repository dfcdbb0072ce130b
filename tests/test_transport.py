"""The one door to a peer (tdask.transport.registry): which transport a session takes, decided there."""

from __future__ import annotations

import asyncio
import logging

import dask.config
import numpy as np
import pytest
from distributed.comm.core import CommClosedError
from distributed.core import Server

from tdask import transport
from tdask.transport import loopback
from tdask.transport.dask_comm import Session
from tdask.transport.loopback import LoopbackSession
from tdask.transport.wire import WireSession


def names(address: str, kind: transport.PeerKind = "worker") -> list[str]:
    return [backend.name for backend in transport.routes(address, kind)]


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_a_tcp_or_tls_worker_is_reached_over_the_wire_then_dasks_comm(scheme):
    assert names(f"{scheme}://127.0.0.1:1234") == ["wire", "dask"]
    assert transport.carries_data(f"{scheme}://127.0.0.1:1234")


@pytest.mark.parametrize("address", ["ucx://127.0.0.1:1234", "inproc://127.0.0.1/1/2"])
def test_other_schemes_take_dasks_comm_alone_and_no_data_shortcut(address):
    assert names(address) == ["dask"]
    assert not transport.carries_data(address)


def test_the_scheduler_is_reached_over_dasks_comm_whatever_its_scheme():
    assert names("tcp://127.0.0.1:8786", "scheduler") == ["dask"]
    assert names("tls://127.0.0.1:8786", "scheduler") == ["dask"]


def test_direct_transport_dask_turns_the_wire_off_everywhere():
    with dask.config.set({"tdask.request.direct-transport": "dask"}):
        assert names("tcp://127.0.0.1:1234") == ["dask"]
        assert not transport.carries_data("tcp://127.0.0.1:1234")
    assert names("tcp://127.0.0.1:1234") == ["wire", "dask"]  # the setting is read at each call


def test_each_backend_says_what_its_sessions_carry():
    assert transport.backends["wire"].carries_data is WireSession.carries_data is True
    assert transport.backends["dask"].carries_data is Session.carries_data is False


# -- in process: a worker of this process and loop (tdask.transport.loopback) ------------------


async def _server() -> Server:
    """A real Dask server on ``inproc://`` (no socket): a Listener uses its address and handlers."""
    server = Server({}, needs_workdir=False)
    await server.listen("inproc://")
    return server


async def _listening(server: Server, received: list) -> transport.Listener:
    def accept(session, hello):
        def on_message(message):
            received.append(message)
            if message["op"] == "ping":
                session.send({"op": "pong", "n": message["n"]})

        return on_message

    listener = transport.Listener(server, "tdask_test", accept)
    await listener.start()
    return listener


def test_a_worker_of_this_process_is_reached_in_process_and_only_while_it_listens():
    async def main():
        server = await _server()
        address = server.address
        assert names(address) == ["dask"]
        received: list = []
        listener = await _listening(server, received)
        assert names(address) == ["loopback", "dask"]
        assert transport.in_process(address) and transport.carries_data(address)
        with dask.config.set({"tdask.request.in-process-calls": False}):
            assert names(address) == ["dask"] and not transport.in_process(address)
        answers: list = []
        session = await transport.connect(address, "tdask_test", answers.append, requester="me")
        assert isinstance(session, LoopbackSession)
        for n in range(3):
            session.send({"op": "ping", "n": n})
        for _ in range(5):
            await asyncio.sleep(0)
        assert [m["n"] for m in received] == [0, 1, 2]
        assert answers == [{"op": "pong", "n": n} for n in range(3)]
        await listener.close()  # its sessions end with it
        assert session.closed.is_set()
        assert names(address) == ["dask"]
        with pytest.raises(CommClosedError):
            session.send({"op": "ping", "n": 9})
        await server.close()

    asyncio.run(main())


def test_a_caller_on_another_event_loop_is_not_taken_in_process():
    """A worker's loop and a caller's loop in one process (a client beside an embedded worker):
    the caller's messages could not be delivered on the worker's loop, so it gets the next backend."""
    worker_loop = asyncio.new_event_loop()
    try:
        server = worker_loop.run_until_complete(_server())
        listener = worker_loop.run_until_complete(_listening(server, []))

        async def call():
            backend = transport.backends["loopback"]
            hello = {"requester": "me"}
            kwargs = {"name": "t", "kind": "worker", "connection_args": {}, "timeout": None, "hello": hello}
            return await backend.connect(server.address, "tdask_test", print, **kwargs)

        assert asyncio.run(call()) is None
        worker_loop.run_until_complete(listener.close())
        worker_loop.run_until_complete(server.close())
    finally:
        worker_loop.close()


def test_in_process_messages_are_what_the_wire_would_deliver():
    """Packed when sent (later changes do not travel), lists as tuples, payloads copied, never
    delivered inside send, in order."""

    async def main():
        got: list = []
        caller, listener = loopback.pair("caller", lambda m: None, "listener")
        listener._on_message = got.append
        message = {"op": "x", "items": [1, 2], "inner": {"k": "v"}}
        caller.send(message)
        message["items"].append(3)
        message["inner"]["k"] = "changed"
        buffer = np.arange(4, dtype=np.uint8)
        caller.send_with_payload({"op": "y"}, "data", memoryview(buffer))
        buffer[:] = 0
        assert got == []  # not inside send
        await asyncio.sleep(0)
        assert got[0] == {"op": "x", "items": (1, 2), "inner": {"k": "v"}}
        assert isinstance(got[1]["data"], memoryview) and bytes(got[1]["data"]) == bytes([0, 1, 2, 3])
        with pytest.raises(TypeError):
            caller.send({"op": "z", "bad": object()})
        assert not caller.closed.is_set()

    asyncio.run(main())


def test_in_process_close_delivers_what_was_sent_and_abort_drops_it():
    async def main():
        got: list = []
        caller, listener = loopback.pair("caller", lambda m: None, "listener")
        listener._on_message = got.append
        caller.send({"op": "a"})
        await caller.close()
        assert got == [{"op": "a"}] and caller.closed.is_set() and listener.closed.is_set()
        with pytest.raises(CommClosedError):
            listener.send({"op": "b"})

        got.clear()
        caller, listener = loopback.pair("caller", lambda m: None, "listener")
        listener._on_message = got.append
        caller.send({"op": "a"})
        listener.abort()
        await asyncio.sleep(0)
        assert got == [] and caller.closed.is_set()
        await asyncio.wait_for(caller.read_forever(), 1)

    asyncio.run(main())


def test_a_message_its_handler_refuses_ends_an_in_process_session_and_other_errors_do_not(caplog):
    async def main():
        def handler(message):
            if message["op"] == "refuse":
                raise transport.ProtocolError("not for me")
            raise RuntimeError("a bug in the handler")

        caller, listener = loopback.pair("caller", lambda m: None, "listener")
        listener._on_message = handler
        caller.send({"op": "bug"})
        await asyncio.sleep(0)
        assert not caller.closed.is_set()  # logged, the session goes on
        caller.send({"op": "refuse"})
        await asyncio.sleep(0)
        assert caller.closed.is_set() and listener.closed.is_set()
        caller2, listener2 = loopback.pair("caller", lambda m: None, "listener")
        listener2._on_message = handler
        # not a message at all (no str op): refused by the shape check, as on the wire
        caller2.send({"no": "op"})
        await asyncio.sleep(0)
        assert caller2.closed.is_set()

    with caplog.at_level(logging.WARNING, logger="tdask"):
        asyncio.run(main())
    assert "a bug in the handler" in caplog.text and "not for me" in caplog.text
