"""TritonCoreOperator on a real cluster: worker processes that each own a real Triton server.

Every test runs in both ``tdask.triton.mode``s: a ``tritonserver`` subprocess per worker, and
Triton's core inside the worker process (:mod:`tdask.triton.inprocess`).
"""

from __future__ import annotations

import os
import time

import dask
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from tdask import Deployment, InvalidRequestError, OperatorConfig, RemoteOperator, RequestTimeoutError
from tdask.hello_world import MODEL_REPOSITORY
from tests.conftest import assert_no_children, child_pids

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

TEST_MODELS = os.path.join(os.path.dirname(__file__), "models")
MODES = ["subprocess", "in-process"]


@pytest.fixture(scope="module", params=MODES)
def triton_mode(request):
    """The worker's Triton mode; the module's deployment is built once per mode."""
    with dask.config.set({"tdask.triton.mode": request.param}):
        yield request.param


@pytest.fixture(scope="module")
def client(triton_mode):
    encoder = OperatorConfig(
        name="encoder",
        implementation="triton",
        repository=MODEL_REPOSITORY,
        max_inflight_requests=4,
        parameters={
            "config": {
                "instance_group": [{"kind": "KIND_CPU", "count": 2}],
                "parameters": {"input_copies": "2"},  # the string shorthand
            }
        },
    )
    decoder = OperatorConfig(
        name="decoder", implementation="triton", repository=MODEL_REPOSITORY, max_inflight_requests=4
    )
    # tests/models/misbehaving: returns the wrong dtype or raises, on request.
    misbehaving = OperatorConfig(name="misbehaving", implementation="triton", repository=TEST_MODELS)
    operators = [(encoder, 1), (decoder, 1), (misbehaving, 1)]
    with Deployment(operators, dashboard_address="127.0.0.1:0") as deployment:
        yield deployment.client
    assert_no_children()


@pytest.mark.parametrize("size", [0, 10, 100_000])
def test_round_trip_through_both_models(client, size):
    data = np.random.default_rng(size).integers(-(2**62), 2**62, size=size, dtype=np.int64)
    encoder, decoder = RemoteOperator("encoder", client=client), RemoteOperator("decoder", client=client)

    encoded = encoder.infer(inputs={"input": data})
    assert encoded.outputs["input_copies"].tolist() == [2]  # from the config override
    np.testing.assert_array_equal(encoded.outputs["output"], np.invert(np.tile(data, 2)))

    decoded = decoder.infer(
        inputs={"input": encoded.outputs["output"], "input_copies": encoded.outputs["input_copies"]}
    )
    np.testing.assert_array_equal(decoded.outputs["output"], data)
    assert decoded.outputs["output"].dtype == np.int64


def test_request_parameters_reach_the_model(client):
    encoder = RemoteOperator("encoder", client=client)
    data = np.arange(7, dtype=np.int64)
    for value in (3, "3"):
        encoded = encoder.infer(inputs={"input": data}, parameters={"input_copies": value})
        assert encoded.outputs["input_copies"].tolist() == [3]
        np.testing.assert_array_equal(encoded.outputs["output"], np.invert(np.tile(data, 3)))


@pytest.mark.parametrize(
    ("inputs", "parameters", "expected"),
    [
        ({"input": np.arange(3, dtype=np.int32)}, None, ["INT32", "INT64"]),
        ({"input": np.arange(6, dtype=np.int64).reshape(2, 3)}, None, ["has shape [2, 3]", "expects [-1]"]),
        ({}, None, ["missing required input", "'input'"]),
        ({"input": np.arange(3, dtype=np.int64)}, {"input_copies": 0}, ["'input_copies'", "got 0"]),
        ({"input": np.arange(3, dtype=np.int64)}, {"nested": [1, 2]}, ["'nested'", "list"]),
        ({"input": np.arange(3, dtype=np.int64), "bogus": np.arange(3, dtype=np.int64)}, None, ["'bogus'"]),
        ({"input": np.arange(3, dtype=np.int64)}, {"input_copies": "many"}, ["'input_copies'", "many"]),
        ({"input": np.arange(3, dtype=np.int64)}, {"priority": 1}, ['"priority"', "reserved parameter"]),
    ],
    ids=[
        "dtype",
        "shape",
        "missing",
        "bad-copies",
        "unsupported-parameter",
        "extra-input",
        "malformed-parameter",
        "reserved-parameter",
    ],
)
def test_bad_requests_are_invalid_request_errors(client, inputs, parameters, expected):
    encoder = RemoteOperator("encoder", client=client)
    with pytest.raises(InvalidRequestError) as info:
        encoder.infer(inputs=inputs, parameters=parameters)
    assert info.value.operator == "encoder"
    for fragment in expected:
        assert fragment in str(info.value), str(info.value)


