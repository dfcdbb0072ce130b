"""GPU and UCX paths: run where the hardware and packages exist, skip with the reason otherwise."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tdask import Deployment, OperatorConfig, RemoteOperator
from tdask.cli import gpu_unavailable_reason
from tests.conftest import ROOT
from tests.operators import Echo

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

_GPU_REASON = gpu_unavailable_reason()
_UCX_REASON = (
    None
    if importlib.util.find_spec("distributed_ucxx")
    else "distributed-ucxx is not installed (pip install 'tdask[ucx]')"
)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_REASON is not None, reason=f"no usable GPU: {_GPU_REASON}")
def test_cupy_tensors_round_trip():
    import cupy

    with Deployment([OperatorConfig(name="echo", implementation=Echo)], dashboard_address=None) as dep:
        for n in (10, 1_000_000):
            x = cupy.arange(n, dtype=cupy.float32)
            response = RemoteOperator("echo", client=dep.client).infer(inputs={"x": x})
            got = response.outputs["x"]
            assert type(got).__module__.startswith("cupy"), type(got)
            assert bool((got == x).all())


# In this order: 32 MB (UCX's rendezvous path) on the comms the first pull opens; the second round
# of each size, and 800 KB (its eager path) after, reuse them.
SIZES = {"32MB": 4_000_000, "800KB": 100_000}
ROUNDS = 2


@pytest.fixture(scope="module")
def ucxx_forwarding():
    """One ``ucxx://`` deployment forwarding every size in turn (tests/ucx_forwarding.py), in a child
    process: UCX's process-wide context outlives a deployment, listening on every interface, and
    must not stay in this one."""

    def run() -> subprocess.CompletedProcess[str]:
        sizes = ",".join(str(n) for n in SIZES.values())
        return subprocess.run(
            [sys.executable, "-m", "tests.ucx_forwarding", sizes, str(ROUNDS)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
            capture_output=True,
            text=True,
            timeout=240,
        )

    result = run()
    if result.returncode != 0:
        # UCX on a CPU-only machine crashed the child once in five full suite runs (UCX's own
        # crash backtrace, ucxx listener errors; 0 of 8 runs alone): one more fresh process, and
        # the first crash is reported as a warning, not hidden.
        warnings.warn(
            f"ucxx child failed (status {result.returncode}), run again: {result.stderr[-1500:]}", stacklevel=2
        )
        result = run()
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_UCX_REASON is not None, reason=_UCX_REASON or "")
@pytest.mark.parametrize("n", list(SIZES.values()), ids=list(SIZES))
def test_ucxx_protocol_forwarding(ucxx_forwarding, n):
    """The producer's output goes by reference; the consumer pulls it worker to worker over UCX.

    On CPU, distributed-ucxx runs UCX over TCP; 32 MB takes UCX's rendezvous path, 800 KB its eager
    one. Both sizes run on one deployment (the fixture), each checked on what it moved.
    """
    got = ucxx_forwarding
    assert got["scheduler"].startswith("ucxx://127.0.0.1:")
    assert got["workers"] and all(address.startswith("ucxx://") for address in got["workers"])
    run = got["runs"][str(n)]
    assert run["sums"] == [float(np.arange(r, r + n, dtype=np.float64).sum()) for r in range(ROUNDS)]
    stats = run["stats"]
    assert stats["forward.0"]["pulled_bytes"] == 0 and stats["consumer.0"]["pulled_bytes"] == ROUNDS * n * 8
