"""Operators added to and removed from running workers; Triton model control (load, unload, reload).

One deployment for the module: one worker hosting the Triton model ``double`` (tests/models, on
the worker's in-process Triton server) and the Python operator ``adder``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tdask import Deployment, OperatorConfig, OperatorUnavailableError, RemoteOperator
from tdask.host import OperatorHost
from tests.operators import Add, Identity

pytestmark = pytest.mark.cluster

TEST_MODELS = os.path.join(os.path.dirname(__file__), "models")
X = np.arange(4, dtype=np.float32).reshape(1, 4)  # max_batch_size 8: a batch of one
AB = {"a": np.ones(3), "b": np.ones(3)}


@pytest.fixture(scope="module")
def deployment():
    double = OperatorConfig(name="double", implementation="triton", repository=TEST_MODELS)
    adder = OperatorConfig(name="adder", implementation=Add)
    dep = Deployment([double], dashboard_address="127.0.0.1:0")
    with dep:
        # the worker hosts double and adder from one plugin, as in the report
        dep.client.register_plugin(OperatorHost([adder]), name="first-extra")
        yield dep


def _double(client, **kwargs):
    return RemoteOperator("double", client=client).infer({"INPUT0": X}, **kwargs).outputs["OUTPUT0"]


def _operators_json(deployment) -> dict:
    base = deployment.dashboard_link.rsplit("/status", 1)[0]
    with urllib.request.urlopen(f"{base}/tdask/operators.json", timeout=10) as reply:
        return json.load(reply)


def test_operators_added_to_a_running_worker_leave_the_others_serving(deployment):
    """register_plugin(OperatorHost([...]), name="extra-ops") on a worker that already hosts
    operators: the new ones serve, and so do the old ones (they used to time out); a caller that
    names no version gets the only version hosted (2), one pinning version 1 is refused."""
    client = deployment.client
    assert np.array_equal(_double(client), 2 * X)
    extra = [
        OperatorConfig(name="echo", implementation=Identity, version=2),
        OperatorConfig(name="bytes_upper", implementation="triton", repository=TEST_MODELS),
    ]
    result = client.register_plugin(OperatorHost(extra), name="extra-ops")
    assert all(r["status"] == "OK" for r in result.values()), result
    # the operators already there still serve (before the fix: RequestTimeoutError)
    assert np.array_equal(_double(client, timeout=20), 2 * X)
    assert RemoteOperator("adder", client=client).infer(AB, timeout=20).outputs["out"].tolist() == [2.0] * 3
    # and the new ones
    text = np.array([b"hi"], dtype=object)
    upper = RemoteOperator("bytes_upper", client=client).infer({"text": text}, timeout=20).outputs["upper"]
    assert upper.tolist() == [b"HI"]
    echo = RemoteOperator("echo", client=client)  # no version named: the latest hosted, 2
    assert echo.infer({"q": np.ones(2)}, timeout=20).outputs["q"].tolist() == [1.0, 1.0]
    assert RemoteOperator("echo", version=2, client=client).infer({"q": np.ones(1)}).operator == "echo"
    with pytest.raises(OperatorUnavailableError, match="echo/1"):
        RemoteOperator("echo", version=1, client=client).infer({"q": np.ones(1)}, timeout=20)
    hosted = _operators_json(deployment)["hosts"]
    assert {"double/1", "adder/1", "echo/2", "bytes_upper/1"} <= set(hosted)


def test_operators_removed_from_a_running_worker_go_cleanly(deployment):
    """unregister_worker_plugin: the plugin's operators leave the registry and their callers
    are refused at once; the worker's other operators serve on."""
    client = deployment.client
    client.register_plugin(OperatorHost([OperatorConfig(name="gone", implementation=Identity)]), name="to-remove")
    assert RemoteOperator("gone", client=client).infer({"q": np.ones(1)}, timeout=20).outputs["q"].tolist() == [1.0]
    client.unregister_worker_plugin("to-remove")
    assert "gone/1" not in _operators_json(deployment)["hosts"]
    began = time.monotonic()
    with pytest.raises(OperatorUnavailableError, match="gone/1"):
        RemoteOperator("gone", client=client).infer({"q": np.ones(1)}, timeout=60)
    assert time.monotonic() - began < 10
    assert np.array_equal(_double(client, timeout=20), 2 * X)
    assert RemoteOperator("adder", client=client).infer(AB, timeout=20).outputs["out"].tolist() == [2.0] * 3


