"""tdask.protocol: every message round-trips through msgpack as the transports carry it, and what is
not a message is refused; the tensor codec and the input/output checks."""

from __future__ import annotations

import asyncio
import inspect

import msgpack
import numpy as np
import pytest
from distributed.comm import connect, listen

from tdask import InvalidRequestError, OperatorError, RemoteTensor, protocol
from tdask.exceptions import WorkerLostError
from tdask.protocol import Op, ProtocolError, check_message
from tdask.transport import Transport
from tdask.transport.dask_comm import Session
from tdask.transport.wire import WIRE_VERSION


def _wire_round_trip(message: object) -> object:
    """What a peer receives: packed like the transports pack, unpacked like they unpack."""
    packed = msgpack.packb([message], use_bin_type=True)
    return msgpack.unpackb(packed, raw=False, use_list=False, strict_map_key=False)[0]


REQUEST = protocol.request_msg(
    request_id="r1",
    operator="encoder/1",
    parameters={"a": 1, "b": "x", "c": 0.5, "d": True},
    inputs={"x": protocol.encode_inline(np.arange(4))},
    deadline=1.5e9,
    max_retries=2,
    host_wait_s=10.0,
    rehost_wait_s=60.0,
)
RESPONSE = protocol.response_msg(
    request_id="r1",
    requester="client-1",
    operator="encoder/1",
    worker="tcp://127.0.0.1:1",
    outputs={"y": {"ref": RemoteTensor("tcp://127.0.0.1:1", "t1", "int64", (2, 3), 48).to_msg()}},
    parameters={"k": "v"},
    error=None,
    final=True,
)
# One example of every message, built by its constructor.
MESSAGES = {
    Op.HELLO: protocol.hello("client-1", 1),
    Op.SUBMIT: protocol.submit(REQUEST),
    Op.CANCEL: protocol.cancel(["r1", "r2"]),
    Op.CREDIT: protocol.credit("encoder/1", 3),
    Op.RESPOND: protocol.respond([RESPONSE]),
    Op.STATS: protocol.stats({"encoder/1": {"inflight": 1}}),
    Op.REQUESTS: protocol.requests("encoder/1", [REQUEST]),
    Op.WITHDRAW: protocol.withdraw([["client-1", "r1"]]),
    Op.REQUESTER_LEFT: protocol.requester_left("client-1"),
    Op.REPLIES: protocol.replies([RESPONSE, protocol.error_reply("r2", WorkerLostError("gone"))]),
    Op.REFUSED: protocol.refused("r1"),
    Op.DATA: protocol.data(7, protocol.DataAction.FETCH, tensor_id="t1"),
    Op.DATA_REPLY: protocol.data_reply(7, "OK", tensor=["<i8", [4]], bytes=np.arange(4).tobytes()),
}


