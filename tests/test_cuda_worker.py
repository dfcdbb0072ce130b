"""``dask cuda worker ... --preload tdask.worker``: one clear line without a GPU, an operator with one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from tdask import RemoteOperator
from tdask.cli import gpu_unavailable_reason
from tdask.host.preload import cuda_worker_unavailable_reason
from tdask.triton.process import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)

_DASK_CUDA_REASON = (
    None if importlib.util.find_spec("dask_cuda") else "dask-cuda is not installed (pip install 'tdask[gpu]')"
)
_GPU_REASON = gpu_unavailable_reason()
DASK = str(Path(sys.executable).parent / "dask")
ECHO = json.dumps({"name": "echo", "implementation": "tests.operators:Echo"})


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}


@pytest.mark.cluster
@pytest.mark.skipif(_DASK_CUDA_REASON is not None, reason=_DASK_CUDA_REASON or "")
@pytest.mark.skipif(
    cuda_worker_unavailable_reason() is None, reason="this machine has a GPU: dask cuda worker starts here"
)
@pytest.mark.parametrize(
    "command", [[DASK, "cuda", "worker"], [DASK + "-cuda-worker"]], ids=["dask-cuda-worker", "old-name"]
)
def test_dask_cuda_worker_without_gpu_fails_in_one_line(command):
    # The scheduler is never contacted: the worker stops while it reads its command line.
    address = f"tcp://127.0.0.1:{free_port()}"
    argv = [*command, address, "--preload", "tdask.worker", "--tdask-operator", ECHO]
    result = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    output = (result.stdout + result.stderr).strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(output) == 1, output
    assert output[0].startswith("tdask: `dask")
    assert "needs an NVIDIA GPU" in output[0] and "NVML" in output[0] and "`dask worker`" in output[0]


def test_parsing_a_cuda_worker_command_line_is_not_refused():
    """Only the real program is stopped: code that parses the recipe (tests/commands.py) is not."""
    if _DASK_CUDA_REASON is not None:
        pytest.skip(_DASK_CUDA_REASON)
    from tests.commands import parse

    params = parse(
        ["dask", "cuda", "worker", "tcp://127.0.0.1:8786", "--preload", "tdask.worker", "--tdask-operator", ECHO]
    )
    assert [c.name for c in params["operators"]] == ["echo"]


@pytest.mark.cluster
@pytest.mark.gpu
@pytest.mark.skipif(_DASK_CUDA_REASON is not None, reason=_DASK_CUDA_REASON or "")
@pytest.mark.skipif(_GPU_REASON is not None, reason=f"no usable GPU: {_GPU_REASON}")
def test_dask_cuda_worker_hosts_an_operator(tmp_path):
    """The documented GPU recipe: a scheduler, ``dask cuda worker`` with the preload, a request."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "scheduler.log", "w"),  # closed when the process ends
    )
    worker = subprocess.Popen(
        [
            DASK,
            "cuda",
            "worker",
            address,
            "--host",
            "127.0.0.1",
            "--dashboard-address",
            "127.0.0.1:0",
            "--name",
            "echo.0",
            "--preload",
            "tdask.worker",
            "--tdask-operator",
            ECHO,
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "w"),
    )
    try:
        with Client(address, timeout="30s") as client:
            RemoteOperator("echo", client=client).wait(60)
            x = np.arange(1000, dtype=np.float32)
            got = RemoteOperator("echo", client=client).infer(inputs={"x": x}).outputs["x"]
            assert np.array_equal(np.asarray(got), x)
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
        deadline = time.monotonic() + 30
        for proc in (worker, scheduler):
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
