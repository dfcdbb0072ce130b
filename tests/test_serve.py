"""``tdask serve FILE`` as a user runs it, and readiness that tells the truth.

One ``tdask serve examples/hello_world.yaml`` subprocess (the hello world from its deployment
file) is shared by the module: it answers requests; ``tdask status`` and each worker's
``/tdask/ready`` say it is ready (and the Kubernetes example's probe paths answer on a real
worker); a ``dask worker --preload tdask.worker`` whose operator fails to start joins it and is
shown not ready, with the reason, by its ``/tdask/ready``, ``/tdask/operators.json`` and
``tdask status``; a malformed ``--tdask-operator`` stops ``dask worker`` at once with one line;
SIGTERM stops the deployment with nothing left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tests.conftest import ROOT, assert_no_children, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

PY = sys.executable
DASK = os.path.join(os.path.dirname(PY), "dask")
EXAMPLE = Path(ROOT) / "examples" / "hello_world.yaml"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": ROOT,
        "PATH": os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""),
    }


def _tdask(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "tdask.cli", *args],
        env={**_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Served:
    """The ``tdask serve`` subprocess: its output as it comes, and its scheduler's address."""

    def __init__(self, tmp: Path, spec: Path = EXAMPLE) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "tdask.cli",
                "serve",
                str(spec),
                "--dashboard-address",
                "127.0.0.1:0",
                "--log-dir",
                str(tmp / "logs"),
            ],
            env=_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(
            lambda: any(line.startswith("logs:") for line in self.lines),
            timeout=180,
            interval=0.2,
            message=lambda: f"tdask serve did not come up:\n{self.output()}",
        )
        (line,) = [line for line in self.lines if line.startswith("scheduler: ")]
        self.address = line.split()[1]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-80:])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    served = Served(tmp_path_factory.mktemp("serve"))
    try:
        yield served
    finally:
        if served.proc.poll() is None:
            os.killpg(served.proc.pid, signal.SIGKILL)
            served.proc.wait()


@pytest.fixture(scope="module")
def client(served: Served) -> Any:
    from distributed import Client

    with Client(served.address) as client:
        yield client


