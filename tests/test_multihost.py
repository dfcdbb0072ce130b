"""The hello world across hosts: network namespaces of the test's own on a private bridge (tests/netns.py).

Host ``a`` runs the scheduler and ``encoder_decoder``, ``b`` the encoder, ``c`` the decoder, ``d``
the clients, ``e`` the workers that join for the last test. Everything is started as the README's
hand-started recipe says (``dask scheduler``, ``dask worker --preload tdask.worker``, the hello
world's client), on the hosts' own addresses (10.87.0.0/24) and fixed ports: each host is a
namespace of its own, so they collide with nothing.

Every process runs with ``distributed.comm.timeouts.tcp: 11s`` (the lowest Dask accepts) so that
silently dead connections are noticed in 11 s instead of 30 s; ``TDASK_TEST_TCP_TIMEOUT=30``
runs them with Dask's default, as for the figures in docs/design.md ("Across hosts").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, assert_no_children
from tests.netns import Network, unavailable_reason

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

PY = sys.executable
DASK = os.path.join(os.path.dirname(PY), "dask")
# distributed.comm.timeouts.tcp in every process here (TDASK_TEST_TCP_TIMEOUT=30: Dask's default)
TCP_TIMEOUT_S = int(os.environ.get("TDASK_TEST_TCP_TIMEOUT", "11"))
CONNECT_TIMEOUT_S = 5  # tdask.data-plane.connect-timeout (the default)
WIRE_PORT = 7000  # the encoder's wire (the firewall's target); other workers take any free port
ENCODER_DECODER = {
    "name": "encoder_decoder",
    "implementation": "tdask.hello_world.operators:EncoderDecoder",
    "max_inflight_requests": 8,
}


def _models() -> str:
    from tdask.hello_world import MODEL_REPOSITORY

    return MODEL_REPOSITORY


def triton(name: str) -> dict[str, Any]:
    return {"name": name, "implementation": "triton", "repository": _models(), "max_inflight_requests": 4}


@pytest.fixture(scope="module")
def network():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Network(["a", "b", "c", "d", "e"]) as net:
        yield net
    assert_no_children()


class Cluster:
    """A hand-started cluster on the network's hosts: the README's recipe, process by process."""

    def __init__(self, net: Network, tmp: Path, scheme: str = "tcp", port: int = 8786, env: dict | None = None):
        self.net = net
        self.tmp = tmp
        self.scheme = scheme
        self.address = f"{scheme}://{net.addresses['a']}:{port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": ROOT,
            "PYTHONUNBUFFERED": "1",
            "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": f"{TCP_TIMEOUT_S}s",
            **(env or {}),
        }
        self.procs: list[subprocess.Popen] = []
        self.port = port

    def _log(self, name: str) -> Any:
        return open(self.tmp / f"{name}.out", "w")

    def start_scheduler(self) -> None:
        with self._log("scheduler") as log:
            self.procs.append(
                self.net.popen(
                    "a",
                    [DASK, "scheduler", "--protocol", self.scheme, "--host", self.net.addresses["a"]]
                    + ["--port", str(self.port), "--dashboard-address", f"{self.net.addresses['a']}:{self.port + 1}"],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.tmp,
                )
            )

    def start_worker(self, host: str, name: str, operator: dict[str, Any], env: dict | None = None) -> None:
        with self._log(name) as log:
            self.procs.append(
                self.net.popen(
                    host,
                    [DASK, "worker", self.address, "--protocol", self.scheme, "--host", self.net.addresses[host]]
                    + ["--dashboard-address", f"{self.net.addresses[host]}:0", "--nthreads", "1", "--name", name]
                    + ["--preload", "tdask.worker"]
                    + ["--tdask-operator", json.dumps(operator), "--tdask-log-dir", str(self.tmp)],
                    env={**self.env, **(env or {})},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.tmp,
                )
            )

    def start_hello_world(self) -> None:
        self.start_scheduler()
        self.start_worker("a", "encoder_decoder.0", ENCODER_DECODER)
        self.start_worker("b", "encoder.0", triton("encoder"), env={"DASK_TDASK__WORKER__WIRE_PORT": str(WIRE_PORT)})
        self.start_worker("c", "decoder.0", triton("decoder"))
        self.wait("encoder/1", "decoder/1", "encoder_decoder/1")

    def client(self, *args: str, timeout: float = 180) -> dict[str, Any]:
        """Run ``tests.multihost_client ARGS`` on the client host; its last JSON line."""
        result = self.net.run(
            "d",
            [PY, "-m", "tests.multihost_client", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:] + self.logs()
        return lines[-1]

    def wait(self, *keys: str) -> None:
        self.client("wait", self.address, *keys)

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.tmp.glob("*.out")))

    def stop(self) -> None:
        if self.procs:
            self.net.stop(*self.procs[1:])  # the workers, then the scheduler
            self.net.stop(self.procs[0])
        self.procs.clear()


@pytest.fixture(scope="module")
def hello_world(network, tmp_path_factory):
    cluster = Cluster(network, tmp_path_factory.mktemp("multihost"))
    try:
        cluster.start_hello_world()
        yield cluster
    finally:
        cluster.stop()


def latencies(report: dict[str, Any]) -> list[float]:
    return sorted(r["latency"] for r in report["results"])


def assert_all_correct(report: dict[str, Any], count: int) -> None:
    errors = [r for r in report["results"] if not r.get("ok")]
    assert report["correct"] == count and not errors, errors[:5]


# -- the hello world across hosts ----------------------------------------------------------------


def _write_certificates(directory: Path) -> dict[str, str]:
    """One throw-away CA-signed identity for every process, as Dask's TLS config files."""
    pytest.importorskip("cryptography", reason="throw-away TLS certificates are made with cryptography")
    from distributed.security import Security

    security = Security.temporary()
    files = {"ca.pem": security.tls_ca_file, "cert.pem": security.tls_scheduler_cert}
    files["key.pem"] = security.tls_scheduler_key
    for name, text in files.items():
        (directory / name).write_text(text)
    env = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(directory / "ca.pem")}
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = str(directory / "cert.pem")
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = str(directory / "key.pem")
    return env


