"""Decoupled (streaming) Triton models as streaming operators: every response, in order, cancellation."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
from functools import partial

import dask
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tdask import Deployment, InvalidRequestError, OperatorConfig, RemoteOperator, RequestTimeoutError
from tests.conftest import ROOT, assert_no_children, run_async, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

TEST_MODELS = os.path.join(os.path.dirname(__file__), "models")


@pytest.fixture(scope="module", params=["subprocess", "in-process"])
def client(request):
    # tests/models/counter: decoupled; streams "count" responses, then an empty final one.
    counter = OperatorConfig(name="counter", implementation="triton", repository=TEST_MODELS, max_inflight_requests=4)
    with (
        dask.config.set({"tdask.triton.mode": request.param}),
        Deployment([(counter, 1)], dashboard_address="127.0.0.1:0") as deployment,
    ):
        yield deployment.client
    assert_no_children()


def _count(n: int) -> dict[str, np.ndarray]:
    return {"count": np.array([n], dtype=np.int32)}


def test_every_response_reaches_the_caller_in_order_with_the_final_flag(client):
    counter = RemoteOperator("counter", client=client)
    responses = list(counter.stream(inputs=_count(5)))
    assert [r.outputs["i"].tolist() for r in responses[:-1]] == [[0], [1], [2], [3], [4]]
    assert [r.final for r in responses] == [False] * 5 + [True]
    assert responses[-1].outputs == {}  # Triton's empty final response
    # infer: the last response that carried outputs.
    assert counter.infer(inputs=_count(3)).outputs["i"].tolist() == [2]
    # No responses but the final one.
    assert [(r.final, r.outputs) for r in counter.stream(inputs=_count(0))] == [(True, {})]


def test_concurrent_streams_stay_separate_and_ordered(client):
    async def go(c):
        counter = RemoteOperator("counter", client=c)

        async def one(n):
            return [r.outputs["i"].item() async for r in counter.stream(inputs=_count(n)) if not r.final]

        return await asyncio.gather(*(one(n) for n in (3, 7, 1, 12)))

    got = run_async(client.scheduler.address, go)
    assert got == [list(range(n)) for n in (3, 7, 1, 12)]


def test_leaving_the_stream_cancels_the_model_s_work(client, tmp_path):
    """The model polls is_cancelled(): it stops long before its 1000 responses, and says so."""
    counter = RemoteOperator("counter", client=client)
    marker = tmp_path / "sent"
    stream = counter.stream(inputs=_count(1000), parameters={"delay": 0.01, "marker": str(marker)})
    assert [next(stream).outputs["i"].item() for _ in range(3)] == [0, 1, 2]
    stream.close()  # leaving the loop early cancels the request
    sent = int(wait_for(lambda: marker.exists() and marker.read_text(), timeout=20))
    assert 3 <= sent < 200, sent
    # The operator serves on.
    assert counter.infer(inputs=_count(2)).outputs["i"].tolist() == [1]


def test_cancelling_one_of_a_batch_stops_only_that_one(client, tmp_path):
    """Two requests in one batch (max_inflight 4): cancelling one sets its request.cancelled,
    which cancels its gRPC call; the other streams to its end."""
    marker = tmp_path / "cancelled"

    async def go(c):
        counter = RemoteOperator("counter", client=c)
        keep = counter.stream(inputs=_count(40), parameters={"delay": 0.01})
        drop = counter.stream(inputs=_count(1000), parameters={"delay": 0.01, "marker": str(marker)})
        kept = asyncio.ensure_future(_collect(keep))
        assert (await drop.__anext__()).outputs["i"].item() == 0
        await drop.aclose()
        return await kept

    got = run_async(client.scheduler.address, go)
    assert got == list(range(40))
    sent = int(wait_for(lambda: marker.exists() and marker.read_text(), timeout=20))
    assert sent < 200, sent


async def _collect(stream):
    async with stream:
        return [r.outputs["i"].item() async for r in stream if not r.final]


def test_errors_are_typed_and_name_operator_and_request(client):
    counter = RemoteOperator("counter", client=client)
    with pytest.raises(InvalidRequestError, match="INT64") as info:
        counter.infer(inputs={"count": np.array([3], dtype=np.int64)}, request_id="bad-dtype")
    assert (info.value.operator, info.value.request_id) == ("counter", "bad-dtype")
    with pytest.raises(InvalidRequestError, match="missing"):
        counter.infer(inputs={})
    with pytest.raises(InvalidRequestError, match="reserved parameter"):
        counter.infer(inputs=_count(1), parameters={"triton_enable_empty_final_response": False})
    with pytest.raises(RequestTimeoutError) as timeout_info:
        list(counter.stream(inputs=_count(100), parameters={"delay": 0.05}, timeout=0.5, request_id="slow"))
    assert timeout_info.value.request_id == "slow"
    assert counter.infer(inputs=_count(1)).outputs["i"].tolist() == [0]


def test_gateway_streams_a_decoupled_model_over_grpc(client, tmp_path):
    log = tmp_path / "gateway.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tdask.gateway", "--scheduler-address", client.scheduler.address]
            + ["--http-port", "0", "--grpc-port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
    try:
        match = wait_for(
            lambda: (
                (proc.poll() is None or pytest.fail(log.read_text()))
                and re.search(r"gRPC 127\.0\.0\.1:(\d+)", log.read_text())
            ),
            timeout=60,
            message=lambda: f"the gateway never said where it listens: {log.read_text()}",
        )
        responses: queue.Queue = queue.Queue()

        def callback(out, result, error):
            out.put(error if error is not None else result)

        with grpcclient.InferenceServerClient(f"127.0.0.1:{match[1]}") as triton:
            triton.start_stream(callback=partial(callback, responses))
            inp = grpcclient.InferInput("count", [1], "INT32")
            inp.set_data_from_numpy(np.array([4], dtype=np.int32))
            triton.async_stream_infer("counter", [inp], request_id="c1", enable_empty_final_response=True)
            got = [responses.get(timeout=30) for _ in range(5)]
            triton.stop_stream()
        assert [r.as_numpy("i").tolist() for r in got[:-1]] == [[0], [1], [2], [3]]
        assert got[-1].as_numpy("i") is None
        finals = [r.get_response().parameters["triton_final_response"].bool_param for r in got]
        assert finals == [False] * 4 + [True]
        assert {r.get_response().id for r in got} == {"c1"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
