"""Hostile requests to the KServe v2 gateway: sizes, lies, slow peers, too many peers, a lost scheduler.

The gateway runs as its own process (``python -m tdask.gateway``) with small limits and short
timeouts set by its flags; every malformed request must be answered with a KServe error (JSON
``{"error": ...}`` with 400/404/413, or gRPC ``INVALID_ARGUMENT``/``RESOURCE_EXHAUSTED``), never a
500, an HTML page or a traceback in its log, and its memory must not keep what it refused.
"""

from __future__ import annotations

import gzip
import http.client
import json
import queue
import resource
import select
import signal
import socket
import struct
import time
import zlib

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bench.gateway import start_gateway
from tdask import Deployment, OperatorConfig
from tests.conftest import assert_no_children, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

MiB = 1 << 20
LIMIT = 64 * MiB  # --max-request-bytes
INFLATED = 4 * MiB  # --max-inflated-bytes
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
MAX_CONNECTIONS = 40
FLAGS = [
    "--max-request-bytes",
    str(LIMIT),
    "--max-inflated-bytes",
    str(INFLATED),
    "--header-timeout",
    str(HEADER_TIMEOUT),
    "--body-timeout",
    str(BODY_TIMEOUT),
    "--max-connections",
    str(MAX_CONNECTIONS),
]


@pytest.fixture(scope="module")
def deployment():
    operators = [
        (OperatorConfig(name="echo", implementation="tests.operators:Echo"), 1),
        (OperatorConfig(name="fail", implementation="tests.operators:Fail", max_inflight_requests=64), 1),
    ]
    with Deployment(operators, dashboard_address=None) as dep:
        yield dep
    assert_no_children()


@pytest.fixture(scope="module")
def gateway(deployment, tmp_path_factory):
    log = tmp_path_factory.mktemp("gateway") / "out.txt"
    proc, http_address, grpc_address = start_gateway(deployment.client.scheduler.address, str(log), *FLAGS)
    try:
        gw = {"http": http_address, "grpc": grpc_address, "proc": proc, "log": log}
        with httpclient.InferenceServerClient(http_address) as client:  # warm: one call of each kind
            wait_for(client.is_server_ready, 60, 0.2, "the gateway never became ready")
            inp = httpclient.InferInput("x", [3], "INT64")
            inp.set_data_from_numpy(np.arange(3, dtype=np.int64))
            client.infer("echo", [inp])
        gw["rss"] = psutil.Process(proc.pid).memory_info().rss
        yield gw
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "Uncaught exception" not in text, text[-5000:]


