"""Dask TLS end to end: requests, large tensors and forwarding over tls:// with generated certificates."""

from __future__ import annotations

import numpy as np
import pytest

from tdask import Deployment, OperatorConfig, RemoteOperator
from tdask.host import PLUGIN_NAME
from tdask.transport.wire import WIRE_VERSION
from tests.conftest import assert_no_children, child_pids, store_stats
from tests.operators import Consumer, Forward, Identity, Producer

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def test_tls_end_to_end():
    pytest.importorskip("cryptography", reason="Security.temporary() generates its certificates with cryptography")
    from distributed.security import Security

    security = Security.temporary()  # a fresh CA and certificate, made in this test
    operators = [
        OperatorConfig(name="identity", implementation=Identity),
        OperatorConfig(name="forward", implementation=Forward),
        OperatorConfig(name="producer", implementation=Producer),
        OperatorConfig(name="consumer", implementation=Consumer),
    ]
    before = child_pids()
    with Deployment(operators, protocol="tls", security=security, dashboard_address=None) as dep:
        assert dep.scheduler_address.startswith("tls://127.0.0.1:")
        workers = dep.worker_addresses()
        assert all(addr.startswith("tls://127.0.0.1:") for addr in workers.values()), workers
        # On tls:// tdask's wire runs over TLS with the cluster's contexts (tests/test_wire.py).
        wires = dep.client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].direct.listener.wire_address())
        assert None not in wires.values(), wires
        big = np.arange(1_000_000)
        response = RemoteOperator("identity", client=dep.client).infer(inputs={"x": big})
        np.testing.assert_array_equal(response.outputs["x"], big)
        n = 200_000
        response = RemoteOperator("forward", client=dep.client).infer(
            inputs={"start": np.array([0.0])}, parameters={"n": n}
        )
        assert response.outputs["sum"][0] == np.arange(n, dtype=np.float64).sum()
        stats = store_stats(dep.client)
        assert stats["forward.0"]["pulled_bytes"] == 0 and stats["consumer.0"]["pulled_bytes"] == n * 8
        assert all(s["tensors"] == 0 for s in stats.values())
    assert_no_children(ignore=before)


class _Marker:
    """Unpickling this creates a file: proof that a peer's pickle ran on the worker."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def _frame(messages) -> bytes:
    import struct

    import msgpack

    payload = msgpack.packb(messages, use_bin_type=True)
    return struct.pack("<I", len(payload)) + payload


def _read_frame(sock) -> list:
    import struct

    import msgpack

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the worker closed the connection"
            data += chunk
        return data

    (length,) = struct.unpack("<I", exactly(4))
    return msgpack.unpackb(exactly(length), raw=False)


def test_a_pickled_tensor_from_a_raw_wire_peer_is_refused_and_never_unpickled(tmp_path):
    """A raw TCP peer says the wire's hello, then submits an input made by Dask's pickle
    serializer: the worker answers InvalidRequestError and the object is never unpickled."""
    import socket

    from distributed.protocol import serialize

    marker = tmp_path / "unpickled-on-the-worker"
    header, frames = serialize(_Marker(str(marker)), serializers=("pickle",))
    before = child_pids()
    with Deployment([OperatorConfig(name="identity", implementation=Identity)], dashboard_address=None) as dep:
        wires = dep.client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].direct.listener.wire_address())
        host, port = next(iter(wires.values())).rsplit(":", 1)
        assert host == "127.0.0.1"
        request = {
            "id": "evil-1",
            "operator": "identity/1",
            "parameters": {},
            "deadline": None,
            "inputs": {"x": {"inline": {"h": header, "f": frames}}},
        }
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(_frame([{"op": "hello", "wire": WIRE_VERSION, "requester": "raw-peer"}]))
            sock.sendall(_frame([{"op": "submit", "request": request}]))
            replies = _read_frame(sock)
        [message] = replies
        assert message["op"] == "replies"
        [reply] = message["replies"]
        assert reply["id"] == "evil-1" and reply["final"]
        assert reply["error"]["type"] == "InvalidRequestError", reply["error"]
        assert "pickled or Dask-serialized objects are refused" in reply["error"]["message"]
        assert not marker.exists(), "the worker unpickled a peer's object"
        # The worker still serves.
        response = RemoteOperator("identity", client=dep.client).infer(inputs={"x": np.arange(3)})
        np.testing.assert_array_equal(response.outputs["x"], np.arange(3))
    assert not marker.exists()
    assert_no_children(ignore=before)
