"""Large tensors between a worker and its Triton server through system shared memory (real Triton).

The module's deployment runs with ``tdask.triton.shared-memory: system``, a 4 KiB threshold and two
regions per operator, so that sizes on both sides of the threshold, growth beyond the pool's
regions and the fallback to the HTTP body when both regions are busy all happen here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from pathlib import Path

import dask.config
import numpy as np
import pytest

from tdask import Deployment, InvalidRequestError, OperatorConfig, RemoteOperator
from tdask.hello_world import MODEL_REPOSITORY
from tdask.host import PLUGIN_NAME
from tests.conftest import assert_no_children, run_async, store_stats, wait_for

pytestmark = pytest.mark.timeout(240)

TEST_MODELS = os.path.join(os.path.dirname(__file__), "models")
SETTINGS = {
    # Shared memory is the subprocess mode's (in process, Triton reads tdask's buffers directly).
    "tdask.triton.mode": "subprocess",
    "tdask.triton.shared-memory": "system",
    "tdask.triton.shared-memory-threshold": "4KiB",
    "tdask.triton.shared-memory-slots": 2,
}


def _server(dask_worker):
    triton = dask_worker.plugins[PLUGIN_NAME]._triton
    return {"http": triton.http_url, "prefix": triton.shm_region_prefix, "pid": os.getpid()}


def server_info(client, operator="dtypes"):
    """The Triton server (HTTP address, shared-memory prefix) and pid of the worker hosting ``operator``."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    (address,) = [a for a, w in workers.items() if str(w["name"]).startswith(f"{operator}.")]
    return client.run(_server, workers=[address])[address]


def regions(http: str) -> list[dict]:
    """The system shared-memory regions Triton has registered (its own status call)."""
    with urllib.request.urlopen(f"http://{http}/v2/systemsharedmemory/status", timeout=10) as reply:
        return json.loads(reply.read())


def shm_files(prefix: str) -> list[str]:
    return [str(p) for p in Path("/dev/shm").glob(f"{prefix}io-*")]


@pytest.fixture(scope="module")
def deployment():
    encoder = OperatorConfig(name="encoder", implementation="triton", repository=MODEL_REPOSITORY)
    dtypes = OperatorConfig(name="dtypes", implementation="triton", repository=TEST_MODELS, max_inflight_requests=8)
    with dask.config.set(SETTINGS), Deployment([encoder, dtypes], dashboard_address=None) as dep:
        yield dep
    assert_no_children()