def _worker_ready(client) -> tuple[int, dict]:
    """The one worker's ``/tdask/ready``: status and JSON body."""
    import urllib.error

    (info,) = client.scheduler_info(n_workers=-1)["workers"].values()
    url = f"http://127.0.0.1:{info['services']['dashboard']}/tdask/ready"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_unload_load_and_reload_a_triton_model(deployment):
    """Model control: unloaded, the model's requests are refused (OperatorUnavailableError) and
    operators.json and /metrics say so; loaded again it serves; reload keeps it serving."""
    client = deployment.client
    out = deployment.unload_model("double")
    assert list(out["workers"].values()) == [{"double/1": "unloaded"}]
    with pytest.raises(OperatorUnavailableError, match="unloaded"):
        _double(client, timeout=20)

    def reported(state: str) -> bool:
        workers = _operators_json(deployment)["workers"]
        return any(s.get("double/1", {}).get("state") == state for s in workers.values())

    from tests.conftest import wait_for

    wait_for(lambda: reported("unloaded"), timeout=20, message="operators.json never showed double unloaded")
    # Its worker is not ready while the model is unloaded (it would refuse the model's requests).
    status, report = _worker_ready(client)
    assert status == 503 and report["operators"]["double/1"]["state"] == "unloaded", report
    assert "double/1 unloaded" in report["reason"], report
    assert _operators_json(deployment)["operators"]["double/1"]["state"] == "unloaded"  # tdask status shows it
    base = deployment.dashboard_link.rsplit("/status", 1)[0]
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert 'tdask_operator_loaded{operator="double",version="1"' in metrics
    line = next(m for m in metrics.splitlines() if m.startswith('tdask_operator_loaded{operator="double"'))
    assert line.endswith(" 0.0"), line

    out = deployment.load_model("double")
    assert list(out["workers"].values()) == [{"double/1": "ready"}]
    assert np.array_equal(_double(client, timeout=20), 2 * X)
    status, report = _worker_ready(client)
    assert status == 200 and report["operators"]["double/1"]["state"] == "ready", report
    wait_for(lambda: reported("ready"), timeout=20, message="operators.json never showed double ready again")
    deployment.reload_model("double")
    assert np.array_equal(_double(client, timeout=20), 2 * X)


def test_model_control_from_the_cli(deployment):
    """`tdask model unload|load NAME` (real output), and a clear error for a name nobody hosts."""
    address = deployment.scheduler_address

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tdask.cli", "model", *args, "--scheduler", address],
            capture_output=True,
            text=True,
            timeout=120,
        )

    unloaded = cli("unload", "double")
    assert unloaded.returncode == 0, unloaded.stderr[-2000:]
    assert unloaded.stdout.strip().endswith("double/1 unloaded"), unloaded.stdout
    loaded = cli("load", "double")
    assert loaded.returncode == 0 and loaded.stdout.strip().endswith("double/1 ready"), loaded.stdout
    assert np.array_equal(_double(deployment.client, timeout=20), 2 * X)
    nobody = cli("load", "nosuchmodel")
    assert nobody.returncode == 1
    assert nobody.stderr.strip().splitlines()[-1].startswith("error: no worker hosts operator 'nosuchmodel'")
    python = cli("unload", "adder")
    assert python.returncode == 1 and "not a Triton model" in python.stderr


def test_model_control_on_a_tritonserver_subprocess():
    """The same unload / load / reload with Triton as a `tritonserver` per worker (its HTTP
    repository API instead of the C API)."""
    import dask

    with dask.config.set({"tdask.triton.mode": "subprocess"}):
        double = OperatorConfig(name="double", implementation="triton", repository=TEST_MODELS)
        with Deployment([double], dashboard_address=None) as dep:
            client = dep.client
            assert np.array_equal(_double(client, timeout=30), 2 * X)
            assert list(dep.unload_model("double")["workers"].values()) == [{"double/1": "unloaded"}]
            with pytest.raises(OperatorUnavailableError, match="unloaded"):
                _double(client, timeout=20)
            assert list(dep.load_model("double")["workers"].values()) == [{"double/1": "ready"}]
            assert np.array_equal(_double(client, timeout=30), 2 * X)
            dep.reload_model("double")
            assert np.array_equal(_double(client, timeout=30), 2 * X)


def test_a_reload_under_traffic_fails_no_request(deployment):
    """`reload` while two callers send requests to the model: every request is answered right."""
    import asyncio

    from tests.conftest import run_async

    async def go(client):
        op = RemoteOperator("double", client=client)
        stop = asyncio.Event()
        answered, errors = [], []

        async def caller():
            while not stop.is_set():
                try:
                    out = await op.infer({"INPUT0": X}, timeout=60)
                    assert np.array_equal(out.outputs["OUTPUT0"], 2 * X)
                    answered.append(1)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        tasks = [asyncio.create_task(caller()) for _ in range(2)]
        await asyncio.sleep(0.5)
        before = len(answered)
        await asyncio.to_thread(deployment.reload_model, "double")
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        return before, len(answered), errors

    before, total, errors = run_async(deployment.scheduler_address, go)
    assert errors == []
    assert before > 0 and total > before