def _worker_http(client: Any) -> dict[str, str]:
    """Worker name -> the base URL of its HTTP server (where /health, /metrics and /tdask/ready are)."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    return {str(w["name"]): f"http://127.0.0.1:{w['services']['dashboard']}" for w in info.values()}


def test_serve_answers_and_every_worker_is_ready(served, client):
    from tdask import RemoteOperator

    data = np.arange(1000, dtype=np.int64)
    pipeline = RemoteOperator("encoder_decoder", client=client)
    for _ in range(5):
        assert np.array_equal(pipeline.infer(inputs={"input": data}, timeout=60).outputs["output"], data)

    urls = _worker_http(client)
    assert sorted(urls) == ["decoder.0", "encoder.0", "encoder_decoder.0"], urls
    for name, url in urls.items():
        status, report = _get(url + "/tdask/ready")
        assert status == 200 and report["ready"] and report["reason"] is None, report
        key = name.split(".")[0] + "/1"
        assert report["operators"] == {key: {"state": "ready", "reason": None}}, report

    # The Kubernetes example's probes ask these paths of the worker's HTTP server.
    import importlib.util

    spec = importlib.util.spec_from_file_location("examples_kubernetes", Path(ROOT) / "examples" / "kubernetes.py")
    assert spec is not None and spec.loader is not None
    kubernetes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kubernetes)
    probes = kubernetes.worker_probes()
    url = urls["encoder.0"]
    assert _get(url + probes["readinessProbe"]["httpGet"]["path"])[0] == 200
    with urllib.request.urlopen(url + probes["livenessProbe"]["httpGet"]["path"], timeout=10) as response:
        assert response.status == 200

    def status() -> Any:
        result = _tdask("status", "--scheduler", served.address)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:5]}
        # answered: the 5 requests above, once the worker has reported them (every second)
        return result.stdout if int(rows["encoder_decoder"][6]) >= 5 else None

    out = wait_for(status, timeout=30, interval=0.5)
    lines = out.splitlines()
    assert lines[0] == f"scheduler {served.address}: 3 of 3 operators ready", out
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["encoder_decoder"][:6] == ["encoder_decoder", "1", "ready", "encoder_decoder.0", "0/8", "0"], out
    assert rows["encoder"][:3] == ["encoder", "1", "ready"] and rows["decoder"][:3] == ["decoder", "1", "ready"], out
    state = json.loads(_tdask("status", "--scheduler", served.address, "--json").stdout)
    assert state["operators"]["encoder/1"]["state"] == "ready"


def test_serve_a_users_model_repository(served, client, tmp_path):
    """``tdask serve --model-repository DIR``: every model of a user's repository (here joining the scheduler)."""
    from tdask import RemoteOperator

    repository = tmp_path / "repository"
    repository.mkdir()
    for model in ("bytes_upper", "counter"):  # a user's repository: not the hello world's encoder/decoder
        (repository / model).symlink_to(Path(ROOT) / "tests" / "models" / model, target_is_directory=True)
    proc = subprocess.Popen(
        [PY, "-m", "tdask.cli", "serve", "--model-repository", str(repository)]
        + ["--scheduler-address", served.address, "--max-inflight-requests", "2", "--log-dir", str(tmp_path / "logs")],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout), daemon=True)
    reader.start()
    try:
        RemoteOperator("bytes_upper", client=client).wait(timeout=120)
        RemoteOperator("counter", client=client).wait(timeout=120)
        text = np.array([b"hello", b"world"], dtype=object)
        out = RemoteOperator("bytes_upper", client=client).infer(inputs={"text": text}, timeout=60).outputs["upper"]
        assert out.tolist() == [b"HELLO", b"WORLD"]
        count = {"count": np.array([3], dtype=np.int32)}
        assert RemoteOperator("counter", client=client).infer(inputs=count, timeout=60).outputs["i"].tolist() == [2]
        names = sorted(str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values())
        assert "bytes_upper.0" in names and "counter.0" in names, names
        # Its workers serve before its start returns and it prints the plan: wait for that, or
        # the SIGTERM below interrupts the start (a race a fast machine lost once).
        wait_for(lambda: any(line.startswith("logs:") for line in lines), timeout=120, message=lambda: "\n".join(lines))
    finally:
        _stop(proc, timeout=90)
        reader.join(30)
    output = "\n".join(lines)
    assert proc.returncode == 0, output
    assert "operator bytes_upper/1 (max_inflight_requests=2)" in output, output
    # It joined: the scheduler (and the hello world on it) serve on.
    wait_for(lambda: "counter.0" not in _worker_http(client), timeout=30)
    assert sorted(_worker_http(client)) == ["decoder.0", "encoder.0", "encoder_decoder.0"]