def _request(address, method, path, body=None, headers=None, timeout=30):
    """(status, JSON body or None, raw body)."""
    connection = http.client.HTTPConnection(address, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return response.status, parsed, raw


def _kserve_error(status, parsed, raw, expected):
    assert status == expected, (status, raw[:300])
    assert isinstance(parsed, dict) and isinstance(parsed.get("error"), str), raw[:300]
    return parsed["error"]


def _raw(address, data: bytes, timeout=30.0) -> bytes:
    """Send ``data`` on a fresh socket and read until the gateway closes it."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status_and_json(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def _infer_head(address, length, extra=""):
    return (
        f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


# -- sizes --------------------------------------------------------------------------------


def test_an_oversized_body_is_refused_before_it_is_read(gateway):
    # Only the headers are sent: the 413 comes back at once, with the body unread.
    start = time.monotonic()
    response = _raw(gateway["http"], _infer_head(gateway["http"], 2 * 1024**3), timeout=20)
    status, body = _status_and_json(response)
    assert status == 413 and "limit" in body["error"], response[:300]
    assert time.monotonic() - start < 10

    # Chunked: refused as soon as it runs over, without a Content-Length to go by.
    host, port = gateway["http"].rsplit(":", 1)
    head = (
        f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: {gateway['http']}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"x" * MiB
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        sent, refused = 0, False
        try:
            while sent <= 2 * LIMIT:
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            refused = True
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    # The answer may be lost to the reset of a connection closed with unread data; if it
    # arrived, it is the KServe 413.
    if answer:
        status, body = _status_and_json(answer)
        assert status == 413, answer[:300]
    assert refused and sent < LIMIT + 32 * MiB, sent  # it stopped taking data (socket buffers aside)

    # gRPC: grpc's own limit, before the handler.
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        inp = grpcclient.InferInput("x", [LIMIT // 8 + 1024], "INT64")
        inp.set_data_from_numpy(np.zeros(LIMIT // 8 + 1024, dtype=np.int64))
        with pytest.raises(InferenceServerException) as info:
            client.infer("nobody", [inp])  # read whole, it would be NOT_FOUND
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value


def test_compressed_bodies_inflate_within_their_cap(gateway):
    request = json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}]}).encode()
    for encoding, body in (("gzip", gzip.compress(request)), ("deflate", zlib.compress(request))):
        status, parsed, raw = _request(
            gateway["http"], "POST", "/v2/models/echo/infer", body, {"Content-Encoding": encoding}
        )
        assert status == 200 and parsed["outputs"][0]["data"] == [1, 2, 3], raw[:300]
    # A bomb: 40 KB that inflates past the cap.
    bomb = gzip.compress(b" " * (INFLATED + MiB))
    assert len(bomb) < 50_000
    error = _kserve_error(
        *_request(gateway["http"], "POST", "/v2/models/echo/infer", bomb, {"Content-Encoding": "gzip"}), 413
    )
    assert str(INFLATED) in error
    # Not gzip at all, truncated gzip, an encoding nobody inflates.
    _kserve_error(
        *_request(gateway["http"], "POST", "/v2/models/echo/infer", b"junk", {"Content-Encoding": "gzip"}), 400
    )
    truncated = gzip.compress(request)[:-8]  # all the data, without gzip's CRC and size
    _kserve_error(
        *_request(gateway["http"], "POST", "/v2/models/echo/infer", truncated, {"Content-Encoding": "gzip"}), 400
    )
    _kserve_error(*_request(gateway["http"], "POST", "/v2/models/echo/infer", request, {"Content-Encoding": "br"}), 400)
    trailing = gzip.compress(request) + b"junk"
    _kserve_error(
        *_request(gateway["http"], "POST", "/v2/models/echo/infer", trailing, {"Content-Encoding": "gzip"}), 400
    )


def _peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_bytes_element_counts_are_checked_before_any_allocation(gateway):
    before = _peak_rss(gateway["proc"].pid)
    # 113 bytes announcing 100 million BYTES elements (the request).
    header = {
        "inputs": [{"name": "t", "datatype": "BYTES", "shape": [100_000_000], "parameters": {"binary_data_size": 8}}]
    }
    encoded = json.dumps(header).encode()
    body = encoded + struct.pack("<I", 4) + b"abcd"
    start = time.monotonic()
    error = _kserve_error(
        *_request(
            gateway["http"],
            "POST",
            "/v2/models/echo/infer",
            body,
            {"Inference-Header-Content-Length": str(len(encoded))},
        ),
        400,
    )
    assert "100000000 elements announced in 8 bytes" in error and time.monotonic() - start < 5
    # JSON BYTES data: numbers are not strings (bytes(N) would allocate N bytes).
    for data in ([10**8], [[1, 2]], [None]):
        body = json.dumps({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": data}]})
        _kserve_error(*_request(gateway["http"], "POST", "/v2/models/echo/infer", body), 400)
    # gRPC: the same BYTES lie in raw_input_contents, and in a negative dimension.
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        channel_request = grpcclient.service_pb2.ModelInferRequest(model_name="echo")
        channel_request.inputs.add(name="t", datatype="BYTES", shape=[100_000_000])
        channel_request.raw_input_contents.append(struct.pack("<I", 4) + b"abcd")
        with pytest.raises(Exception) as info:
            client._client_stub.ModelInfer(channel_request, timeout=30)
        assert "INVALID_ARGUMENT" in str(info.value.code()), info.value
        assert "100000000 elements announced in 8 bytes" in info.value.details()
        negative = grpcclient.service_pb2.ModelInferRequest(model_name="echo")
        negative.inputs.add(name="t", datatype="INT64", shape=[-2, -4])
        negative.raw_input_contents.append(b"\0" * 64)
        with pytest.raises(Exception) as info:
            client._client_stub.ModelInfer(negative, timeout=30)
        assert "INVALID_ARGUMENT" in str(info.value.code()), info.value
    # The peak: a 100-million-element object array (800 MB) would have raised it, even if freed.
    assert _peak_rss(gateway["proc"].pid) - before < 100 * MiB, (before / MiB, _peak_rss(gateway["proc"].pid) / MiB)


# -- lies and malformed JSON ----------------------------------------------------------------


def _binary_request(size_field, header_length=None, trailing=b""):
    payload = np.arange(3, dtype=np.int64).tobytes()
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": size_field}}]}
    ).encode()
    length = str(len(header)) if header_length is None else header_length
    return header + payload + trailing, {"Inference-Header-Content-Length": length}


@pytest.mark.parametrize(
    "case",
    [
        ("negative header length", 24, "-4", b""),
        ("header length past the body", 24, "99999", b""),
        ("header length not a number", 24, "12abc", b""),
        ("negative binary_data_size", -24, None, b""),
        ("binary_data_size past the body", 4000, None, b""),
        ("binary_data_size not a number", "24", None, b""),
        ("trailing junk", 24, None, b"junk"),
    ],
    ids=lambda case: case[0],
)
def test_lying_binary_sizes_are_400(gateway, case):
    _, size, length, trailing = case
    body, headers = _binary_request(size, length, trailing)
    _kserve_error(*_request(gateway["http"], "POST", "/v2/models/echo/infer", body, headers), 400)


@pytest.mark.parametrize("length", ["-4", "99999"])
def test_a_lying_header_length_on_a_json_body_is_400(gateway, length):
    # Read by what it says, -4 leaves exactly the JSON and 99999 all of it: both would parse.
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}).encode() + b"    "
    headers = {"Inference-Header-Content-Length": length}
    _kserve_error(*_request(gateway["http"], "POST", "/v2/models/echo/infer", body, headers), 400)


def test_the_honest_binary_request_still_works(gateway):
    body, headers = _binary_request(24)
    status, parsed, raw = _request(gateway["http"], "POST", "/v2/models/echo/infer", body, headers)
    assert status == 200 and parsed["outputs"][0]["data"] == [0, 1, 2], raw[:300]


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [], "parameters": ["a", "list"]},
        {"inputs": [], "parameters": "a string"},
        {"inputs": [], "parameters": {"big": 2**70}},
        {"inputs": [], "parameters": {"nested": {"a": 1}}},
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1], "parameters": [1]}]},
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [2**70], "data": [1]}]},
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": "3", "data": [1, 2, 3]}]},
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [2**70]}]},
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": ["one"]}]},
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}], "outputs": "x"},
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}], "outputs": [{"nom": "x"}]},
        {"inputs": "x"},
        {"inputs": [7]},
        ["not", "an", "object"],
    ],
    ids=lambda body: json.dumps(body)[:60],
)
def test_malformed_requests_are_400_not_500(gateway, body):
    _kserve_error(*_request(gateway["http"], "POST", "/v2/models/echo/infer", json.dumps(body)), 400)


def test_deeply_nested_json_is_400(gateway):
    body = (
        '{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": ' + "[" * 100_000 + "]" * 100_000 + "}]}"
    )
    _kserve_error(*_request(gateway["http"], "POST", "/v2/models/echo/infer", body), 400)


def test_grpc_parameters_of_any_kind_are_not_internal(gateway):
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        inp = grpcclient.InferInput("x", [1], "INT64")
        inp.set_data_from_numpy(np.array([1], dtype=np.int64))
        result = client.infer("echo", [inp], parameters={"u": 2**63 - 1, "s": "x", "b": True, "f": 0.5})
        assert result.as_numpy("x").tolist() == [1]


# -- routes and errors ----------------------------------------------------------------------


def test_unknown_routes_and_methods_are_kserve_errors(gateway):
    error = _kserve_error(*_request(gateway["http"], "GET", "/v2/nothing/here"), 404)
    assert "/v2/nothing/here" in error
    _kserve_error(*_request(gateway["http"], "GET", "/"), 404)
    status, parsed, raw = _request(gateway["http"], "DELETE", "/v2/health/live")
    assert status == 405 and isinstance(parsed, dict) and "error" in parsed, raw[:300]
    assert b"<html" not in raw.lower()
    # tritonclient reads the JSON error instead of failing to parse HTML.
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        with pytest.raises(InferenceServerException, match="nobody"):
            client.get_model_metadata("nobody")


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
    ],
    ids=["content-length-not-a-number", "content-lengths-differ", "chunk-size-not-hex"],
)
def test_unparseable_http_is_a_kserve_400(gateway, head):
    status, body = _status_and_json(_raw(gateway["http"], head, timeout=20))
    assert status == 400 and "malformed" in body["error"], body


# -- slow and many peers --------------------------------------------------------------------


def test_slow_peers_are_cut_off_by_the_timeouts(gateway):
    host, port = gateway["http"].rsplit(":", 1)
    partial_headers = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-"
    partial_body = _infer_head(gateway["http"], 2_000_000) + b"0123456789"
    half_chunked = (
        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789"
    )
    sockets = []
    for data in (partial_headers, partial_body, half_chunked, b""):  # b"": connected, idle
        sock = socket.create_connection((host, int(port)), timeout=60)
        if data:
            sock.sendall(data)
        sockets.append(sock)
    # gRPC: half of HTTP/2's connection preface, and nothing at all (the handshake timeout).
    grpc_host, grpc_port = gateway["grpc"].rsplit(":", 1)
    for data in (b"PRI * HTTP/2.0\r\n", b""):
        sock = socket.create_connection((grpc_host, int(grpc_port)), timeout=60)
        if data:
            sock.sendall(data)
        sockets.append(sock)
    start = time.monotonic()
    for sock in sockets:
        with sock:
            try:
                while sock.recv(65536):  # anything sent back, then the close
                    pass
            except ConnectionResetError:
                pass
    waited = time.monotonic() - start
    assert waited < max(HEADER_TIMEOUT, BODY_TIMEOUT) + 15, waited  # not the minutes a slow peer would want
    # The gateway still answers.
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        assert client.is_server_live()


def test_connections_past_the_cap_are_turned_away(gateway):
    host, port = gateway["http"].rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(MAX_CONNECTIONS)]
    try:
        # Past the cap: a 503 KServe error and a close, at once (within the idle timeout, which
        # closes the held connections).
        response = _raw(gateway["http"], b"", timeout=10)
        status, body = _status_and_json(response)
        assert status == 503 and str(MAX_CONNECTIONS) in body["error"], response
    finally:
        for sock in held:
            sock.close()
    with httpclient.InferenceServerClient(gateway["http"]) as client:
        wait_for(client.is_server_live, 20, 0.2, "the gateway never took connections again")


def test_grpc_calls_past_the_cap_are_resource_exhausted(gateway):
    """Calls in flight over gRPC are capped too (grpc's maximum_concurrent_rpcs): with the cap's
    worth of slow calls in flight, more are refused at once; the slow ones still answer."""
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        inp = grpcclient.InferInput("x", [1], "INT64")
        inp.set_data_from_numpy(np.array([1], dtype=np.int64))
        for _ in range(MAX_CONNECTIONS + 10):
            client.async_infer(
                "fail",
                [inp],
                callback=lambda result, error: results.put(error),
                parameters={"mode": "sleep", "seconds": 5},
                client_timeout=60,
            )
        errors = [results.get(timeout=90) for _ in range(MAX_CONNECTIONS + 10)]
    refused = [e for e in errors if e is not None and e.status() == "StatusCode.RESOURCE_EXHAUSTED"]
    assert len(refused) >= 10 and len(refused) + errors.count(None) == len(errors), [str(e) for e in errors if e]


def test_out_of_file_descriptors_backs_off_quietly(deployment, tmp_path):
    """With its open-file limit low, a flood of connections makes accept() fail with EMFILE: the
    gateway pauses accepting and logs a line now and then (not a traceback per attempt), and
    serves again once the flood is gone."""
    log = tmp_path / "out.txt"
    limit = 150

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc, http_address, _ = start_gateway(
        deployment.client.scheduler.address, str(log), "--max-connections", "100000", preexec_fn=low_limit
    )
    host, port = http_address.rsplit(":", 1)
    held = []
    try:
        try:
            for _ in range(limit + 50):
                try:
                    held.append(socket.create_connection((host, int(port)), timeout=5))
                except OSError:
                    break
            time.sleep(3)  # the gateway tries to accept the backlog meanwhile
            lines = log.read_text().splitlines()
            assert any("cannot accept connections" in line for line in lines), lines[-20:]
            assert len(lines) < 20 and "Traceback" not in log.read_text(), lines[-20:]
        finally:
            for sock in held:
                sock.close()
        with httpclient.InferenceServerClient(http_address) as client:
            wait_for(client.is_server_live, 30, 0.5, "the gateway never served again")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]


# -- memory ---------------------------------------------------------------------------------


def test_failed_calls_do_not_keep_their_memory(gateway):
    """Failing gRPC calls of 48 MiB each (a wrong shape, an unknown model): their memory is
    freed when they fail, not kept in a reference cycle until the garbage collector runs."""
    process = psutil.Process(gateway["proc"].pid)
    n = 48 * MiB // 8
    raw = np.zeros(n, dtype=np.int64).tobytes()
    with grpcclient.InferenceServerClient(gateway["grpc"]) as client:
        for i in range(8):
            # Odd: a shape its bytes do not fill (the gateway refuses it); even: an unknown model.
            request = grpcclient.service_pb2.ModelInferRequest(model_name="echo" if i % 2 else "nobody")
            request.inputs.add(name="x", datatype="INT64", shape=[n - 1] if i % 2 else [n])
            request.raw_input_contents.append(raw)
            with pytest.raises(Exception) as info:
                client._client_stub.ModelInfer(request, timeout=60)
            assert str(info.value.code()) in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"), info.value
            if i == 1:
                before = process.memory_info().rss
        after = process.memory_info().rss
    # Kept in a cycle, the six calls after the first two would hold ~6 x 2 x 48 MiB (seen: +700 MiB);
    # freed, what grows is the allocators' slack (seen: 0 to +180 MiB).
    assert after - before < 300 * MiB, (before / MiB, after / MiB)


def test_zz_memory_after_the_hostile_requests(gateway):
    """Last in this module: after everything above, the gateway holds no more than a bounded
    amount over what it held once warm."""
    rss = psutil.Process(gateway["proc"].pid).memory_info().rss
    assert rss - gateway["rss"] < 400 * MiB, (gateway["rss"] / MiB, rss / MiB)


# -- health follows the scheduler -------------------------------------------------------------


def test_health_follows_the_scheduler_and_errors_stay_json(tmp_path):
    """Ready while an operator is hosted; nothing hosted: not ready (503); the scheduler gone:
    still not ready, live stays 200, and model calls answer a JSON 503 (HTTP) / UNAVAILABLE
    (gRPC), with no traceback of the gateway's logged."""
    log = tmp_path / "out.txt"
    dep = Deployment([(OperatorConfig(name="echo", implementation="tests.operators:Echo"), 1)], dashboard_address=None)
    dep.__enter__()
    proc = None
    try:
        proc, http_address, grpc_address = start_gateway(dep.client.scheduler.address, str(log))
        wait_for(lambda: _request(http_address, "GET", "/v2/health/ready")[0] == 200, 60, 0.2)
        # The only worker retires: nothing is hosted.
        dep.client.retire_workers(list(dep.client.scheduler_info()["workers"]), close_workers=True)
        wait_for(lambda: _request(http_address, "GET", "/v2/health/ready")[0] == 503, 60, 0.2)
        error = _kserve_error(*_request(http_address, "GET", "/v2/health/ready"), 503)
        assert "no worker hosts" in error
        with grpcclient.InferenceServerClient(grpc_address) as client:
            assert not client.is_server_ready()
        assert _request(http_address, "GET", "/v2/health/live")[0] == 200
        dep.__exit__(None, None, None)
        wait_for(
            lambda: "scheduler" in (_request(http_address, "GET", "/v2/health/ready")[1] or {}).get("error", ""),
            60,
            0.5,
        )
        assert _request(http_address, "GET", "/v2/health/live")[0] == 200
        _kserve_error(*_request(http_address, "GET", "/v2/models/x", timeout=60), 503)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]})
        _kserve_error(*_request(http_address, "POST", "/v2/models/x/infer", body, timeout=60), 503)
        with grpcclient.InferenceServerClient(grpc_address) as client:
            assert client.is_server_live() and not client.is_server_ready()
            with pytest.raises(InferenceServerException) as info:
                client.get_model_metadata("x")
            assert info.value.status() == "StatusCode.UNAVAILABLE", info.value
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        dep.__exit__(None, None, None)  # again if it was closed above: a no-op
    # distributed's client logs its own failed reconnection (with a traceback); the gateway logs
    # no uncaught error of its own.
    text = log.read_text()
    assert "Uncaught exception" not in text and "SchedulerLostError" not in text, text[-3000:]
    assert "/tdask/" not in text, text[-3000:]