def _plain(value: object) -> object:
    """Tuples (as msgpack gives them back) as lists, for comparison."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def test_every_op_has_a_constructor_and_an_example():
    ops = {v for k, v in vars(Op).items() if k.isupper()}
    assert ops == set(MESSAGES) == set(protocol.messages._FIELDS)
    constructors = {name for name, fn in vars(protocol).items() if inspect.isfunction(fn)}
    for op in ops:
        assert op.replace("-", "_") in constructors, f"no constructor for {op!r}"


@pytest.mark.parametrize("op", sorted(MESSAGES))
def test_every_message_round_trips(op):
    message = MESSAGES[op]
    received = _wire_round_trip(message)
    assert check_message(received) == op
    assert _plain(received) == _plain(message)


def test_decoded_tensors_survive_the_round_trip():
    received = _wire_round_trip(protocol.submit(REQUEST))
    inputs = protocol.decode_tensors(received["request"]["inputs"])
    assert inputs["x"].tolist() == [0, 1, 2, 3]
    outputs = protocol.decode_tensors(_wire_round_trip(protocol.respond([RESPONSE]))["responses"][0]["outputs"])
    assert outputs["y"] == RemoteTensor("tcp://127.0.0.1:1", "t1", "int64", (2, 3), 48)


@pytest.mark.parametrize("message", [[1], "x", {"no": "op"}, {"op": 7}])
def test_the_transports_refuse_what_is_not_shaped_as_a_message(message):
    with pytest.raises(ProtocolError):
        protocol.check_shape(message)
    assert protocol.check_shape({"op": "anything"}) == "anything"  # the op's meaning is the planes' concern


@pytest.mark.parametrize(
    ("message", "why"),
    [
        ([1, 2], "must be a dict"),
        ("submit", "must be a dict"),
        ({"no": "op"}, "unknown message op"),
        ({"op": 7}, "unknown message op"),
        ({"op": "launch-missiles"}, "unknown message op"),
        ({"op": "submit"}, "lacks its field 'request'"),
        ({"op": "credit", "operator": "a/1"}, "lacks its field 'n'"),
    ],
)
def test_what_is_not_a_message_is_refused(message, why):
    with pytest.raises(ProtocolError, match=why):
        check_message(_wire_round_trip(message))


@pytest.mark.parametrize(
    "request_",
    [
        "not a dict",
        {"operator": "a/1"},
        {"id": 1, "operator": "a/1"},
        {"id": "r", "operator": "a/1", "inputs": [1]},
        {"id": "r", "operator": "a/1", "parameters": "x"},
        {"id": "r", "operator": "a/1", "deadline": "soon"},
        {"id": "r", "operator": "a/1", "placed": 5},
        {"id": "r", "operator": "a/1", "placed": "abc"},
        {"id": "r", "operator": "a/1", "placed": ["ok", 7]},
    ],
)
def test_malformed_requests_are_refused(request_):
    with pytest.raises(ProtocolError):
        protocol.check_request(request_)


def test_a_request_naming_the_inputs_placed_for_it_is_accepted():
    protocol.check_request({"id": "r", "operator": "a/1", "placed": ["t1", "t2"]})
    protocol.check_request({"id": "r", "operator": "a/1", "placed": ("t1",)})  # msgpack gives tuples


@pytest.mark.parametrize(
    "array",
    [
        np.arange(10, dtype=np.int64),
        np.float32(3.5) * np.ones((2, 3), dtype=np.float32),
        np.array(7, dtype=np.int8),  # 0-d stays 0-d
        np.arange(12).reshape(3, 4)[:, ::2],  # not contiguous
        np.array([b"ab", b"c"]),
        np.array(["é", "xyz"]),
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),  # structured: its field list travels
        np.zeros(2, dtype=[("a", "i4", (2,)), ("b", [("x", "u1"), ("y", "<f4")])]),  # sub-arrays, nested
        np.zeros(3, dtype="V4"),  # raw bytes
        np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[s]"),
    ],
)
def test_tensor_codec_round_trips(array):
    entry = _wire_round_trip(protocol.encode_inline(array))
    decoded = protocol.decode_tensors({"x": entry})["x"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert np.array_equal(decoded, array)
    assert not decoded.flags.writeable  # inputs are read-only


def test_an_array_forwarded_unchanged_reuses_its_wire_form():
    entry = protocol.encode_inline(np.arange(5))
    decoded = protocol.decode_tensors({"x": entry})["x"]
    assert protocol.encode_inline(decoded) is entry
    changed = decoded.copy()
    assert protocol.encode_inline(changed) is not entry


def test_encode_tensors_places_what_is_above_the_threshold():
    placed = []

    async def place(array):
        tensor = RemoteTensor("tcp://127.0.0.1:1", f"t{len(placed)}", str(array.dtype), array.shape, array.nbytes)
        placed.append(tensor)
        return tensor

    small, large = np.arange(4), np.arange(1000)
    entries, created = asyncio.run(protocol.encode_tensors({"s": small, "l": large}, place, threshold=100))
    assert "nd" in entries["s"] and "ref" in entries["l"]
    assert created == placed and len(placed) == 1
    assert protocol.refs_in(entries) == placed


def test_checks_name_the_operator_and_the_request():
    with pytest.raises(InvalidRequestError) as info:
        protocol.check_inputs("op", "r9", {"x": [1, 2]}, max_bytes=1 << 20)
    assert info.value.operator == "op" and info.value.request_id == "r9"
    with pytest.raises(InvalidRequestError, match="over the limit"):
        protocol.check_inputs("op", "r9", {"x": np.zeros(100)}, max_bytes=10)
    with pytest.raises(InvalidRequestError, match="dtype object"):
        protocol.check_inputs("op", "r9", {"x": np.array([object()])}, max_bytes=1 << 20)
    with pytest.raises(InvalidRequestError, match="parameters must be str"):
        protocol.check_parameters("op", "r9", {"p": [1]})
    with pytest.raises(OperatorError, match="expected a numpy/cupy array"):
        protocol.check_outputs("op", "r9", {"y": "text"})
    with pytest.raises(OperatorError, match="str/int/float/bool"):
        protocol.check_response_parameters("op", "r9", {"k": None})


def test_a_dask_comm_peer_that_sends_a_non_message_is_disconnected():
    """A Session (Dask comm) closes the connection of a peer sending what is not shaped as a
    message, on real sockets; what came before it is delivered."""

    async def main():
        received = []
        served = asyncio.get_running_loop().create_future()

        async def serve(comm):
            session = Session(comm, received.append, "test")
            assert isinstance(session, Transport)
            await session.read_forever()
            served.set_result(session.closed.is_set())

        listener = listen("tcp://127.0.0.1:0", serve)
        await listener.start()
        try:
            comm = await connect(listener.contact_address)
            await comm.write(msgpack.packb([protocol.refused("ok")], use_bin_type=True))
            await comm.write(msgpack.packb([["not", "a", "dict"]], use_bin_type=True))
            closed = await asyncio.wait_for(served, 10)
            await comm.close()
        finally:
            listener.stop()
        return received, closed

    received, closed = asyncio.run(main())
    assert closed
    assert [m["op"] for m in received] == [Op.REFUSED]  # the valid message before it was delivered


class _Marker:
    """Unpickling this creates a file: proof that a peer's pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"nd": ["|O", [1], b"\0" * 8]}, "Python objects"),
        ({"nd": [[["a", "|O"]], [1], b"\0" * 8]}, "Python objects"),
        ({"nd": ["<i8", [2], b"\0" * 8]}, "cannot decode"),  # 8 bytes are not 2 int64
        ({"nd": ["<i8", [-1], b"\0" * 8]}, "malformed shape"),
        ({"nd": ["<i8", "1", b"\0" * 8]}, "malformed shape"),
        ({"nd": [{"evil": 1}, [1], b"\0" * 8]}, "dtype must be"),
        ({"nd": ["<i8", [1]]}, "expected \\[dtype, shape, bytes\\]"),
        ({"nd": ["<i8", [1], "text"]}, "must be bytes"),
        ({"bt": [[10**9], b"\0" * 8]}, "elements announced"),  # no allocation a peer can inflate
        ({"bt": [[1], "text"]}, "must be bytes"),
        ({"bt": [[2], b"\x01\0\0\0a\x09\0\0\0b"]}, "truncated"),
        ({"blob": b"x"}, "unknown tensor entry"),
        ({"ref": {"owner": 1}}, "malformed descriptor"),
        ("not an entry", "not a tensor entry"),
    ],
)
def test_what_is_not_an_array_form_is_refused(entry, why):
    with pytest.raises(InvalidRequestError, match=why):
        protocol.decode_tensors({"x": _wire_round_trip(entry)})


