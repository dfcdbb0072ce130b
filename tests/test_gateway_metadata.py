"""The gateway's metadata, config, statistics, repository and the rest of Triton's protocol.

Against one real deployment (a batching Triton model, a Python operator that declares its
signature on its class, one that declares it in its config, one that declares none) and a real
``python -m tdask.gateway``, with tritonclient.http and tritonclient.grpc unchanged.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bench.gateway import start_gateway
from tdask import Deployment, OperatorConfig
from tdask.gateway.kserve import EXTENSIONS, model_statistics, repository_index
from tdask.protocol.signature import check_inputs, make_signature, triton_signature
from tests.conftest import assert_no_children, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "models")

TEXT = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    operators = [
        OperatorConfig(name="double", implementation="triton", repository=MODELS, max_inflight_requests=4),
        OperatorConfig(name="countdown", implementation="tests.operators:Countdown", max_inflight_requests=4),
        OperatorConfig(name="echo", implementation="tests.operators:Echo"),
        OperatorConfig(name="echo_typed", implementation="tests.operators:Echo", inputs=TEXT, outputs=TEXT),
    ]
    log = tmp_path_factory.mktemp("gateway") / "out.txt"
    with Deployment(operators, dashboard_address=None) as deployment:
        proc, http_address, grpc_address = start_gateway(deployment.client.scheduler.address, str(log))
        try:
            yield {"http": http_address, "grpc": grpc_address}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
    assert_no_children()


def _request(address: str, method: str, path: str, body: bytes | None = None):
    """(status, content type, body) of one plain HTTP request."""
    connection = http.client.HTTPConnection(address, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


# -- metadata and config --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_triton_model_shows_its_real_metadata_and_config(gateway, protocol):
    if protocol == "http":
        with httpclient.InferenceServerClient(gateway["http"]) as client:
            metadata = client.get_model_metadata("double")
            config = client.get_model_config("double")
    else:
        with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
            metadata = client.get_model_metadata("double", as_json=True)
            config = client.get_model_config("double", as_json=True)["config"]
            # protobuf's JSON form writes int64 as strings
            for tensor in metadata["inputs"] + metadata["outputs"]:
                tensor["shape"] = [int(d) for d in tensor["shape"]]
            for tensor in config["input"] + config["output"]:
                tensor["dims"] = [int(d) for d in tensor["dims"]]
    # As Triton shows a batching model: the batch dim in the metadata, not in the config.
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}], metadata
    assert metadata["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}], metadata
    assert metadata["versions"] == ["1"] and metadata["platform"] not in ("", "tdask"), metadata
    assert config["max_batch_size"] == 8, config
    assert config["backend"] == "python", config
    assert config["input"] == [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}], config
    assert config["output"] == [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}], config


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_python_operators_show_their_declared_signature(gateway):
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        countdown = client.get_model_metadata("countdown")
        assert countdown["inputs"] == [{"name": "n", "datatype": "INT32", "shape": [1]}], countdown
        assert countdown["outputs"] == [{"name": "i", "datatype": "INT32", "shape": [1]}], countdown
        assert client.get_model_config("countdown")["model_transaction_policy"] == {"decoupled": True}
        typed = client.get_model_metadata("echo_typed")
        assert typed["inputs"] == TEXT and typed["outputs"] == TEXT, typed
        assert client.get_model_config("echo_typed")["input"] == [
            {"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}
        ]
        # Declares nothing: nothing is claimed.
        echo = client.get_model_metadata("echo")
        assert echo["inputs"] == [] and echo["outputs"] == [] and echo["platform"] == "tdask", echo
        with pytest.raises(InferenceServerException, match="nobody"):
            client.get_model_metadata("nobody")
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        metadata = client.get_model_metadata("countdown")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("n", "INT32", [1])]
        assert client.get_model_config("echo_typed").config.input[0].data_type == 13  # TYPE_STRING
        with pytest.raises(InferenceServerException, match="nobody") as info:
            client.get_model_config("nobody")
        assert info.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_requests_that_do_not_fit_the_signature_are_refused_at_the_gateway(gateway, protocol):
    module = httpclient if protocol == "http" else grpcclient

    def tensor(name, array, datatype):
        inp = module.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        return inp

    x = np.ones((2, 3), dtype=np.float32)
    with module.InferenceServerClient(gateway[protocol]) as client:
        ok = client.infer("double", [tensor("INPUT0", x, "FP32")])
        np.testing.assert_array_equal(ok.as_numpy("OUTPUT0"), 2 * x)
        cases = [
            ("double", [tensor("INPUT1", x, "FP32")], "has no input 'INPUT1'"),
            ("double", [tensor("INPUT0", x.astype(np.float64), "FP64")], "input 'INPUT0' is FP64"),
            ("double", [tensor("INPUT0", x.reshape(-1), "FP32")], r"input 'INPUT0' has shape \[6\]"),
            ("double", [tensor("INPUT0", np.ones((9, 1), np.float32), "FP32")], "at most 8"),
            ("echo_typed", [tensor("text", np.array([[b"a"]], dtype=object), "BYTES")], "input 'text' has shape"),
        ]
        for model, inputs, message in cases:
            with pytest.raises(InferenceServerException, match=message) as info:
                client.infer(model, inputs)
            if protocol == "grpc":
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
            else:
                assert "400" in str(info.value.status()), info.value
    # Refused before they travelled: the worker saw only the good request(s) and no failure.
    with httpclient.InferenceServerClient(gateway["http"]) as client:

        def stats():
            (entry,) = client.get_inference_statistics("double")["model_stats"]
            return entry if entry["inference_count"] >= 1 else None

        entry = wait_for(stats, timeout=20)
        assert entry["inference_stats"]["fail"]["count"] == 0, entry


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_stream_requests_are_checked_against_the_signature_too(gateway):
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        client.start_stream(callback=lambda result, error: responses.put(error if error is not None else result))
        wrong = grpcclient.InferInput("text", [1], "INT64")
        wrong.set_data_from_numpy(np.array([2], dtype=np.int64))
        client.async_stream_infer("echo_typed", [wrong])
        error = responses.get(timeout=30)
        assert isinstance(error, InferenceServerException) and "input 'text' is INT64" in str(error), error
        right = grpcclient.InferInput("text", [1], "BYTES")
        right.set_data_from_numpy(np.array([b"x"], dtype=object))
        client.async_stream_infer("echo_typed", [right])
        assert responses.get(timeout=30).as_numpy("text").tolist() == [b"x"]
        client.stop_stream()


# -- statistics -----------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_statistics_count_what_the_workers_served(gateway):
    n = np.array([2], dtype=np.int32)
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        for _ in range(3):
            inp = httpclient.InferInput("n", [1], "INT32")
            inp.set_data_from_numpy(n)
            client.infer("countdown", [inp])
        bad = httpclient.InferInput("n", [1], "INT32")
        bad.set_data_from_numpy(np.array([-1], dtype=np.int32))
        with pytest.raises(InferenceServerException, match="n must be >= 0"):
            client.infer("countdown", [bad])

        def counted():
            (entry,) = client.get_inference_statistics("countdown")["model_stats"]
            stats = entry["inference_stats"]
            return entry if stats["success"]["count"] == 3 and stats["fail"]["count"] == 1 else None

        entry = wait_for(counted, timeout=20, message="the statistics never counted 3 successes and 1 failure")
        assert entry["name"] == "countdown" and entry["version"] == "1"
        assert entry["inference_count"] == 3 and entry["execution_count"] == 3
        stats = entry["inference_stats"]
        assert stats["success"]["ns"] > 0 and stats["fail"]["ns"] > 0, stats
        assert stats["queue"]["count"] == stats["compute_infer"]["count"] == 4, stats
        assert entry["last_inference"] > 0
        every = client.get_inference_statistics()["model_stats"]
        assert {e["name"] for e in every} == {"double", "countdown", "echo", "echo_typed"}
        with pytest.raises(InferenceServerException, match="nobody"):
            client.get_inference_statistics("nobody")
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        (model,) = client.get_inference_statistics("countdown").model_stats
        assert model.inference_count == 3 and model.inference_stats.fail.count == 1
        assert model.inference_stats.success.ns == stats["success"]["ns"] or model.inference_count == 3


# -- repository, model control, server metadata ---------------------------------------------


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_repository_index_and_model_control(gateway):
    expected = [
        {"name": name, "version": "1", "state": "READY", "reason": ""}
        for name in ("countdown", "double", "echo", "echo_typed")
    ]
    x = np.ones((1, 2), dtype=np.float32)

    def infer(module, client):
        inp = module.InferInput("INPUT0", [1, 2], "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("double", [inp]).as_numpy("OUTPUT0")

    with httpclient.InferenceServerClient(gateway["http"]) as client:
        assert client.get_model_repository_index() == expected
        # A Python operator has no model to load; a name nobody hosts is unknown.
        with pytest.raises(InferenceServerException, match="not a Triton model"):
            client.load_model("countdown")
        with pytest.raises(InferenceServerException, match="nobody"):
            client.unload_model("nobody")
        client.unload_model("double")
        with pytest.raises(InferenceServerException, match="unloaded") as info:
            infer(httpclient, client)
        assert "503" in str(info.value.status())

        def unloaded():
            index = client.get_model_repository_index()
            entry = next(e for e in index if e["name"] == "double")
            return entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"] and index

        index = wait_for(
            unloaded, timeout=20, message=lambda: f"double never unloaded: {client.get_model_repository_index()}"
        )
        assert not client.is_model_ready("double")
        status, _, body = _request(gateway["http"], "POST", "/v2/repository/index", b'{"ready": true}')
        assert status == 200 and json.loads(body) == [e for e in expected if e["name"] != "double"], body
        client.load_model("double")
        np.testing.assert_array_equal(infer(httpclient, client), 2 * x)
        wait_for(lambda: client.get_model_repository_index() == expected, timeout=20)
        assert client.is_model_ready("double") and not client.is_model_ready("nobody")
    status, kind, body = _request(gateway["http"], "POST", "/v2/repository/models/countdown/load", b"{}")
    assert status == 501 and kind == "application/json" and "not a Triton model" in json.loads(body)["error"]
    # A config sent with the load is not applied: refused, not ignored.
    load = b'{"parameters": {"config": "{\\"max_batch_size\\": 2}"}}'
    status, kind, body = _request(gateway["http"], "POST", "/v2/repository/models/double/load", load)
    assert status == 501 and "load parameters (config, files) are not supported" in json.loads(body)["error"]
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        index = client.get_model_repository_index(as_json=True)["models"]
        assert [{k: e.get(k, "") for k in ("name", "version", "state", "reason")} for e in index] == expected
        with pytest.raises(InferenceServerException, match="not a Triton model") as info:
            client.unload_model("echo")
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        with pytest.raises(InferenceServerException, match="load parameters"):
            client.load_model("double", config='{"max_batch_size": 2}')
        client.unload_model("double")
        with pytest.raises(InferenceServerException, match="unloaded") as info:
            infer(grpcclient, client)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        client.load_model("double")
        np.testing.assert_array_equal(infer(grpcclient, client), 2 * x)
        assert client.is_model_ready("double") and not client.is_model_ready("nobody")


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_server_metadata_lists_the_same_extensions_on_both_protocols(gateway):
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        over_http = client.get_server_metadata()["extensions"]
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        over_grpc = list(client.get_server_metadata().extensions)
    assert over_http == over_grpc == list(EXTENSIONS)
    assert {"statistics", "model_configuration", "model_repository", "parameters", "binary_tensor_data"} <= set(
        over_http
    )


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_unsupported_endpoints_answer_kserve_errors(gateway):
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        assert client.get_system_shared_memory_status() == []
        assert client.get_cuda_shared_memory_status() == []
        with pytest.raises(InferenceServerException, match="shared memory is not supported"):
            client.register_system_shared_memory("r", "/r", 64)
        with pytest.raises(InferenceServerException, match="tracing is not supported"):
            client.get_trace_settings()
        with pytest.raises(InferenceServerException, match="log settings are not supported"):
            client.get_log_settings()
    for method, path in [
        ("GET", "/v2/trace/setting"),
        ("POST", "/v2/logging"),
        ("POST", "/v2/cudasharedmemory/region/r/register"),
    ]:
        status, kind, body = _request(gateway["http"], method, path, b"{}" if method == "POST" else None)
        assert status == 501 and kind == "application/json" and "not supported" in json.loads(body)["error"], path
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        assert len(client.get_system_shared_memory_status().regions) == 0
        assert len(client.get_cuda_shared_memory_status().regions) == 0
        with pytest.raises(InferenceServerException, match="shared memory is not supported") as info:
            client.register_system_shared_memory("r", "/r", 64)
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        with pytest.raises(InferenceServerException, match="tracing is not supported"):
            client.get_trace_settings()
        with pytest.raises(InferenceServerException, match="log settings are not supported"):
            client.get_log_settings()


# -- generate -------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_generate_and_generate_stream(gateway):
    # The signature types the JSON values (INT32 here) and adds the batch dim where there is one.
    status, kind, body = _request(gateway["http"], "POST", "/v2/models/double/generate", b'{"INPUT0": [1.5, 2]}')
    assert status == 200 and kind == "application/json", body
    assert json.loads(body) == {"model_name": "double", "model_version": "1", "OUTPUT0": [3.0, 4.0]}
    status, kind, body = _request(gateway["http"], "POST", "/v2/models/countdown/generate_stream", b'{"n": 3}')
    assert status == 200 and kind == "text/event-stream", body
    events = [json.loads(line[len("data: ") :]) for line in body.decode().split("\n\n") if line]
    assert [e["i"] for e in events] == [2, 1, 0], events
    # Undeclared: JSON's own types (a string is BYTES), the last response that has outputs.
    status, _, body = _request(
        gateway["http"], "POST", "/v2/models/echo/generate", b'{"text": "hi", "parameters": {"k": 1}}'
    )
    assert status == 200 and json.loads(body)["text"] == "hi", body
    # Errors: JSON, naming what is wrong.
    status, kind, body = _request(gateway["http"], "POST", "/v2/models/countdown/generate", b'{"n": "three"}')
    assert status == 400 and kind == "application/json" and "'n'" in json.loads(body)["error"], body
    status, _, body = _request(gateway["http"], "POST", "/v2/models/echo_typed/generate", b'{"text": 1000000000}')
    assert status == 400 and "BYTES values must be strings" in json.loads(body)["error"], body
    status, _, body = _request(gateway["http"], "POST", "/v2/models/countdown/generate", b'{"n": 100000000000}')
    assert status == 400 and "'n'" in json.loads(body)["error"], body
    status, _, body = _request(gateway["http"], "POST", "/v2/models/nobody/generate_stream", b"{}")
    assert status == 404 and "nobody" in json.loads(body)["error"], body
    status, _, body = _request(gateway["http"], "POST", "/v2/models/countdown/generate_stream", b'{"n": -1}')
    assert status == 400 and "n must be >= 0" in json.loads(body)["error"], body


# -- the gateway's own /metrics -------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_gateway_metrics_count_requests_per_model_and_protocol(gateway):
    x = np.ones((1, 2), dtype=np.float32)
    for module in (httpclient, grpcclient):
        protocol = "http" if module is httpclient else "grpc"
        with module.InferenceServerClient(gateway[protocol]) as client:
            inp = module.InferInput("INPUT0", [1, 2], "FP32")
            inp.set_data_from_numpy(x)
            client.infer("double", [inp])
            bad = module.InferInput("INPUT0", [1, 2], "FP64")
            bad.set_data_from_numpy(x.astype(np.float64))
            with pytest.raises(InferenceServerException):
                client.infer("double", [bad])
            with pytest.raises(InferenceServerException):
                client.infer("made_up_name", [inp])
    status, kind, body = _request(gateway["http"], "GET", "/metrics")
    assert status == 200 and kind.startswith("text/plain")
    text = body.decode()
    for protocol in ("http", "grpc"):
        labels = f'model="double",protocol="{protocol}",status="%s",version="1"'
        for status_name in ("OK", "INVALID_ARGUMENT"):
            line = 'tdask_gateway_requests_total{endpoint="infer",' + labels % status_name + "}"
            values = [float(row.rsplit(" ", 1)[1]) for row in text.splitlines() if row.startswith(line + " ")]
            assert values and values[0] >= 1, (line, text)
        line = (
            f'tdask_gateway_request_seconds_count{{endpoint="infer",model="double",protocol="{protocol}",version="1"}}'
        )
        values = [float(row.rsplit(" ", 1)[1]) for row in text.splitlines() if row.startswith(line + " ")]
        assert values and values[0] >= 2, (line, text)  # the good request and the refused one
        assert f'model="_unknown",protocol="{protocol}",status="NOT_FOUND"' in text
    assert "made_up_name" not in text


# -- the pieces, without a cluster ----------------------------------------------------------


def test_signature_checks_name_every_input_at_fault():
    signature = make_signature(
        [("a", "FP32", [-1, 2]), {"name": "b", "datatype": "INT64", "shape": [1], "optional": True}], []
    )
    assert check_inputs(signature, "m", {"a": ("FP32", (5, 2))}) is None
    assert check_inputs(signature, "m", {"a": ("FP32", (5, 2)), "b": ("INT64", (1,))}) is None
    message = check_inputs(signature, "m", {"c": ("FP32", (1,))})
    assert message is not None and "has no input 'c'" in message and "missing input 'a'" in message
    assert "expects [-1, 2]" in check_inputs(signature, "m", {"a": ("FP32", (5, 3))})
    assert "expects FP32" in check_inputs(signature, "m", {"a": ("FP16", (5, 2))})
    assert check_inputs(make_signature([], []), "m", {"anything": ("FP32", (1,))}) is None
    with pytest.raises(ValueError, match="datatype 'FLOAT'"):
        make_signature([("a", "FLOAT", [1])], [])
    with pytest.raises(ValueError, match="batch dim"):
        make_signature([("a", "FP32", [3])], [], max_batch_size=4)
    with pytest.raises(ValueError, match="operator 'x'"):
        OperatorConfig(name="x", implementation="tests.operators:Echo", inputs=[("a", "FP32", "3")])


def test_triton_signature_keeps_the_batch_dim_and_optional_inputs():
    metadata = {
        "name": "m",
        "platform": "python",
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "BYTES", "shape": [-1, 1]}],
    }
    config = {
        "backend": "python",
        "max_batch_size": 4,
        "input": [{"name": "a", "optional": True}],
        "model_transaction_policy": {"decoupled": True},
    }
    signature = triton_signature(metadata, config)
    assert signature["max_batch_size"] == 4 and signature["decoupled"] and signature["platform"] == "python"
    assert signature["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 4], "optional": True}]
    assert check_inputs(signature, "m", {}) is None  # optional
    assert "at most 4" in check_inputs(signature, "m", {"a": ("FP32", (5, 4))})


def test_statistics_and_index_from_registry_reports():
    histogram = [0] * 27
    wait, execute = [*histogram, 0.5], [*histogram, 1.5]
    wait[0] = execute[0] = 3
    report = {
        "outcomes": {"ok": 2, "InvalidRequestError": 1, "cancelled": 4},
        "last_ok": 12.5,
        "outcome_seconds": {"ok": 0.25, "InvalidRequestError": 0.5, "cancelled": 9.0},
        "latency": {"wait": wait, "execute": execute},
    }
    entry = model_statistics("m/2", [report, report])
    assert (entry["name"], entry["version"], entry["inference_count"]) == ("m", "2", 4)
    stats = entry["inference_stats"]
    assert stats["success"] == {"count": 4, "ns": 500_000_000}
    assert stats["fail"] == {"count": 2, "ns": 1_000_000_000}  # cancelled is no failure
    assert stats["queue"] == {"count": 6, "ns": 1_000_000_000} and stats["compute_infer"]["ns"] == 3_000_000_000
    assert entry["last_inference"] == 12500
    table = {
        "hosts": {"a/1": ["w"]},
        "operators": {
            "a/1": {"name": "a", "version": 1, "state": "ready", "reason": None},
            "b/1": {"name": "b", "version": 1, "state": "unavailable", "reason": "its workers left"},
            "c": {"name": "c", "version": None, "state": "failed", "reason": "setup failed: w: boom"},
        },
    }
    assert repository_index(table) == [
        {"name": "a", "version": "1", "state": "READY", "reason": ""},
        {"name": "b", "version": "1", "state": "UNAVAILABLE", "reason": "its workers left"},
        {"name": "c", "version": "", "state": "UNAVAILABLE", "reason": "setup failed: w: boom"},
    ]
    assert repository_index(table, ready_only=True) == [{"name": "a", "version": "1", "state": "READY", "reason": ""}]