# -- HTTP/1.1 itself: keep-alive, pipelining, 100-continue, the head's cap, methods ----------------


def _read_answers(sock, count):
    """``count`` answers read off ``sock``: [(status, headers with lower-case names, body)].

    Every answer must say its length (``Content-Length``) or be chunked.
    """
    buffer = b""
    answers = []

    def fill():
        nonlocal buffer
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(answers)} answers, with {buffer[:300]!r} left")
        buffer += chunk

    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            fill()
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        status = int(status_line.split(" ")[1])
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while True:
                while b"\r\n" not in buffer:
                    fill()
                size_line, buffer = buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(buffer) < size + 2:
                    fill()
                assert buffer[size : size + 2] == b"\r\n", buffer[:300]
                body, buffer = body + buffer[:size], buffer[size + 2 :]
                if size == 0:
                    break
        elif status != 100:
            length = int(headers["content-length"])
            while len(buffer) < length:
                fill()
            body, buffer = buffer[:length], buffer[length:]
        answers.append((status, headers, body))
    return answers


def _echo_body(value):
    return json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [value]}]}).encode()


def _post(path, body, extra=""):
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def _connect(address):
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def test_pipelined_requests_are_answered_in_order(gateway):
    # The first takes a second; those behind it, sent at once, wait their turn.
    slow = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [0]}],
            "parameters": {"mode": "sleep", "seconds": 1},
        }
    ).encode()
    requests = [
        _post("/v2/models/fail/infer", slow),
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
        _post("/v2/models/echo/infer", _echo_body(1)),
        b"GET /v2/models/nobody HTTP/1.1\r\nHost: x\r\n\r\n",
        _post("/v2/models/echo/infer", _echo_body(2), "Connection: close\r\n"),
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",  # after the close: not answered
    ]
    with _connect(gateway["http"]) as sock:
        sock.sendall(b"".join(requests))
        answers = _read_answers(sock, 5)
        assert sock.recv(65536) == b""  # closed after the request that said so
    assert [status for status, _, _ in answers] == [200, 200, 200, 404, 200], answers
    assert json.loads(answers[2][2])["outputs"][0]["data"] == [1]
    assert "nobody" in json.loads(answers[3][2])["error"]
    assert json.loads(answers[4][2])["outputs"][0]["data"] == [2]
    assert "connection" not in answers[2][1] and answers[4][1]["connection"] == "close", answers