def test_deadline_becomes_a_request_timeout(client):
    encoder = RemoteOperator("encoder", client=client)
    began = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        # 1000 elements x 2 copies x 0.5 ms: the model would take a second.
        encoder.infer(inputs={"input": np.arange(1000, dtype=np.int64)}, parameters={"delay": 0.0005}, timeout=0.3)
    assert time.monotonic() - began < 5
    # The operator still serves afterwards.
    ok = encoder.infer(inputs={"input": np.arange(3, dtype=np.int64)})
    assert ok.outputs["input_copies"].tolist() == [2]


@pytest.fixture(scope="module")
def restarting(triton_mode):
    """One decoder worker (max_inflight_requests=1) in the module's Triton mode, shared by the tests
    that kill a part of it: each leaves it restarted with a fresh server, and checked serving. Its
    close after those restarts is prompt and leaves nothing behind."""
    before = child_pids()  # the module's deployment, when it is up
    decoder = OperatorConfig(name="decoder", implementation="triton", repository=MODEL_REPOSITORY)
    deployment = Deployment([(decoder, 1)], dashboard_address="127.0.0.1:0")
    deployment.start()
    try:
        yield deployment
    finally:
        closing = time.monotonic()
        deployment.close()
    assert time.monotonic() - closing < 15
    assert_no_children(ignore=before)


@pytest.mark.parametrize(
    "triton_mode, victim",
    [
        ("subprocess", "tritonserver"),
        ("subprocess", "triton_python_backend_stub"),
        ("subprocess", "worker"),
        ("in-process", "triton_python_backend_stub"),
        ("in-process", "worker"),
    ],
    indirect=["triton_mode"],
)
def test_killed_triton_process_restarts_the_worker_and_loses_nothing(restarting, triton_mode, victim):
    """SIGKILL the worker's tritonserver, a model's stub, or the worker itself under load: the
    worker restarts with a fresh server, every request is answered right, and nothing of the old
    server is left: no process (server, stubs) and no shared-memory region. In-process, Triton
    is the worker itself: its stubs and the worker are the victims."""
    import asyncio
    import os
    import signal
    from pathlib import Path

    import psutil

    from tdask.host import PLUGIN_NAME
    from tests.conftest import async_wait_for, run_async, wait_for

    deployment = restarting
    (worker_pid,) = deployment.client.run(os.getpid).values()
    (prefix,) = deployment.client.run(
        lambda dask_worker: dask_worker.plugins[PLUGIN_NAME]._triton.shm_region_prefix
    ).values()
    worker = psutil.Process(worker_pid)
    triton = [p for p in worker.children(recursive=True) if "triton" in p.name()]
    expected = (
        {"tritonserver", "triton_python_backend_stub"}
        if triton_mode == "subprocess"
        else {"triton_python_backend_stub"}
    )
    assert {p.name() for p in triton} >= expected, triton
    assert list(Path("/dev/shm").glob(f"{prefix}*")), "the stubs' shared memory is there"
    target = worker if victim == "worker" else next(p for p in triton if p.name() == victim)

    async def go(c):
        async def in_triton() -> int:
            stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
            return sum(s["decoder/1"]["inflight"] for s in stats.values())

        op = RemoteOperator("decoder", client=c)
        data = [np.arange(i, i + 1000, dtype=np.int64) for i in range(6)]
        tasks = [
            asyncio.create_task(op.infer(inputs={"input": np.invert(d)}, parameters={"delay": 0.0003}, timeout=120))
            for d in data
        ]
        await async_wait_for(in_triton, message="no request reached the decoder")  # the others queue behind it
        target.send_signal(signal.SIGKILL)
        responses = await asyncio.gather(*tasks)
        return data, responses

    data, responses = run_async(deployment.scheduler_address, go)
    for d, r in zip(data, responses, strict=True):
        np.testing.assert_array_equal(r.outputs["output"], d)
    (new_pid,) = deployment.client.run(os.getpid).values()
    assert new_pid != worker_pid, "the Nanny started a fresh worker (with a fresh Triton server)"

    def leftovers() -> list[str]:
        alive = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            old = proc.info["pid"] in {p.pid for p in triton} or prefix in cmdline
            if old and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.info['pid']} {cmdline[:100]}")
        return alive + [str(region) for region in Path("/dev/shm").glob(f"{prefix}*")]

    wait_for(lambda: not leftovers(), timeout=15, message=lambda: f"left of the old server: {leftovers()}")