def test_a_pickled_inline_tensor_is_refused_and_never_unpickled(tmp_path):
    """Dask's serialization of an object (what tdask once accepted as "inline") is not decoded."""
    from distributed.protocol import serialize

    marker = tmp_path / "unpickled"
    for serializers in (("pickle",), ("dask", "pickle")):
        header, frames = serialize(_Marker(str(marker)), serializers=serializers)
        entry = _wire_round_trip({"inline": {"h": header, "f": frames}})
        with pytest.raises(InvalidRequestError, match="pickled or Dask-serialized objects are refused"):
            protocol.decode_tensors({"x": entry})
    assert not marker.exists()


@pytest.mark.cluster
def test_a_direct_caller_sending_an_unknown_op_is_disconnected():
    """The worker's direct server knows the ops: a peer that says hello on the wire and then sends
    a message that is no tdask message loses its connection (a real worker, real sockets)."""
    import socket
    import struct

    from distributed import Scheduler, Worker

    from tdask.request_plane.direct import DirectServer

    def frame(messages: list) -> bytes:
        payload = msgpack.packb(messages, use_bin_type=True)
        return struct.pack("<I", len(payload)) + payload

    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address=":0") as s, Worker(s.address, host="127.0.0.1") as w:
            submitted = []

            class Admission:
                def admit(self, plane, operator_key, requests):
                    submitted.extend(requests)
                    return True

                def cancel(self, keys):
                    pass

            server = DirectServer(w)
            server.serve(Admission())
            await server.start()
            host, port = server.listener.wire.address.rsplit(":", 1)
            loop = asyncio.get_running_loop()
            sock = socket.create_connection((host, int(port)))
            sock.setblocking(False)
            try:
                hello = protocol.hello("raw-peer", WIRE_VERSION)
                good = protocol.submit({"id": "r1", "operator": "x/1", "inputs": {}, "parameters": {}})
                await loop.sock_sendall(sock, frame([hello]) + frame([good, {"op": "launch-missiles"}]))
                closed = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
            finally:
                sock.close()
                await server.close()
            return submitted, closed

    submitted, closed = asyncio.run(main())
    assert closed == b""  # the worker closed the connection
    assert [r["id"] for r in submitted] == ["r1"]  # the valid request before it was taken