def test_a_failed_operator_is_not_ready_and_says_why(served, client, tmp_path):
    """A hand-started worker whose operator's setup raises: not ready, the reason everywhere."""
    operator = json.dumps({"name": "broken", "implementation": "tests.operators:Broken"})
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [DASK, "worker", served.address, "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
            + ["--nthreads", "1", "--name", "broken.0", "--no-nanny"]
            + ["--preload", "tdask.worker", "--tdask-operator", operator],
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def failed() -> Any:
            state = json.loads(_tdask("status", "--scheduler", served.address, "--json").stdout)
            return state["operators"].get("broken")

        entry = wait_for(failed, timeout=60, interval=0.5, message=lambda: (tmp_path / "worker.log").read_text())
        assert entry["state"] == "failed", entry
        assert "broken.0: RuntimeError: broken on purpose: model file missing" in entry["reason"], entry

        url = wait_for(lambda: _worker_http(client).get("broken.0"), timeout=30)
        status, report = _get(url + "/tdask/ready")
        assert status == 503 and not report["ready"], report
        assert report["operators"]["broken/1"]["state"] == "failed", report
        assert "broken on purpose" in report["reason"], report
        with urllib.request.urlopen(url + "/health", timeout=10) as response:  # alive, not ready
            assert response.status == 200

        operators_json = json.loads(urllib.request.urlopen(_dashboard(served) + "/tdask/operators.json").read())
        assert operators_json["operators"]["broken"]["state"] == "failed"
        assert operators_json["operators"]["encoder/1"]["state"] == "ready"

        result = _tdask("status", "--scheduler", served.address)
        assert result.returncode == 3, result.stdout + result.stderr  # not every operator is ready
        (row,) = [line for line in result.stdout.splitlines() if line.startswith("broken ")]
        assert row.split()[1:3] == ["-", "failed"] and "broken on purpose" in row, result.stdout
    finally:
        _stop(worker, timeout=60)


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc``; after ``timeout`` seconds, SIGKILL its process group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _dashboard(served: Served) -> str:
    (line,) = [line for line in served.lines if line.startswith("dashboard: ")]
    return line.split()[1].rsplit("/status", 1)[0]


@pytest.mark.parametrize(
    ("command", "operator", "words"),
    [
        ([DASK, "worker"], '{"name": "x", "implementation": "tests.operators:Identity"', "not JSON"),
        (
            [DASK, "worker"],
            '{"name": "x", "implementaton": "tests.operators:Identity"}',
            "unknown field 'implementaton'",
        ),
        # What dask-jobqueue's job scripts run.
        ([PY, "-m", "distributed.cli.dask_worker"], '{"name": "x"}', "missing field 'implementation'"),
    ],
    ids=["bad-json", "unknown-field", "python-m-missing-field"],
)
def test_a_malformed_operator_stops_dask_worker_with_one_line(served, client, command, operator, words):
    before = set(client.scheduler_info(n_workers=-1)["workers"])
    started = time.monotonic()
    result = subprocess.run(
        [*command, served.address, "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
        + ["--preload", "tdask.worker", "--tdask-operator", operator],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    ours = [line for line in result.stderr.splitlines() if "tdask" in line and "Import preload module" not in line]
    assert len(ours) == 1 and ours[0].startswith("tdask: --tdask-operator: "), result.stderr
    assert words in ours[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 60  # refused while parsing, not after a start
    assert set(client.scheduler_info(n_workers=-1)["workers"]) == before  # it never joined


def test_serve_with_temporary_tls_hands_its_client_credentials_to_the_operate_commands(tmp_path):
    """``tdask serve`` of a file with ``tls: {temporary: true}``: its CA exists only in its memory, so
    ``tdask status`` alone cannot reach it (exit 1, one line naming what to set); the serve line
    names the Dask config variables of the client credentials it wrote (a 0700 directory, 0600
    files), with which ``tdask status`` answers; SIGTERM removes them, and leaves nothing running."""
    pytest.importorskip("cryptography", reason="Security.temporary() generates its certificates with cryptography")
    spec = tmp_path / "tls.yaml"
    spec.write_text(
        "cluster:\n"
        "  protocol: tls\n"
        "  host: 127.0.0.1\n"
        "  tls: {temporary: true}\n"
        "operators:\n"
        "  - name: identity\n"
        "    implementation: tests.operators:Identity\n"
        "    workers: 1\n"
    )
    served = Served(tmp_path, spec)
    try:
        wait_for(
            lambda: any(line.startswith("serving ") for line in served.lines),
            timeout=60,
            message=lambda: f"no serving line:\n{served.output()}",
        )
        (line,) = [line for line in served.lines if line.startswith("serving ")]
        assert "(temporary TLS)" in line and served.address.startswith("tls://"), line
        given = dict(re.findall(r"(DASK_DISTRIBUTED__COMM__TLS__\w+)=(\S+)", line))
        assert sorted(given) == [
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
        ], line
        directory = Path(given["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"]).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {stat.S_IMODE(Path(p).stat().st_mode) for p in given.values()} == {0o600}

        alone = _tdask("status", "--scheduler", served.address, "--timeout", "5")
        # One line saying what to set, not Dask's traceback about ssl_context.
        assert alone.returncode == 1 and "no client credentials" in alone.stderr, (alone.returncode, alone.stderr)
        assert "Traceback" not in alone.stderr and len(alone.stderr.strip().splitlines()) == 1, alone.stderr
        told = _tdask("status", "--scheduler", served.address, "--timeout", "5", env=given)
        assert told.returncode == 0, (told.returncode, told.stdout, told.stderr)
        assert "identity" in told.stdout and "1 of 1" in told.stdout, told.stdout
        processes = [psutil.Process(served.proc.pid), *psutil.Process(served.proc.pid).children(recursive=True)]
    finally:
        if served.proc.poll() is None:
            served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.output()
    assert not directory.exists(), "the credentials outlived tdask serve"
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, alive


def test_sigterm_stops_everything(served, client):
    client.close()
    processes = [psutil.Process(served.proc.pid), *psutil.Process(served.proc.pid).children(recursive=True)]
    assert len(processes) >= 4, processes  # tdask serve, and the workers' nannies and workers
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=90) == 0, served.output()
    assert "interrupted; stopping everything" in served.output()
    # Drained and stopped, not killed by their nannies (Dask's default close allows a worker 4 s).
    assert "still alive after" not in served.output() and "killed by signal" not in served.output(), served.output()
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, alive
    assert_no_children()
