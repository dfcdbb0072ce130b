"""The hello world's three commands, as real subprocesses, each leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, assert_no_children

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

PY = sys.executable
FAST = ["--requests-per-client", "10", "--dashboard-address", "127.0.0.1:0"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}


def _signal_and_wait(proc: subprocess.Popen, signum: int, timeout_s: float = 60) -> None:
    """Ask ``proc`` to stop with ``signum``; kill it and fail if it does not within ``timeout_s``."""
    proc.send_signal(signum)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _triton_processes(since: float) -> list[psutil.Process]:
    """tritonserver or python-backend stub processes started after ``since`` that are ours:
    descendants of this test process, or orphans (re-parented to init) whose owner died."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["create_time"] < since - 1 or not (
                "tritonserver" in cmd or "triton_python_backend_stub" in cmd
            ):
                continue
            parents = [p.pid for p in proc.parents()]
            if me in parents or proc.ppid() == 1:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _assert_clean(since: float) -> None:
    from tests.conftest import wait_for

    assert_no_children()
    wait_for(
        lambda: not _triton_processes(since),
        timeout=15,
        interval=0.2,
        message=lambda: f"Triton processes left: {_triton_processes(since)}",
    )


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, *args], env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _dask_scheduler(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A real `dask scheduler` on 127.0.0.1, and its address once it is up."""
    from tests.conftest import wait_for

    scheduler_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(PY), "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        assert proc.poll() is None, "dask scheduler exited"
        return scheduler_file.exists()

    try:
        wait_for(up, timeout=60, interval=0.1, message="dask scheduler did not start")
    except AssertionError:
        proc.kill()
        raise
    return proc, json.loads(scheduler_file.read_text())["address"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[float, Path, subprocess.CompletedProcess[str]]:
    """One run of the embedded hello world, two clients, debug logs, read by the two tests below:
    when it started, its log directory, and how it ended."""
    logs = tmp_path_factory.mktemp("embedded") / "logs"
    since = time.time()
    args = ["-m", "tdask.hello_world", *FAST, "--clients", "2", "--log-level", "debug", "--log-dir", str(logs)]
    return since, logs, _run(args)


def test_embedded_two_clients(embedded):
    since, logs, result = embedded
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^scheduler: tcp://127\.0\.0\.1:\d+$", out, re.M)
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/status$", out, re.M)
    for name in ("encoder.0", "decoder.0", "encoder_decoder.0"):
        assert f"worker {name}" in out
    assert re.search(r"^Throughput: [\d.]+ req/s Total Time: [\d.]+ s", out, re.M)
    assert "Correct: 20/20" in out
    assert re.search(r"p50 [\d.]+ ms\s+p90 [\d.]+ ms\s+p99 [\d.]+ ms", out)
    names = sorted(p.name for p in logs.iterdir())
    assert {"encoder.0.log", "decoder.0.log", "encoder_decoder.0.log"} <= set(names), names
    assert any("triton" in name for name in names), names
    _assert_clean(since)


def test_one_request_id_through_every_log_and_where_to_look(embedded):
    """--log-level debug: a request's id names it on the caller, on every worker of the pipeline and in Triton's log."""
    _, logs, result = embedded
    assert result.returncode == 0, result.stdout + result.stderr
    base = re.search(r"^dashboard: (http://127\.0\.0\.1:\d+)/status$", result.stdout, re.M)
    assert base, result.stdout
    # The final report says where to look, truly: the cluster has stopped when it is read (no
    # link to its dashboard then), and at debug level the request ids are in the logs.
    closing = result.stdout.split("Answered by:", 1)[-1]
    assert f"{base.group(1)}/tdask" not in closing and "stopped with this run's cluster" in closing
    assert f"Logs: {logs}" in result.stdout and "follow a request id: grep -r client0-0" in result.stdout
    assert any("client0-0" in p.read_text() for p in logs.iterdir()), "the hint's grep finds the request"
    lines = {p.name: [ln for ln in p.read_text().splitlines() if "client0-3" in ln] for p in logs.iterdir()}
    assert any("request client0-3 of encoder_decoder/1 sent" in ln for ln in lines["client.log"]), lines["client.log"]
    assert any("answered by" in ln for ln in lines["client.log"])
    assert any("request client0-3 of encoder_decoder/1 started" in ln for ln in lines["encoder_decoder.0.log"])
    for name in ("encoder", "decoder"):
        worker = lines[f"{name}.0.log"]
        assert any(f"request client0-3:{name}:" in ln and f"of {name}/1 answered: ok" in ln for ln in worker), worker
        assert lines[f"{name}.0.triton.log"], f"Triton's own log names the request ({name})"
    for name in ("client.log", "encoder_decoder.0.log", "encoder.0.log", "decoder.0.log"):
        for ln in lines[name]:  # every line about the request names its operator too
            assert re.search(r"of (encoder_decoder|encoder|decoder)\b", ln), ln


def test_embedded_encoder_only_with_copies(tmp_path):
    since = time.time()
    result = _run(
        [
            "-m",
            "tdask.hello_world",
            *FAST,
            "--operator",
            "encoder",
            "--encoder-input-copies",
            "3",
            "--input-size-stdev",
            "50",
            "--log-dir",
            str(tmp_path),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Correct: 10/10" in result.stdout
    # At the default level the request ids are not logged: the hint says how to get them.
    assert "run with --log-level debug to follow a request id" in result.stdout, result.stdout
    assert not any("client0-0" in p.read_text() for p in tmp_path.iterdir() if p.is_file())
    _assert_clean(since)


@pytest.mark.parametrize(
    "protocol, needs",
    [
        ("tls", ("cryptography", "throw-away TLS certificates are made with cryptography")),
        ("ucxx", ("distributed_ucxx", "distributed-ucxx is not installed (pip install 'tdask[ucx]')")),
    ],
    ids=["tls", "ucxx"],
)
def test_embedded_over_protocol(tmp_path, protocol, needs):
    """The hello world with ``--protocol tls`` or ``--protocol ucxx``: every comm (client, scheduler,
    workers) on it."""
    pytest.importorskip(needs[0], reason=needs[1])
    since = time.time()
    args = ["-m", "tdask.hello_world", *FAST, "--protocol", protocol, "--log-dir", str(tmp_path)]
    # UCX on CPU: with its shared-memory transports the hello world died of SIGSEGV in 6 runs
    # of 7 here; Deployment leaves them out where there is no GPU (UCX_TLS=^sm), and then it
    # ran 5 of 5 (docs/design.md, "Dependencies"). Over many full suites since, UCX still
    # crashed once (its own backtrace: a SIGSEGV in a UCX thread after "Connection reset by
    # remote peer" in ucxx's listener): that crash, and only it, gets one more fresh run, reported
    # as a warning, as tests/test_gpu_ucx.py does; a second crash or any other failure fails.
    result = _run(args)
    if protocol == "ucxx" and result.returncode != 0 and _ucx_crashed(result.stdout + result.stderr):
        warnings.warn(f"UCX crashed (run again): {(result.stdout + result.stderr)[-1500:]}", stacklevel=1)
        _assert_clean(since)
        result = _run(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^scheduler: {protocol}://127\.0\.0\.1:\d+$", result.stdout, re.M)
    assert "Correct: 10/10" in result.stdout
    _assert_clean(since)


def test_embedded_colocated(tmp_path):
    """``--colocate``: two workers, each hosting encoder, decoder and encoder_decoder (one Triton
    server for both models), every answer right."""
    since = time.time()
    args = ["-m", "tdask.hello_world", *FAST, "--colocate", "--encoders", "2", "4", "1", "CPU"]
    result = _run([*args, "--clients", "2", "--log-dir", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Correct: 20/20" in result.stdout
    plan = [ln for ln in result.stdout.splitlines() if ln.startswith("worker ")]
    assert len(plan) == 2, result.stdout
    assert all("operator encoder/1, decoder/1, encoder_decoder/1" in ln for ln in plan), plan
    _assert_clean(since)


def _ucx_crashed(output: str) -> bool:
    """Whether ``output`` holds UCX's own crash report (a signal caught by libucs)."""
    return "Caught signal" in output and "libucs" in output


def test_deploy_over_tls_needs_shared_certificates(tmp_path):
    result = _run(["-m", "tdask.hello_world.deploy", "--protocol", "tls", "--log-dir", str(tmp_path)], timeout=60)
    assert result.returncode == 2
    assert "--protocol tls needs certificates that every process shares" in result.stderr


def test_embedded_on_a_running_scheduler(tmp_path):
    """--scheduler-address: the operators join a running `dask scheduler`, which stays up after."""
    since = time.time()
    scheduler, address = _dask_scheduler(tmp_path)
    try:
        result = _run(["-m", "tdask.hello_world", *FAST, "--scheduler-address", address, "--log-dir", str(tmp_path)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"scheduler: {address}" in result.stdout and "Correct: 10/10" in result.stdout
        assert scheduler.poll() is None, "the scheduler we did not start is left running"
        from distributed import Client

        with Client(address, timeout=30) as client:
            assert not client.scheduler_info()["workers"], "the deployment's own workers are gone"
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)
    _assert_clean(since)


def test_gpu_flag_without_gpu_is_a_usage_error(tmp_path):
    from tdask.cli import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is present here; the GPU path is covered by the gpu-marked tests")
    result = _run(["-m", "tdask.hello_world", *FAST, "--encoders", "1", "1", "1", "GPU", "--log-dir", str(tmp_path)])
    assert result.returncode == 2
    assert "GPU instances were requested, but" in result.stderr and "use CPU" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--encoders", "0", "1", "1", "CPU"], "N must be >= 1"),
        (["--decoders", "1", "1", "1", "TPU"], "'TPU' is not one of 'cpu', 'gpu'"),
        (["--encoder-input-copies", "0"], "must be >= 1"),
        (["--encoder-delay-per-token", "-1"], "must be >= 0"),
        (["--operator", "nope"], "'nope' is not one of"),
        (["--colocate", "--decoders", "2", "1", "1", "CPU"], "--colocate runs decoder and encoder_decoder on every"),
    ],
)
def test_bad_flag_values(flags, message, tmp_path):
    result = _run(["-m", "tdask.hello_world", *flags, "--log-dir", str(tmp_path)], timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_deploy_then_client(tmp_path):
    since = time.time()
    deploy = subprocess.Popen(
        [
            PY,
            "-m",
            "tdask.hello_world.deploy",
            "--dashboard-address",
            "127.0.0.1:0",
            "--encoders",
            "2",
            "2",
            "1",
            "CPU",
            "--encoder-input-copies",
            "2",
            "--log-dir",
            str(tmp_path),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        address = None
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = deploy.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"--scheduler-address (tcp://127\.0\.0\.1:\d+)", line)
            if match:
                address = match.group(1)
                break
        assert address, "".join(lines)
        result = _run(
            [
                "-m",
                "tdask.hello_world.client",
                "--scheduler-address",
                address,
                "--clients",
                "2",
                "--requests-per-client",
                "10",
                "--encoder-input-copies",
                "2",
            ]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Correct: 20/20" in result.stdout
        answered = re.search(r"Answered by: (.*)", result.stdout).group(1)
        # One encoder_decoder worker, which spread its calls over both encoder workers.
        assert "encoder_decoder.0 (encoder.0 -> decoder.0)" in answered, answered
        assert "encoder_decoder.0 (encoder.1 -> decoder.0)" in answered, answered
    finally:
        _signal_and_wait(deploy, signal.SIGTERM)
    assert deploy.returncode == 0, deploy.stdout.read()
    _assert_clean(since)


_LISTENERS = """
import json, sys, psutil
found = []
for pid in map(int, sys.argv[2:]):
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append([proc.pid, conn.laddr.ip, conn.laddr.port])
    except psutil.Error:
        pass
json.dump(found, open(sys.argv[1], "w"))
"""


def test_readme_hand_started_recipe_as_written(tmp_path):
    """The README's hand-started block, pasted as one block (on free ports): every listener is on
    127.0.0.1, the client waits for the three operators, names their workers, and is answered."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"paste\s+it\s+as\s+one\s+block\):\n\n```bash\n(.*?)```", readme, re.S).group(1)
    scheduler_port, dashboard_port = _free_port(), _free_port()
    block = block.replace("8786", str(scheduler_port)).replace("8787", str(dashboard_port))
    listeners = tmp_path / "listeners.json"
    script = tmp_path / "recipe.sh"
    script.write_text(
        block
        + "status=$?\n"
        + f"python -c {shlex.quote(_LISTENERS)} {listeners} $(jobs -p)\n"
        + "kill $(jobs -p)\nwait\nexit $status\n"
    )
    since = time.time()
    env = {**_env(), "PATH": os.pathsep.join([os.path.dirname(PY), os.environ["PATH"]])}
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=env,
        cwd=tmp_path,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # only what this test started: the script's own process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out + err[-3000:]
    for name in ("encoder", "decoder", "encoder_decoder"):
        assert f"ready: {name} on {name}.0" in out, out
    assert "Correct: 100/100" in out, out
    assert "Answered by: encoder_decoder.0 (encoder.0 -> decoder.0) x100" in out, out
    found = json.loads(listeners.read_text())
    assert len(found) >= 2 + 3 * 4, found  # scheduler + dashboard; per worker: nanny, worker, HTTP, wire
    # gRPC (Triton's) binds 127.0.0.1 on a dual-stack socket, which shows as the IPv4-mapped form.
    assert {ip for _, ip, _ in found} <= {"127.0.0.1", "::ffff:127.0.0.1"}, found
    _assert_clean(since)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ctrl_c_mid_run_stops_everything(tmp_path):
    """SIGINT while the client runs: exit code 130, and nothing left behind."""
    from tests.conftest import wait_for

    since = time.time()
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "tdask.hello_world",
            "--requests-per-client",
            "100000",
            "--dashboard-address",
            "127.0.0.1:0",
            "--log-dir",
            str(tmp_path),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        # A test runner started in the background (e.g. `nohup ... &`) hands its children an
        # ignored SIGINT, and Python then keeps ignoring it: give the child the default back.
        preexec_fn=_default_sigint,
    )
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("logs:"):  # deployed; the client starts now
            break
    assert lines and lines[-1].startswith("logs:"), "".join(lines)

    def answering() -> bool:  # tqdm's progress bar, one "\r"-ended line per refresh
        line = proc.stdout.readline()
        assert line, "the hello world ended before SIGINT: " + "".join(lines)
        lines.append(line)
        return re.search(r"client 0: .*\| *[1-9]\d*/100000 ", line) is not None

    wait_for(answering, timeout=60, interval=0, message=lambda: "no request answered: " + "".join(lines[-5:]))
    _signal_and_wait(proc, signal.SIGINT)
    assert proc.returncode == 130, proc.stdout.read()
    _assert_clean(since)
