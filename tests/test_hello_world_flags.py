"""The hello world's repository flags, and one-line errors within seconds for a client that cannot start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from distributed import LocalCluster

from tdask.hello_world import MODEL_REPOSITORY
from tests.conftest import assert_no_children

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--requests-per-client", "10", "--dashboard-address", "127.0.0.1:0"]


def _run(args, timeout=200, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", **(env or {})}
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)
    return run, time.monotonic() - began


def test_repository_flags_are_used(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY, models)
    operators = tmp_path / "operators"
    operators.mkdir()
    (operators / "encoder_decoder.py").write_text(
        "from pathlib import Path\n"
        "from tdask.hello_world.operators import EncoderDecoder as Base\n\n\n"
        "class EncoderDecoder(Base):\n"
        "    async def setup(self):\n"
        "        Path(__file__).with_name('used').touch()\n"
        "        await super().setup()\n"
    )
    flags = [
        "--triton-core-models",
        str(models),
        "--operator-repository",
        str(operators),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    run, _ = _run(["tdask.hello_world", *FAST, *flags])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Correct: 10/10" in run.stdout
    assert (operators / "used").exists()
    # Bad repositories are usage errors that say what is missing.
    run, _ = _run(["tdask.hello_world", *FAST, "--triton-core-models", str(operators)])
    assert run.returncode == 2 and "encoder/config.pbtxt" in run.stderr
    run, _ = _run(["tdask.hello_world", *FAST, "--operator-repository", str(models)])
    assert run.returncode == 2 and "encoder_decoder.py" in run.stderr
    assert_no_children()


@pytest.mark.parametrize(
    ("address", "expected"),
    [("tcp://127.0.0.1:1", "cannot reach the scheduler"), ("http://127.0.0.1:1", "unknown address scheme 'http'")],
)
def test_client_that_cannot_connect_says_so_in_one_line(address, expected):
    run, took = _run(["tdask.hello_world.client", "--scheduler-address", address], timeout=60)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], run.stderr
    assert took < 20


def test_client_of_an_operator_nobody_hosts_says_so_in_one_line():
    # The client waits tdask.request.unavailable-timeout (10 s by default) for a host: 1 s here.
    wait = {"DASK_TDASK__REQUEST__UNAVAILABLE_TIMEOUT": "1s"}
    with LocalCluster(n_workers=0, host="127.0.0.1", scheduler_port=0, dashboard_address=":0") as cluster:
        args = ["tdask.hello_world.client", "--scheduler-address", cluster.scheduler_address]
        run, took = _run(args, timeout=60, env=wait)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no worker hosts operator 'encoder_decoder' (waited 1 s)" in lines[0], run.stderr
    assert took < 20