def _dtype_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = max(1, n // 100) if n else 0
    return {
        "a": rng.standard_normal((rows, 100 if n else 3)).astype(np.float32),
        "b": rng.integers(-100, 100, n, dtype=np.int8),
        "c": rng.standard_normal(n).astype(np.float16),
        "d": rng.integers(0, 2, n).astype(bool),
        "e": rng.integers(0, 2**63, n, dtype=np.uint64),
    }


def _check_dtypes(inputs, outputs, k=1):
    np.testing.assert_array_equal(outputs["a_out"], inputs["a"][::-1] * 2)
    np.testing.assert_array_equal(outputs["b_out"], -inputs["b"])
    np.testing.assert_array_equal(outputs["c_out"], inputs["c"] + np.float16(1))
    np.testing.assert_array_equal(outputs["d_out"], ~inputs["d"])
    np.testing.assert_array_equal(outputs["e_out"], np.tile(inputs["e"], k))
    assert outputs["sizes"].tolist() == [inputs[n].size for n in "abcde"]
    for name in ("a_out", "b_out", "c_out", "d_out", "e_out"):
        assert outputs[name].dtype == inputs[name[0]].dtype, name


@pytest.mark.cluster
@pytest.mark.parametrize("n", [0, 10, 3_000, 300_000])
def test_dtypes_and_sizes_round_trip(deployment, n):
    """Below and above the threshold, every dtype comes back exact, and the regions are used."""
    inputs = _dtype_inputs(n, n)
    response = RemoteOperator("dtypes", client=deployment.client).infer(inputs=inputs)
    _check_dtypes(inputs, response.outputs)
    if n >= 3_000:
        assert regions(server_info(deployment.client)["http"]), "large tensors went through registered regions"


@pytest.mark.cluster
def test_outputs_larger_than_the_regions_grow_them(deployment):
    """An output 16 times the input: more than the first guess (retried with room) and than any region so far."""
    info = server_info(deployment.client, "encoder")
    before = max((r["byte_size"] for r in regions(info["http"])), default=0)
    data = np.arange(200_000, dtype=np.int64)
    encoder = RemoteOperator("encoder", client=deployment.client)
    for copies in (16, 24):  # 25.6 MB, then 38.4 MB: a retry with more room, then a larger region
        response = encoder.infer(inputs={"input": data}, parameters={"input_copies": copies})
        np.testing.assert_array_equal(response.outputs["output"], np.invert(np.tile(data, copies)))
    sizes = [r["byte_size"] for r in regions(info["http"])]
    assert max(sizes) >= 24 * data.nbytes > before, sizes
    assert len(sizes) <= 2 * 2, "at most two regions per operator"


@pytest.mark.cluster
def test_concurrent_requests_more_than_the_regions(deployment):
    """Twelve requests at once on two regions: each answer is its own (the rest took the HTTP body)."""

    async def go(client):
        op = RemoteOperator("dtypes", client=client)
        inputs = [_dtype_inputs(20_000 + i, i) for i in range(12)]
        responses = await asyncio.gather(
            *(op.infer(inputs=x, parameters={"k": 1 + i % 3}) for i, x in enumerate(inputs))
        )
        return inputs, responses

    inputs, responses = run_async(deployment.scheduler_address, go)
    for i, (x, r) in enumerate(zip(inputs, responses, strict=True)):
        _check_dtypes(x, r.outputs, k=1 + i % 3)


@pytest.mark.cluster
def test_no_region_name_is_left_in_dev_shm(deployment):
    """Names are unlinked as soon as Triton mapped the region: /dev/shm holds none while serving."""
    info = server_info(deployment.client)
    RemoteOperator("dtypes", client=deployment.client).infer(inputs=_dtype_inputs(50_000, 1))
    assert regions(info["http"])
    assert shm_files(info["prefix"]) == []


@pytest.mark.cluster
def test_bad_inputs_are_typed_errors_naming_operator_and_request(deployment):
    encoder = RemoteOperator("encoder", client=deployment.client)
    large = np.arange(100_000, dtype=np.int64)
    with pytest.raises(InvalidRequestError, match="input_copies") as caught:  # the model refuses it (shm path)
        encoder.infer(inputs={"input": large}, parameters={"input_copies": "x"})
    assert caught.value.operator == "encoder" and caught.value.request_id
    with pytest.raises(InvalidRequestError) as caught:  # wrong dtype: refused before any region
        encoder.infer(inputs={"input": large.astype(np.float32)})
    assert caught.value.operator == "encoder" and caught.value.request_id
    ok = encoder.infer(inputs={"input": large})
    np.testing.assert_array_equal(ok.outputs["output"], np.invert(large))


@pytest.mark.cluster
def test_triton_that_lost_its_regions_still_answers(deployment):
    """Every region unregistered behind tdask's back (as after a server restart): the request is
    answered (in the body), and the next ones use fresh regions."""
    info = server_info(deployment.client)
    op = RemoteOperator("dtypes", client=deployment.client)
    op.infer(inputs=_dtype_inputs(50_000, 2))
    assert regions(info["http"])
    urllib.request.urlopen(
        urllib.request.Request(f"http://{info['http']}/v2/systemsharedmemory/unregister", data=b"", method="POST"),
        timeout=10,
    ).close()
    assert regions(info["http"]) == []
    for seed in (3, 4):
        x = _dtype_inputs(50_000, seed)
        _check_dtypes(x, op.infer(inputs=x).outputs)
    assert regions(info["http"]), "fresh regions were registered"


@pytest.mark.cluster
def test_store_counts_no_host_copies_for_host_tensors(deployment):
    stats = store_stats(deployment.client)
    assert all(s["host_copy_bytes"] == 0 and s["host_copies"] == 0 for s in stats.values()), stats


@pytest.mark.cluster
def test_teardown_and_sigkill_leave_no_region():
    """A SIGKILLed worker leaves no /dev/shm region of its server; a closed one unregistered its own."""
    encoder = OperatorConfig(name="encoder", implementation="triton", repository=MODEL_REPOSITORY)
    data = np.arange(100_000, dtype=np.int64)
    with dask.config.set(SETTINGS), Deployment([encoder], dashboard_address=None) as dep:
        first = server_info(dep.client, "encoder")
        RemoteOperator("encoder", client=dep.client).infer(inputs={"input": data})
        assert regions(first["http"])
        os.kill(first["pid"], signal.SIGKILL)

        def restarted() -> bool:
            try:
                return server_info(dep.client, "encoder")["pid"] != first["pid"]
            except Exception:  # the dead worker is still listed, or none is yet
                return False

        wait_for(restarted, timeout=90, message="no fresh worker")
        wait_for(lambda: not list(Path("/dev/shm").glob(f"{first['prefix']}*")), timeout=15, message="regions left")
        second = server_info(dep.client, "encoder")
        response = RemoteOperator("encoder", client=dep.client).infer(inputs={"input": data}, timeout=120)
        np.testing.assert_array_equal(response.outputs["output"], np.invert(data))
        assert regions(second["http"])
    assert not list(Path("/dev/shm").glob(f"{second['prefix']}*"))


def test_a_stateful_model_never_gets_a_guessed_output_region():
    """A too-small guess means calling the model again; a sequence-batched model must not be:
    its variable-size outputs come in the HTTP body, fixed-size ones still use the region."""
    from tdask.triton.shared_memory import ShmTransport

    specs = {"VAR": ("FP32", [-1]), "FIXED": ("FP32", [4096])}
    inputs = {"IN": (np.zeros(100_000, np.float32), "FP32")}
    stateless = ShmTransport(None, specs, threshold=1024)  # type: ignore[arg-type]  # plan() needs no pool
    stateful = ShmTransport(None, specs, threshold=1024, may_call_twice=False)  # type: ignore[arg-type]
    assert set(stateless.plan(inputs)[1]) == {"VAR", "FIXED"}
    shm_in, shm_out, _ = stateful.plan(inputs)
    assert set(shm_in) == {"IN"} and set(shm_out) == {"FIXED"}
