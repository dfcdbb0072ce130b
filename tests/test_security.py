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


def test_tdask_serve_with_temporary_tls_hands_its_client_credentials_to_the_operate_commands(tmp_path):
    """``tdask serve`` of a file with ``tls: {temporary: true}``: its CA exists only in its memory, so
    ``tdask status`` alone cannot reach it (exit 1, one line naming what to set); the serve line
    names the Dask config variables of the client credentials it wrote (a 0700 directory, 0600
    files), with which ``tdask status`` answers; SIGTERM removes them, and leaves nothing running."""
    import os
    import re
    import signal
    import stat
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from tests.conftest import ROOT, wait_for

    pytest.importorskip("cryptography", reason="Security.temporary() generates its certificates with cryptography")
    spec = tmp_path / "tls.yaml"
    spec.write_text(
        "cluster:\n"
        "  protocol: tls\n"
        "  host: 127.0.0.1\n"
        "  dashboard_address: 127.0.0.1:0\n"
        "  log_dir: logs\n"
        "  tls: {temporary: true}\n"
        "operators:\n"
        "  - name: identity\n"
        "    implementation: tests.operators:Identity\n"
        "    workers: 1\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    serve = subprocess.Popen(
        [sys.executable, "-m", "tdask.cli", "serve", str(spec)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in serve.stdout), daemon=True)
    reader.start()
    try:
        wait_for(
            lambda: any(line.startswith("serving ") for line in lines),
            timeout=120,
            message=lambda: "tdask serve did not come up:\n" + "\n".join(lines[-40:]),
        )
        (line,) = [line for line in lines if line.startswith("serving ")]
        assert "(temporary TLS)" in line, line
        given = dict(re.findall(r"(DASK_DISTRIBUTED__COMM__TLS__\w+)=(\S+)", line))
        assert sorted(given) == [
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
        ], line
        directory = Path(given["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"]).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {stat.S_IMODE(Path(p).stat().st_mode) for p in given.values()} == {0o600}
        address = re.search(r"--scheduler (tls://\S+?)`", line)[1]

        def status(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "tdask.cli", "status", "--scheduler", address, "--timeout", "5"]
            return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=60)

        alone = status({})
        # One line saying what to set, not Dask's traceback about ssl_context.
        assert alone.returncode == 1 and "no client credentials" in alone.stderr, (alone.returncode, alone.stderr)
        assert "Traceback" not in alone.stderr and len(alone.stderr.strip().splitlines()) == 1, alone.stderr
        told = status(given)
        assert told.returncode == 0, (told.returncode, told.stdout, told.stderr)
        assert "identity" in told.stdout and "1 of 1" in told.stdout, told.stdout
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, "\n".join(lines[-40:])
    assert not directory.exists(), "the credentials outlived tdask serve"
    assert_no_children()