def test_hello_world_across_hosts_over_tls(network, tmp_path):
    """The README's recipe with tls:// on three hosts: every answer right, and the direct
    sessions between hosts are the wire, over TLS (runs first: its cluster is gone before the
    module's tcp:// one starts)."""
    cluster = Cluster(network, tmp_path, scheme="tls", port=8788, env=_write_certificates(tmp_path))
    try:
        cluster.start_hello_world()
        result = network.run(
            "d",
            [PY, "-m", "tdask.hello_world.client", "--scheduler-address", cluster.address]
            + ["--requests-per-client", "50", "--max-inflight-per-client", "4"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stdout + result.stderr[-3000:] + cluster.logs()
        assert "Correct: 50/50" in result.stdout
        assert "encoder_decoder.0 (encoder.0 -> decoder.0) x50" in result.stdout
        state = cluster.client("sessions", cluster.address)
        assert state["sessions"]["encoder_decoder.0"] == {"encoder.0": "WireSession", "decoder.0": "WireSession"}
        assert state["addresses"]["encoder.0"].startswith(f"tls://{network.addresses['b']}:")
    finally:
        cluster.stop()


def test_hello_world_across_hosts_over_tcp(network, hello_world):
    """The README's recipe on three hosts: 200 of 200 right; each worker on its own host's
    address; encoder_decoder reaches encoder and decoder over the wire, across hosts."""
    result = network.run(
        "d",
        [PY, "-m", "tdask.hello_world.client", "--scheduler-address", hello_world.address]
        + ["--requests-per-client", "100", "--clients", "2", "--max-inflight-per-client", "4"],
        env=hello_world.env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:] + hello_world.logs()
    assert "Correct: 200/200" in result.stdout
    assert "Answered by: encoder_decoder.0 (encoder.0 -> decoder.0) x200" in result.stdout
    state = hello_world.client("sessions", hello_world.address)
    for name, host in (("encoder_decoder.0", "a"), ("encoder.0", "b"), ("decoder.0", "c")):
        assert state["addresses"][name].startswith(f"tcp://{network.addresses[host]}:"), state
    assert state["sessions"]["encoder_decoder.0"] == {"encoder.0": "WireSession", "decoder.0": "WireSession"}


def test_tensors_go_by_reference_straight_between_hosts(network, hello_world):
    """400 KB inputs: the encoder's output goes from host b to host c without passing through
    a (the orchestrator) or d (the client), counted by the hosts' own firewalls."""
    for host, source in (("c", "b"), ("a", "b"), ("d", "c"), ("a", "c")):
        network.count_from(host, source)
    try:
        before = {(h, s): network.input_bytes_from(h, s) for h, s in (("c", "b"), ("a", "b"), ("d", "c"), ("a", "c"))}
        count, size = 40, 50_000  # 400 KB of int64 each: above the 64 KiB inline threshold
        report = hello_world.client(
            "run",
            hello_world.address,
            "encoder_decoder",
            "--requests",
            str(count),
            "--inflight",
            "4",
            "--size",
            str(size),
        )
        assert_all_correct(report, count)
        got = {key: network.input_bytes_from(*key) - value for key, value in before.items()}
    finally:
        for host, source in (("c", "b"), ("a", "b"), ("d", "c"), ("a", "c")):
            network.iptables(host, "-D", "INPUT", "-s", network.addresses[source])
    payload = count * size * 8
    assert got[("c", "b")] > payload, got  # the decoder pulled every encoded tensor from the encoder
    assert got[("d", "c")] > payload, got  # the client pulled every answer from the decoder
    assert got[("a", "b")] < payload / 20 and got[("a", "c")] < payload / 20, got  # a saw messages only


# -- the wire's port behind a firewall ------------------------------------------------------------


FIREWALL = {
    "REJECT": ["-j", "REJECT", "--reject-with", "tcp-reset"],
    "DROP": ["-j", "DROP"],
}


@pytest.mark.parametrize("action", ["REJECT", "DROP"])
def test_a_firewalled_wire_falls_back_to_dasks_comm(network, hello_world, action, record_property):
    """The encoder's wire port closed by host b's firewall while a client is using it: the
    requests on the cut session are answered all the same (REJECT: at once; DROP: once the
    session is noticed dead, within distributed.comm.timeouts.tcp), and a new client reaches the
    encoder over Dask's comm after at most one connect timeout (REJECT: none)."""
    rule = ["INPUT", "-p", "tcp", "--dport", str(WIRE_PORT), *FIREWALL[action]]
    encoder = hello_world.client("sessions", hello_world.address)["addresses"]["encoder.0"]
    client = network.popen(
        "d",
        [PY, "-m", "tests.multihost_client", "run", hello_world.address, "encoder"]
        + ["--requests", "60", "--inflight", "4", "--pause-after", "20"],
        env=hello_world.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        paused = json.loads(client.stdout.readline() or "{}")
        assert paused.get("sessions") == {encoder: "WireSession"}, (
            paused,
            client.stderr.read() if client.poll() is not None else "",
        )
        network.iptables("b", "-A", *rule)
        client.stdin.write("go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=120)
        existing = json.loads(out.strip().splitlines()[-1])
        fresh = hello_world.client("run", hello_world.address, "encoder", "--requests", "20", "--inflight", "4")
    finally:
        network.stop(client, timeout=5)
        network.iptables("b", "-D", *rule)
    assert_all_correct(existing, 60)
    assert_all_correct(fresh, 20)
    assert fresh["sessions"] == {"encoder.0": "Session"}, fresh["sessions"]  # Dask's comm
    slowest_cut, slowest_fresh = latencies(existing)[-1], latencies(fresh)[-1]
    record_property(
        "figures", f"{action}: slowest request on the cut session {slowest_cut} s, new client {slowest_fresh} s"
    )
    if action == "REJECT":  # refused: nobody waits for a timeout
        assert slowest_cut < CONNECT_TIMEOUT_S - 1 and slowest_fresh < CONNECT_TIMEOUT_S - 1, (
            slowest_cut,
            slowest_fresh,
        )
    else:  # silence: the cut session within the TCP timeout, a new one after one connect timeout
        assert slowest_cut < TCP_TIMEOUT_S + 3, slowest_cut
        assert CONNECT_TIMEOUT_S - 0.5 < slowest_fresh < CONNECT_TIMEOUT_S + 2, slowest_fresh


# -- a host vanishes --------------------------------------------------------------------------------


def test_a_host_dropped_mid_run_is_re_served_by_the_others(network, hello_world, record_property):
    """Host e joins with a second encoder and decoder; then every packet of host b (the first
    encoder) is dropped while requests run: those it held are served again on e, none is lost,
    and none waits much longer than distributed.comm.timeouts.tcp."""
    hello_world.start_worker("e", "encoder.1", triton("encoder"))
    hello_world.start_worker("e", "decoder.1", triton("decoder"))
    hello_world.wait("encoder/1=2", "decoder/1=2")
    rules = [["INPUT", "-i", "eth0", "-j", "DROP"], ["OUTPUT", "-o", "eth0", "-j", "DROP"]]
    client = network.popen(
        "d",
        [PY, "-m", "tests.multihost_client", "run", hello_world.address, "encoder_decoder"]
        + ["--requests", "300", "--inflight", "8", "--pause-after", "40"],
        env=hello_world.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert json.loads(client.stdout.readline() or "{}").get("paused"), client.stderr.read()
        client.stdin.write("go\n")
        client.stdin.flush()
        for rule in rules:  # b vanishes mid-run: no RST, no FIN, nothing
            network.iptables("b", "-A", *rule)
        out, err = client.communicate(timeout=150)
        report = json.loads(out.strip().splitlines()[-1])
    finally:
        network.stop(client, timeout=5)
        for rule in rules:
            network.iptables("b", "-D", *rule)
    assert_all_correct(report, 300)
    before = {r["called"][0] for r in report["results"][:40]}
    after = [r["called"][0] for r in report["results"][40:]]
    assert before == {"encoder.0", "encoder.1"}, before  # both served until b vanished
    assert "encoder.1" in after, after
    slowest = latencies(report)[-1]
    waited = [r["latency"] for r in report["results"] if r["latency"] > 1]
    record_property("figures", f"slowest {slowest} s; {len(waited)} requests took over 1 s; run {report['elapsed']} s")
    assert TCP_TIMEOUT_S - 3 < slowest < TCP_TIMEOUT_S + CONNECT_TIMEOUT_S + 3, slowest