def test_keep_alive_follows_the_request(gateway):
    live = "GET /v2/health/live HTTP/1.{}\r\nHost: x\r\n{}\r\n"
    with _connect(gateway["http"]) as sock:
        sock.sendall(live.format(1, "").encode())
        ((status, headers, _),) = _read_answers(sock, 1)
        assert status == 200 and headers["content-length"] == "0" and "connection" not in headers
        sock.sendall(live.format(0, "Connection: keep-alive\r\n").encode())  # HTTP/1.0 asking to keep it
        ((status, headers, _),) = _read_answers(sock, 1)
        assert status == 200 and headers["connection"].lower() == "keep-alive", headers
        sock.sendall(live.format(0, "").encode())  # HTTP/1.0: closed after its answer
        ((status, headers, _),) = _read_answers(sock, 1)
        assert status == 200 and headers["connection"] == "close", headers
        assert sock.recv(65536) == b""


def test_a_stream_is_chunked_on_http_1_1_and_ends_with_the_connection_on_1_0(gateway):
    body = b'{"text": "hi"}'
    with _connect(gateway["http"]) as sock:
        sock.sendall(_post("/v2/models/echo/generate_stream", body))
        ((status, headers, events),) = _read_answers(sock, 1)
        assert status == 200 and headers["transfer-encoding"] == "chunked", headers
        assert headers["content-type"] == "text/event-stream" and "content-length" not in headers
        assert json.loads(events.decode().removeprefix("data: "))["text"] == "hi", events
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is still good
        assert _read_answers(sock, 1)[0][0] == 200
    old = _post("/v2/models/echo/generate_stream", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    head, _, events = _raw(gateway["http"], old).partition(b"\r\n\r\n")
    assert b" 200 " in head and b"chunked" not in head.lower() and b"connection: close" in head.lower(), head
    assert json.loads(events.decode().removeprefix("data: "))["text"] == "hi", events


def test_expect_100_continue(gateway):
    body = _echo_body(7)
    with _connect(gateway["http"]) as sock:
        sock.sendall(_infer_head(gateway["http"], len(body), "Expect: 100-continue\r\n"))
        ((status, _, _),) = _read_answers(sock, 1)  # before the body is sent
        assert status == 100
        sock.sendall(body)
        ((status, _, answer),) = _read_answers(sock, 1)
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [7], answer
    # Refused from its headers: the refusal, no 100.
    response = _raw(gateway["http"], _infer_head(gateway["http"], 2 * LIMIT, "Expect: 100-continue\r\n"))
    assert response.startswith(b"HTTP/1.1 413 "), response[:300]


def test_a_head_over_64_kib_is_a_431(gateway):
    big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * (70 * 1024) + b"\r\n\r\n"
    status, body = _status_and_json(_raw(gateway["http"], big))
    assert status == 431 and "headers" in body["error"], body
    # A header that never ends, sent in pieces: refused as it runs over, not at the header timeout.
    start = time.monotonic()
    with _connect(gateway["http"]) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(8):  # 128 KiB; each piece read before the next, so the answer is not lost to a reset
            sock.sendall(b"x" * 16384)
            if select.select([sock], [], [], 0.2)[0]:
                break
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 431 "), response[:300]
    assert time.monotonic() - start < HEADER_TIMEOUT, time.monotonic() - start


def test_a_known_route_with_a_wrong_method_is_a_405(gateway):
    status, parsed, raw = _request(gateway["http"], "GET", "/v2/models/echo/infer")
    error = _kserve_error(status, parsed, raw, 405)
    assert "POST" in error
    status, parsed, raw = _request(gateway["http"], "PUT", "/v2/models/echo")
    assert "GET" in _kserve_error(status, parsed, raw, 405)