_DTYPES = ["int8", "int32", "int64", "uint64", "float32", "float64", "bool"]


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(_DTYPES),
    shape=st.one_of(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5), st.tuples(st.integers(0, 20_000))),
    copies=st.one_of(st.integers(-2, 6), st.sampled_from(["2", "x", ""])),
)
def test_property_encoder_answers_or_refuses_clearly(client, dtype, shape, copies):
    """Any dtype, rank and copies value: a correct answer, or an InvalidRequestError; never anything else."""
    data = (
        np.zeros(shape, dtype=dtype) if dtype == "bool" else np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    )
    encoder = RemoteOperator("encoder", client=client)
    valid = dtype == "int64" and len(shape) == 1 and isinstance(copies, int) and copies >= 1
    if str(copies) == "2":
        valid = dtype == "int64" and len(shape) == 1
    try:
        response = encoder.infer(inputs={"input": data}, parameters={"input_copies": copies}, timeout=30)
    except InvalidRequestError as exc:
        assert not valid, f"a valid request was refused: {exc}"
        assert exc.operator == "encoder" and exc.request_id
        return
    assert valid, f"an invalid request was served: {dtype} {shape} copies={copies!r}"
    np.testing.assert_array_equal(response.outputs["output"], np.invert(np.tile(data, int(copies))))


def test_every_listener_is_loopback_triton_included(client, triton_mode):
    """Workers, nannies, scheduler and each worker's tritonserver bind 127.0.0.1 only (in-process: no Triton port)."""
    import psutil

    from tests.conftest import children

    listening = []
    for proc in [psutil.Process(), *children()]:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append((proc.name(), conn.laddr.ip, conn.laddr.port))
    assert any(name == "tritonserver" for name, _, _ in listening) == (triton_mode == "subprocess"), listening
    # gRPC binds 127.0.0.1 on a dual-stack socket, which shows as the IPv4-mapped form.
    assert {ip for _, ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    assert {name for name, ip, _ in listening if ip.startswith("::ffff:")} <= {"tritonserver"}, listening


def _gpu_reason() -> str | None:
    from tdask.cli import gpu_unavailable_reason

    return gpu_unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"KIND_GPU needs a usable GPU: {_gpu_reason()}")
def test_kind_gpu_models_round_trip():
    """The encoder and decoder as KIND_GPU instances (cupy on the instance's device)."""
    gpu = {"config": {"instance_group": [{"kind": "KIND_GPU", "count": 1}], "parameters": {"input_copies": "3"}}}
    encoder = OperatorConfig(name="encoder", implementation="triton", repository=MODEL_REPOSITORY, parameters=gpu)
    decoder = OperatorConfig(
        name="decoder",
        implementation="triton",
        repository=MODEL_REPOSITORY,
        parameters={"config": {"instance_group": [{"kind": "KIND_GPU", "count": 1}]}},
    )
    with Deployment([encoder, decoder], dashboard_address="127.0.0.1:0") as deployment:
        data = np.arange(100_000, dtype=np.int64)
        encoded = RemoteOperator("encoder", client=deployment.client).infer(inputs={"input": data})
        np.testing.assert_array_equal(encoded.outputs["output"], np.invert(np.tile(data, 3)))
        decoded = RemoteOperator("decoder", client=deployment.client).infer(inputs=encoded.outputs)
        np.testing.assert_array_equal(decoded.outputs["output"], data)


@pytest.mark.parametrize(
    "mode, message",
    [
        ("wrong-dtype", r"answered wrongly: output .output. as FP32 \(declared INT64\)"),
        ("raise", "misbehaving model raised on purpose"),
    ],
)
def test_misbehaving_model_gives_operator_error_and_keeps_serving(client, mode, message):
    """A model that returns the wrong dtype, or raises: OperatorError for the caller, worker serves on."""
    from tdask import OperatorError

    op = RemoteOperator("misbehaving", client=client)
    for _ in range(2):  # the same worker answers again, with the same typed error
        with pytest.raises(OperatorError, match=message) as info:
            op.infer(inputs={"input": np.arange(4, dtype=np.int64)}, parameters={"mode": mode}, timeout=30)
        assert info.value.operator == "misbehaving" and info.value.request_id


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "init, message",
    [("raise", "failed to initialize on purpose"), ("hang", "took longer than 3s and cannot be interrupted")],
)
def test_a_model_that_fails_or_hangs_in_load_fails_the_deployment_promptly(mode, init, message):
    """A model whose initialize raises, or never returns (past tdask.triton.load-timeout): the
    deployment's start fails naming the operator and Triton's reason (the worker's plugin cannot
    start: "the tdask deployment failed to start"), in seconds, and its close leaves nothing
    behind (a hung load breaks the worker's server: the worker restarts rather than hang, see
    test_triton_inprocess.py)."""
    before = child_pids()
    broken = OperatorConfig(
        name="misbehaving",
        implementation="triton",
        repository=TEST_MODELS,
        parameters={"config": {"parameters": {"init": init}}},
    )
    began = time.monotonic()
    with dask.config.set({"tdask.triton.mode": mode, "tdask.triton.load-timeout": "3s"}):
        with pytest.raises(RuntimeError, match="failed to start.*misbehaving: TritonServerError") as info:
            with Deployment([(broken, 1)], dashboard_address="127.0.0.1:0"):
                pass
    assert message in str(info.value)
    assert time.monotonic() - began < 90
    assert_no_children(ignore=before)
