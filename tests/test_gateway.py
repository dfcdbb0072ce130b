"""The KServe v2 gateway: Triton's own clients (tritonclient.http and .grpc, unchanged) call tdask operators."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bench.gateway import start_gateway
from tdask import Deployment, OperatorConfig
from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators
from tests.conftest import assert_no_children

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    group = TritonGroup(workers=1, max_inflight=4, instances=1, kind="CPU")
    operators = hello_world_operators(
        encoders=group, decoders=group, encoder_decoders=PythonGroup(workers=1, max_inflight=8)
    )
    operators += [
        (OperatorConfig(name="streamer", implementation="tests.operators:Streamer"), 1),
        (OperatorConfig(name="echo", implementation="tests.operators:Echo"), 1),
    ]
    log = tmp_path_factory.mktemp("gateway") / "out.txt"
    with Deployment(operators, dashboard_address="127.0.0.1:0") as deployment:
        address = deployment.client.scheduler.address
        proc, http, grpc = start_gateway(address, str(log))
        try:
            yield {"http": http, "grpc": grpc, "proc": proc, "address": address}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
    assert_no_children()


def test_a_gateway_on_uvloop_serves_both_protocols(gateway, tmp_path):
    """``--event-loop uvloop``: the gateway says which loop it runs, and serves HTTP and gRPC."""
    import tritonclient.grpc as grpcclient

    log = tmp_path / "uvloop.txt"
    proc, http, grpc = start_gateway(gateway["address"], str(log), "--event-loop", "uvloop")
    try:
        data = _data(10)
        with httpclient.InferenceServerClient(http) as client:
            inp = httpclient.InferInput("input", list(data.shape), "INT64")
            inp.set_data_from_numpy(data, binary_data=True)
            np.testing.assert_array_equal(client.infer("encoder_decoder", [inp]).as_numpy("output"), data)
        with grpcclient.InferenceServerClient(grpc) as client:
            inp = grpcclient.InferInput("input", list(data.shape), "INT64")
            inp.set_data_from_numpy(data)
            np.testing.assert_array_equal(client.infer("encoder_decoder", [inp]).as_numpy("output"), data)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert "event loop: uvloop" in log.read_text()


def _data(n=1000):
    return np.random.default_rng(n).integers(-(2**62), 2**62, size=n, dtype=np.int64)


@pytest.mark.parametrize("binary", [True, False])
def test_http_client_calls_the_hello_world(gateway, binary):
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("encoder_decoder")
        assert not client.is_model_ready("nobody")
        assert client.get_model_metadata("encoder_decoder")["versions"] == ["1"]
        data = _data()
        inp = httpclient.InferInput("input", list(data.shape), "INT64")
        inp.set_data_from_numpy(data, binary_data=binary)
        out = httpclient.InferRequestedOutput("output", binary_data=binary)
        result = client.infer("encoder_decoder", [inp], outputs=[out], request_id="mine")
        np.testing.assert_array_equal(result.as_numpy("output"), data)
        assert result.get_response()["id"] == "mine"
        # No outputs named: all of them (binary, test_http_outputs_named_by_none_come_back_binary
        # checks the wire); response parameters come back.
        result = client.infer("encoder_decoder", [inp])
        np.testing.assert_array_equal(result.as_numpy("output"), data)
        assert set(result.get_response()["parameters"]) == {"encoder", "decoder"}


def _post_infer(address: str, model: str, body: bytes, headers: dict[str, str]):
    """POST an infer request over plain HTTP: (status, headers, JSON header, binary rest)."""
    connection = http.client.HTTPConnection(address, timeout=60)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        length = response.getheader("Inference-Header-Content-Length")
        split = int(length) if length is not None else len(raw)
        return response.status, response, json.loads(raw[:split]), raw[split:]
    finally:
        connection.close()


def test_http_outputs_named_by_none_come_back_binary(gateway):
    """tritonclient.http names no outputs and asks for binary_data_output: every output comes
    back in Triton's binary form (its size in the JSON, its bytes after it), not as JSON data;
    a request that asks for nothing gets JSON data (the KServe default)."""
    data = _data()
    inp = httpclient.InferInput("input", list(data.shape), "INT64")
    inp.set_data_from_numpy(data, binary_data=True)
    # Exactly what tritonclient.http.InferenceServerClient.infer sends with outputs=None.
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp])
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    status, response, header, rest = _post_infer(gateway["http"], "encoder_decoder", body, headers)
    assert status == 200, header
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert response.getheader("Inference-Header-Content-Length") is not None
    (output,) = header["outputs"]
    assert output["name"] == "output" and output["datatype"] == "INT64" and output["shape"] == [1000], output
    assert "data" not in output, output
    assert output["parameters"]["binary_data_size"] == data.nbytes == len(rest), output
    np.testing.assert_array_equal(np.frombuffer(rest, dtype="<i8"), data)

    # No binary_data_output: JSON through and through.
    plain = json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}]})
    status, response, header, rest = _post_infer(
        gateway["http"], "encoder_decoder", plain.encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, header
    assert response.getheader("Inference-Header-Content-Length") is None and rest == b""
    assert header["outputs"][0]["data"] == [1, 2, 3], header


def test_grpc_client_calls_the_hello_world(gateway):
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("encoder_decoder") and not client.is_model_ready("nobody")
        assert client.get_model_metadata("encoder_decoder").versions == ["1"]
        data = _data(100_000)  # over tdask's inline threshold: by reference between workers
        inp = grpcclient.InferInput("input", list(data.shape), "INT64")
        inp.set_data_from_numpy(data)
        result = client.infer("encoder_decoder", [inp], request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("output"), data)
        assert result.get_response().id == "r1"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bytes_and_parameters_round_trip(gateway, protocol):
    module = httpclient if protocol == "http" else grpcclient
    text = np.array([b"abc", "\u00e9".encode(), b""], dtype=object)
    with module.InferenceServerClient(gateway[protocol]) as client:
        inp = module.InferInput("text", [3], "BYTES")
        inp.set_data_from_numpy(text)
        result = client.infer("echo", [inp], parameters={"k": "v", "n": 3})
        assert result.as_numpy("text").tolist() == text.tolist()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_errors_are_kserve_errors_naming_the_model(gateway, protocol):
    module = httpclient if protocol == "http" else grpcclient
    with module.InferenceServerClient(gateway[protocol]) as client:
        inp = module.InferInput("input", [3], "INT64")
        inp.set_data_from_numpy(np.arange(3, dtype=np.int64))
        with pytest.raises(InferenceServerException, match="nobody"):
            client.infer("nobody", [inp])
        bad = module.InferInput("wrong", [3], "INT64")
        bad.set_data_from_numpy(np.arange(3, dtype=np.int64))
        with pytest.raises(InferenceServerException, match="missing input 'input'"):
            client.infer("encoder_decoder", [bad])
        wrong_type = module.InferInput("input", [3], "INT32")
        wrong_type.set_data_from_numpy(np.arange(3, dtype=np.int32))
        with pytest.raises(InferenceServerException, match="INT32"):
            client.infer("encoder", [wrong_type])


def test_grpc_stream_carries_every_response_in_order(gateway):
    responses: queue.Queue = queue.Queue()

    def callback(out, result, error):
        out.put(error if error is not None else result)

    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        client.start_stream(callback=partial(callback, responses))
        inp = grpcclient.InferInput("x", [1], "INT64")
        inp.set_data_from_numpy(np.array([0], dtype=np.int64))
        client.async_stream_infer("streamer", [inp], request_id="s1", parameters={"count": 4})
        got = [responses.get(timeout=30) for _ in range(4)]
        assert [r.as_numpy("i").tolist() for r in got] == [[0], [1], [2], [3]]
        finals = [r.get_response().parameters["triton_final_response"].bool_param for r in got]
        assert finals == [False, False, False, True]
        client.async_stream_infer("nobody", [inp], request_id="s2")
        error = responses.get(timeout=30)
        assert isinstance(error, InferenceServerException) and "nobody" in str(error)
        client.stop_stream()


def test_unreachable_scheduler_is_one_line_within_seconds():
    # Through the tdask group (`tdask gateway`), which loads the command lazily.
    args = ["-c", "from tdask.cli import main; main()", "gateway", "--scheduler-address", "tcp://127.0.0.1:1"]
    run = subprocess.run(
        [sys.executable, *args, "--http-port", "0", "--grpc-port", "0", "--connect-timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot serve tcp://127.0.0.1:1" in lines[0], run.stderr
