"""TritonServer and the packaged encoder/decoder models, against a real tritonserver.

One server (encoder + decoder loaded) is shared by the module; tests that change or kill a
server start their own small one. Every address is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tdask.triton import TritonServer, TritonServerError, find_tritonserver, merge_model_config
from tdask.triton.process import ProcessWatch

pytestmark = pytest.mark.timeout(180)

MODELS = Path(__file__).resolve().parent.parent / "models"


# ---------------------------------------------------------------------------- helpers


def server_processes(server_pid: int) -> list[psutil.Process]:
    """Live processes that belong to the server ``server_pid``.

    Its process group (the server and the stubs it forks), plus any python-backend stub
    that names ``server_pid`` as its parent on its command line, wherever it ended up.
    """
    found = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            in_group = os.getpgid(proc.pid) == server_pid
        except (psutil.Error, ProcessLookupError):
            continue
        cmdline = proc.info["cmdline"] or []
        is_our_stub = bool(cmdline) and cmdline[0].endswith("triton_python_backend_stub") and str(server_pid) in cmdline
        if in_group or is_our_stub:
            found[proc.pid] = proc
    return list(found.values())


def shm_regions(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{prefix}*"))


def infer(client, model, inputs, parameters=None, outputs=None):
    """``inputs``: {name: array}; returns the InferResult."""
    tensors = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), _triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return client.infer(model, tensors, parameters=parameters, client_timeout=60)


def _triton_dtype(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))


def start_server(tmp_path: Path, name: str, models=(), **kwargs) -> TritonServer:
    server = TritonServer(model_repository=MODELS, log_dir=tmp_path, name=name, **kwargs)

    async def go():
        await server.start()
        for model in models:
            if isinstance(model, tuple):
                await server.load_model(*model)
            else:
                await server.load_model(model)

    try:
        asyncio.run(go())
    except BaseException:
        asyncio.run(server.stop())
        raise
    return server


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[TritonServer]:
    """One server with encoder and decoder loaded, shared by the module."""
    server = start_server(tmp_path_factory.mktemp("triton-logs"), "shared", models=("encoder", "decoder"))
    yield server
    pid = server.pid
    asyncio.run(server.stop())
    assert server_processes(pid) == []


@pytest.fixture(scope="module")
def client(server) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


# ---------------------------------------------------------------------------- models


@pytest.mark.cluster
@pytest.mark.parametrize("size", [0, 1, 1000, 1_000_000])
@pytest.mark.parametrize("copies", [1, 2, 5, 7])
def test_encoder_decoder_round_trip(client, copies, size):
    rng = np.random.default_rng(size * 10 + copies)
    data = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=size, dtype=np.int64)

    encoded = infer(client, "encoder", {"input": data}, parameters={"input_copies": copies})
    output, sent_copies = encoded.as_numpy("output"), encoded.as_numpy("input_copies")
    assert output.dtype == np.int64 and output.shape == (size * copies,)
    np.testing.assert_array_equal(output, np.invert(np.tile(data, copies)))
    assert sent_copies.tolist() == [copies]

    decoded = infer(client, "decoder", {"input": output, "input_copies": sent_copies})
    result = decoded.as_numpy("output")
    assert result.dtype == np.int64 and result.shape == data.shape
    np.testing.assert_array_equal(result, data)


@pytest.mark.cluster
def test_request_parameters_override_config(client):
    data = np.arange(5, dtype=np.int64)
    default = infer(client, "encoder", {"input": data})
    assert default.as_numpy("input_copies").tolist() == [1]  # config.pbtxt default
    np.testing.assert_array_equal(default.as_numpy("output"), np.invert(data))

    for value in (3, "3"):  # an int64 parameter and a string parameter
        tripled = infer(client, "encoder", {"input": data}, parameters={"input_copies": value})
        assert tripled.as_numpy("input_copies").tolist() == [3]
        np.testing.assert_array_equal(tripled.as_numpy("output"), np.invert(np.tile(data, 3)))

    # Without the input_copies tensor the decoder takes the count from the parameters.
    decoded = infer(client, "decoder", {"input": np.invert(np.tile(data, 3))}, parameters={"input_copies": 3})
    np.testing.assert_array_equal(decoded.as_numpy("output"), data)

    # delay: 2 ms per output element, 50 elements => at least 0.1 s.
    began = time.monotonic()
    infer(client, "encoder", {"input": np.arange(50, dtype=np.int64)}, parameters={"delay": 0.002})
    assert time.monotonic() - began >= 0.1


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("inputs", "model", "expected"),
    [
        ({"input": np.arange(4, dtype=np.int32)}, "encoder", ["data-type is 'INT32'", "expects 'INT64'"]),
        ({"input": np.arange(6, dtype=np.int64).reshape(2, 3)}, "encoder", ["unexpected shape", "'input'", "[2,3]"]),
        ({}, "encoder", ["missing required input", "'input'"]),
        ({"input_copies": np.array([1], dtype=np.int64)}, "decoder", ["missing required input", "'input'"]),
        ({"input": np.arange(4, dtype=np.int64), "extra": np.arange(2, dtype=np.int64)}, "encoder", ["'extra'"]),
    ],
    ids=["int32-dtype", "2d-shape", "missing-input", "decoder-missing-input", "unexpected-input"],
)
def test_bad_inputs_are_rejected_with_a_clear_message(client, inputs, model, expected):
    with pytest.raises(InferenceServerException) as info:
        infer(client, model, inputs)
    message = info.value.message()
    for fragment in expected:
        assert fragment in message, message


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("model", "inputs", "parameters", "expected"),
    [
        ("encoder", {"input": np.arange(3)}, {"input_copies": 0}, ["'input_copies'", ">= 1", "got 0"]),
        ("encoder", {"input": np.arange(3)}, {"input_copies": "many"}, ["'input_copies'", "'many'"]),
        ("encoder", {"input": np.arange(3)}, {"delay": "-1"}, ["'delay'", "'-1'"]),
        ("encoder", {"input": np.arange(3)}, {"delay": "soon"}, ["'delay'", "'soon'"]),
        ("decoder", {"input": np.arange(6)}, {"input_copies": 4}, ["6 elements", "4 equal copies"]),
        ("decoder", {"input": np.arange(6), "input_copies": np.array([0])}, None, ["'input_copies'", "got 0"]),
    ],
    ids=["copies-zero", "copies-text", "delay-negative", "delay-text", "indivisible", "copies-tensor-zero"],
)
def test_bad_parameters_answer_with_an_error(client, model, inputs, parameters, expected):
    inputs = {name: array.astype(np.int64) for name, array in inputs.items()}
    with pytest.raises(InferenceServerException) as info:
        infer(client, model, inputs, parameters=parameters)
    message = info.value.message()
    assert message.startswith(f"{model}: "), message
    for fragment in expected:
        assert fragment in message, message
    # The instance survives a bad request.
    ok = infer(client, "encoder", {"input": np.arange(3, dtype=np.int64)})
    np.testing.assert_array_equal(ok.as_numpy("output"), np.invert(np.arange(3)))


# ---------------------------------------------------------------------------- the HTTP inference client


def http_infer(server: TritonServer, calls):
    """Run ``calls(client)`` (a coroutine function) with a fresh TritonHttpClient, then close it."""
    from tdask.triton.http_client import TritonHttpClient

    async def go():
        client = TritonHttpClient.from_url(server.http_url)
        try:
            return await calls(client), len(client._idle)
        finally:
            await client.close()

    return asyncio.run(go())


@pytest.mark.cluster
@pytest.mark.parametrize("size", [0, 1, 1000, 1_000_000])
def test_http_client_round_trip(server, size):
    data = np.random.default_rng(size).integers(-(2**62), 2**62, size, dtype=np.int64)

    async def calls(client):
        encoded = await client.infer(
            "encoder", {"input": (data, "INT64")}, request_id="r1", parameters={"input_copies": 3}
        )
        decoded = await client.infer(
            "decoder",
            {"input": (encoded.outputs["output"], "INT64"), "input_copies": (encoded.outputs["input_copies"], "INT64")},
        )
        return encoded, decoded

    (encoded, decoded), idle = http_infer(server, calls)
    assert encoded.datatypes == {"output": "INT64", "input_copies": "INT64"}
    assert encoded.outputs["input_copies"].tolist() == [3]
    np.testing.assert_array_equal(encoded.outputs["output"], np.invert(np.tile(data, 3)))
    np.testing.assert_array_equal(decoded.outputs["output"], data)
    assert idle == 1, "sequential calls share one keep-alive connection"


@pytest.mark.cluster
def test_http_client_errors_keep_triton_status_and_message(server):
    from tdask.triton.http_client import TritonHttpError

    three = (np.arange(3, dtype=np.int64), "INT64")

    async def calls(client):
        errors = {}
        for label, model, inputs, parameters in [
            ("bad-parameter", "encoder", {"input": three}, {"input_copies": 0}),
            ("bad-dtype", "encoder", {"input": (np.arange(3, dtype=np.int32), "INT32")}, None),
            ("unknown-model", "nosuch", {"input": three}, None),
        ]:
            with pytest.raises(TritonHttpError) as info:
                await client.infer(model, inputs, parameters=parameters)
            errors[label] = info.value
        with pytest.raises(ValueError, match="reserved parameter"):
            await client.infer("encoder", {"input": three}, parameters={"sequence_id": 1})
        ok = await client.infer("encoder", {"input": three})  # the connection is still good
        return errors, ok

    (errors, ok), idle = http_infer(server, calls)
    bad_parameter = errors["bad-parameter"]
    assert bad_parameter.status == 400 and "'input_copies' must be an integer >= 1" in bad_parameter.message
    assert errors["bad-dtype"].status == 400 and "INT32" in errors["bad-dtype"].message
    assert errors["unknown-model"].status == 404 and "nosuch" in errors["unknown-model"].message
    np.testing.assert_array_equal(ok.outputs["output"], np.invert(np.arange(3)))
    assert idle == 1


@pytest.mark.cluster
def test_http_client_timeout_drops_the_connection_and_recovers(server):
    async def calls(client):
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            # 2000 elements at 0.5 ms each: the model would take a second.
            await client.infer(
                "encoder",
                {"input": (np.arange(2000, dtype=np.int64), "INT64")},
                parameters={"delay": 0.0005},
                timeout=0.2,
            )
        waited = time.monotonic() - began
        idle_after_timeout = len(client._idle)
        ok = await client.infer("decoder", {"input": (np.arange(4, dtype=np.int64), "INT64")})
        return waited, idle_after_timeout, ok

    (waited, idle_after_timeout, ok), _ = http_infer(server, calls)
    assert waited < 1.0
    assert idle_after_timeout == 0, "a connection abandoned mid-answer is closed, never reused"
    np.testing.assert_array_equal(ok.outputs["output"], np.invert(np.arange(4)))


@pytest.mark.cluster
def test_http_client_concurrent_calls_open_more_connections(server):
    inputs = [np.arange(i, i + 500, dtype=np.int64) for i in range(16)]

    async def calls(client):
        return await asyncio.gather(*(client.infer("decoder", {"input": (x, "INT64")}) for x in inputs))

    results, idle = http_infer(server, calls)
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.outputs["output"], np.invert(x))
    assert 1 < idle <= len(inputs)


def test_http_client_retries_once_when_a_kept_alive_connection_was_closed():
    """A server may drop a kept-alive connection just as a request goes out on it: the client
    sends it again once on a fresh connection; a fresh connection failing is an error."""
    from tdask.triton.http_client import TritonHttpClient

    body_header = json.dumps(
        {"outputs": [{"name": "y", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    answer = (
        (
            f"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: {len(body_header)}\r\n"
            f"Content-Length: {len(body_header) + 8}\r\n\r\n"
        ).encode()
        + body_header
        + np.array([7], dtype=np.int64).tobytes()
    )
    connections = []

    async def serve(reader, writer):
        # Answers the first request of each connection; drops the connection on the second.
        connections.append(writer)
        for n in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = int(next(line for line in lines if line.lower().startswith(b"content-length")).split(b":")[1])
            await reader.readexactly(length)
            if n == 1:
                writer.close()
                return
            writer.write(answer)
            await writer.drain()

    async def go():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = TritonHttpClient("127.0.0.1", port)
        x = {"x": (np.arange(2, dtype=np.int64), "INT64")}
        try:
            first = await client.infer("m", x)
            second = await client.infer("m", x)  # the kept-alive connection is dropped: retried
            server.close()
            await server.wait_closed()
            with pytest.raises(ConnectionError):
                await TritonHttpClient("127.0.0.1", port).infer("m", x)  # nobody listens: no retry
        finally:
            await client.close()
        return first, second

    first, second = asyncio.run(go())
    assert first.outputs["y"].tolist() == second.outputs["y"].tolist() == [7]
    assert len(connections) == 2, "one retry, on a fresh connection"


@pytest.mark.parametrize(
    "array, datatype",
    [
        (np.array([b"a", b"", b"\x00bc"], dtype=object), "BYTES"),
        (np.array([[True, False]]), "BOOL"),
        (np.arange(6, dtype=np.float16).reshape(2, 3), "FP16"),
        (np.array(7, dtype=np.uint64), "UINT64"),
        (np.zeros((0, 3), dtype=np.float32), "FP32"),
    ],
)
def test_http_client_tensor_encoding_round_trips(array, datatype):
    """Every datatype's binary form, as the client writes inputs and reads outputs."""
    from tdask.triton.http_client import _decode_output, _encode_input

    spec, data = _encode_input("x", array, datatype)
    body = b"header" + bytes(data)
    decoded, end = _decode_output(spec, body, len(b"header"))
    assert end == len(body)
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


# ---------------------------------------------------------------------------- config override


def test_merge_model_config_overrides_only_what_is_given():
    base = {
        "name": "m",
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
        "parameters": {"a": {"string_value": "1"}, "b": {"string_value": "2"}},
        "input": [{"name": "input"}],
    }
    merged = merge_model_config(
        base, {"instance_group": [{"kind": "KIND_GPU", "count": 2}], "parameters": {"b": 3, "c": {"string_value": "x"}}}
    )
    assert merged["instance_group"] == [{"kind": "KIND_GPU", "count": 2}]
    assert merged["parameters"] == {
        "a": {"string_value": "1"},
        "b": {"string_value": "3"},
        "c": {"string_value": "x"},
    }
    assert merged["input"] == base["input"] and merged["name"] == "m"
    assert base["parameters"]["b"] == {"string_value": "2"}  # the base is not modified


@pytest.mark.cluster
def test_config_override_changes_instances_and_parameters(tmp_path):
    from tests.conftest import wait_for

    server = start_server(tmp_path, "override")
    try:
        override = {"instance_group": [{"kind": "KIND_CPU", "count": 2}], "parameters": {"input_copies": "3"}}
        asyncio.run(server.load_model("encoder", override))
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            config = client.get_model_config("encoder", as_json=True)["config"]
            assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 2)]
            assert config["parameters"]["input_copies"]["string_value"] == "3"
            assert config["parameters"]["delay"]["string_value"] == "0"  # kept from config.pbtxt
            assert config["output"][1]["name"] == "input_copies"  # the rest of config.pbtxt is kept

            data = np.arange(4, dtype=np.int64)
            result = infer(client, "encoder", {"input": data})
            assert result.as_numpy("input_copies").tolist() == [3]  # from the overridden config
            result = infer(client, "encoder", {"input": data}, parameters={"input_copies": 2})
            assert result.as_numpy("input_copies").tolist() == [2]  # the request wins

            stubs = [p for p in server_processes(server.pid) if p.pid != server.pid]
            assert len(stubs) == 2  # one stub per instance

        # A bad value in the config fails the load, naming the parameter.
        with pytest.raises(TritonServerError, match="input_copies"):
            asyncio.run(server.load_model("decoder", {"parameters": {"input_copies": "0"}}))
        # A misspelt key is caught before the server sees it.
        with pytest.raises(ValueError, match="instance_groups"):
            asyncio.run(server.load_model("decoder", {"instance_groups": [{"count": 2}]}))

        asyncio.run(server.unload_model("encoder"))
        wait_for(lambda: len(server_processes(server.pid)) == 1, message="the encoder's stubs outlived its unload")
    finally:
        pid = server.pid
        asyncio.run(server.stop())
    assert server_processes(pid) == []


# ---------------------------------------------------------------------------- lifecycle


@pytest.mark.cluster
def test_start_stop_is_idempotent_and_async_with_works(tmp_path):
    # Leftovers of a dead owner, old enough to be swept by the next start on this host.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_region = Path("/dev/shm") / f"tdask{dead.pid}-0badf00d_region"
    stale_workdir = Path(tempfile.gettempdir()) / f"tdask-triton-{dead.pid}-old-xyz"
    stale_region.write_bytes(b"x")
    stale_workdir.mkdir()
    for path in (stale_region, stale_workdir):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    extra_repository = tmp_path / "empty-repository"
    extra_repository.mkdir()

    async def go():
        server = TritonServer(model_repository=[extra_repository, MODELS], log_dir=tmp_path, name="ctx")
        async with server:
            await server.start()  # a no-op
            assert server.is_alive() and server.grpc_url.startswith("127.0.0.1:")
            assert server.http_url.startswith("127.0.0.1:")
            await server.load_model("decoder", {"parameters": {"delay": "0"}})  # found in the second repository
            pid = server.pid
        assert not server.is_alive() and server.returncode == 0
        await server.stop()  # a no-op
        with pytest.raises(RuntimeError, match="cannot be started"):
            await server.start()
        return pid

    pid = asyncio.run(go())
    assert server_processes(pid) == []
    assert not stale_region.exists() and not stale_workdir.exists()
    log = (tmp_path / "ctx.triton.log").read_text()
    assert "Started GRPCInferenceService at 127.0.0.1:" in log


@pytest.mark.cluster
def test_start_failure_reports_exit_status_and_log(tmp_path):
    server = TritonServer(model_repository=MODELS, log_dir=tmp_path, name="broken", extra_args=["--no-such-flag=1"])
    with pytest.raises(TritonServerError) as info:
        asyncio.run(server.start())
    error = info.value
    assert error.returncode not in (None, 0)
    assert "no-such-flag" in error.log_tail
    assert "exited with status" in str(error) and "no-such-flag" in str(error)
    assert not server.is_alive()


def test_tdask_tritonserver_must_be_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("TDASK_TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="TDASK_TRITONSERVER"):
        find_tritonserver()


def test_python_backend_stub_of_the_bundle_and_of_an_install(tmp_path):
    from tdask.triton.binary import TritonBinary, python_backend_stub

    bundled = find_tritonserver()
    if bundled.bundle_root is not None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        assert python_backend_stub(bundled) == (
            bundled.bundle_root / "python_backend_stubs" / version / "triton_python_backend_stub"
        )
    # A container-style install: <prefix>/bin/tritonserver and <prefix>/backends/python/<stub>.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tritonserver").touch()
    install = TritonBinary(path=tmp_path / "bin" / "tritonserver")
    assert python_backend_stub(install) is None
    stub = tmp_path / "backends" / "python" / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.touch()
    assert python_backend_stub(install) == stub


def test_unparsable_config_pbtxt_is_a_clear_error(tmp_path):
    from tdask.triton.model_config import ModelConfigError, read_model_config

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\ninstance_groups [ { count: 1 } ]\n')
    with pytest.raises(ModelConfigError, match="cannot parse"):
        read_model_config([tmp_path], "broken")
    assert read_model_config([tmp_path], "absent") == {}
    server = TritonServer(model_repository=tmp_path)  # never started: reading configs needs no process
    with pytest.raises(TritonServerError, match="cannot parse"):
        server.model_config("broken", {"parameters": {"a": 1}})


def test_exit_callbacks_run_in_order_even_when_added_while_others_run():
    # The race that once failed test_killed_server_is_detected_and_cleaned_up in CI: the process
    # had exited and the first callback (the server's log of the death) was still running when
    # wait() registered its own; that one used to run at once in the caller's thread and resolve
    # wait() before the callbacks registered earlier had been called.
    import threading

    first_running, release = threading.Event(), threading.Event()
    calls: list[tuple[str, int]] = []

    def slow_first(returncode: int) -> None:
        first_running.set()
        release.wait(10)
        calls.append(("first", returncode))

    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    watch = ProcessWatch(process, slow_first)
    watch.add_callback(lambda rc: calls.append(("second", rc)))
    assert first_running.wait(30)
    assert watch.exited.is_set() and watch.returncode == 3
    watch.add_callback(lambda rc: calls.append(("late", rc)))  # queued, not run in this thread
    assert calls == []
    release.set()
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == [("first", 3), ("second", 3), ("late", 3)]
    watch.add_callback(lambda rc: calls.append(("after", rc)))  # all called: runs right here
    assert calls[-1] == ("after", 3)


@pytest.mark.cluster
def test_killed_server_is_detected_and_cleaned_up(tmp_path):
    # The hang bounds below sit far from both outcomes: what is tested answers in well under a
    # second, the hangs it rules out would last 60 s (client timeout, stop_timeout_s). They were
    # 5 s against 10 s hangs, the only load-sensitive part of a test that once failed in a full
    # local run on 2 cores (message not captured).
    server = start_server(tmp_path, "victim", models=("encoder", "decoder"), stop_timeout_s=60)
    pid = server.pid
    assert len(shm_regions(server.shm_region_prefix)) == 2  # one per stub
    exits = []
    server.add_exit_callback(exits.append)
    try:
        assert server.is_alive()
        assert len(server_processes(pid)) == 3  # server + 2 stubs
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            infer(client, "encoder", {"input": np.arange(3, dtype=np.int64)})
            os.kill(pid, signal.SIGKILL)
            assert asyncio.run(asyncio.wait_for(server.wait(), 10)) == -signal.SIGKILL
            assert not server.is_alive() and server.returncode == -signal.SIGKILL
            assert exits == [-signal.SIGKILL]

            began = time.monotonic()
            with pytest.raises(InferenceServerException):
                tensor = grpcclient.InferInput("input", [3], "INT64")
                tensor.set_data_from_numpy(np.arange(3, dtype=np.int64))
                client.infer("encoder", [tensor], client_timeout=60)
            assert time.monotonic() - began < 20  # refused, not hung

        with pytest.raises(TritonServerError, match="exited with status -9"):
            asyncio.run(server.load_model("encoder"))
    finally:
        began = time.monotonic()
        asyncio.run(server.stop())
    assert time.monotonic() - began < 20  # orphaned stubs are killed, not waited for
    assert server_processes(pid) == []
    assert shm_regions(server.shm_region_prefix) == []  # what the killed server left is removed


@pytest.mark.cluster
@pytest.mark.parametrize("how", ["exit-without-stop", "sigkill-owner"])
def test_server_does_not_outlive_its_owner(tmp_path, how):
    """The finalizer (normal exit) or the parent-death signal and the reaper (owner SIGKILLed) end the
    server and its stubs and remove their shared memory."""
    from tests.conftest import wait_for

    script = textwrap.dedent(
        f"""
        import asyncio, json, os, signal, sys, time
        from tdask.triton.server import TritonServer
        server = TritonServer(model_repository={str(MODELS)!r}, log_dir={str(tmp_path)!r}, name="owned")
        async def go():
            await server.start()
            await server.load_model("encoder")
        asyncio.run(go())
        print(json.dumps({{"pid": server.pid, "shm": server.shm_region_prefix}}), flush=True)
        if {how!r} == "sigkill-owner":
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODELS.parent.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout, done.stderr
    info = json.loads(done.stdout.splitlines()[0])
    pid = info["pid"]
    wait_for(
        lambda: server_processes(pid) == [],
        timeout=20,
        message=lambda: f"outlived its owner: {[p.cmdline() for p in server_processes(pid)]}",
    )
    # The finalizer (normal exit) or the server's reaper (owner SIGKILLed) removes its regions.
    wait_for(lambda: shm_regions(info["shm"]) == [], timeout=20, message=lambda: f"left: {shm_regions(info['shm'])}")


@pytest.mark.cluster
def test_a_server_killed_by_a_signal_while_starting_is_started_again(tmp_path):
    """A start-up crash by signal (Triton's gRPC poller once aborted on an overloaded host) is not
    a configuration error: the server is started again. The binary here is the real one behind a
    wrapper that aborts itself on its first run."""
    import dataclasses

    bundled = find_tritonserver()
    marker = tmp_path / "aborted-once"
    wrapper = tmp_path / "tritonserver"
    wrapper.write_text(
        f'#!/bin/sh\nif [ ! -e "{marker}" ]; then touch "{marker}"; kill -ABRT $$; fi\nexec "{bundled.path}" "$@"\n'
    )
    wrapper.chmod(0o755)
    server = start_server(tmp_path, "twice", models=("encoder",), binary=dataclasses.replace(bundled, path=wrapper))
    try:
        assert marker.exists() and server.is_alive()
        log = server.log_path.read_text()
        assert log.count("--- tdask: starting Triton server 'twice'") == 2
    finally:
        asyncio.run(server.stop())


# ---------------------------------------------------------------------------- one interface, both kinds


INTERFACE = {
    "from_options",
    "load_model",
    "unload_model",
    "stop",
    "client",
    "stream_client",
    "is_alive",
    "broken",
    "returncode",
    "pid",
    "address",
    "metrics_source",
    "add_exit_callback",
    "remove_exit_callback",
    "wait",
}


def test_both_server_kinds_implement_the_one_interface(tmp_path):
    """Both kinds are concrete TritonServerBase subclasses (every member of the interface is
    abstract there, so a kind missing one cannot be made), made by one factory from one options
    object, the kind named by tdask.triton.mode."""
    import inspect

    import dask

    from tdask.triton import TritonOptions, TritonServerBase, make_server
    from tdask.triton.inprocess import InProcessServer
    from tdask.triton.interface import InferClient, StreamClient
    from tdask.triton.shared_memory import SharedMemoryClient

    assert INTERFACE <= TritonServerBase.__abstractmethods__
    for cls in (TritonServer, InProcessServer):
        assert issubclass(cls, TritonServerBase) and not inspect.isabstract(cls), cls

    options = TritonOptions(
        model_repository=[str(MODELS)], name="kinds", log_dir=tmp_path, log_verbose=2, metrics=False, use_shim=False
    )
    assert options.repositories == (MODELS.resolve(),) and options.exit_timeout_s == 5
    made = {mode: make_server(options, mode=mode) for mode in ("in-process", "subprocess")}
    assert type(made["in-process"]) is InProcessServer and type(made["subprocess"]) is TritonServer
    for server in made.values():
        assert server.name == "kinds" and server.log_verbose == 2 and server.log_dir == tmp_path
        assert server.options.repositories == options.repositories
        assert server.broken is None and not server.is_alive() and server.metrics_source is None
    assert made["in-process"].use_shim is False
    for mode in ("in-process", "subprocess"):
        with dask.config.set({"tdask.triton.mode": mode}):
            assert make_server(options).options.name == "kinds"
            assert type(make_server(options)) is type(made[mode])
    with dask.config.set({"tdask.triton.mode": "elsewhere"}), pytest.raises(ValueError, match="elsewhere"):
        make_server(options)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TritonOptions(model_repository=tmp_path / "absent")

    in_process = InProcessServer(model_repository=MODELS)  # never started: its clients need no core
    assert in_process.metrics_source == in_process.metrics_text  # metrics on by default
    client = in_process.client()
    assert isinstance(client, InferClient) and isinstance(in_process.stream_client(), StreamClient)
    assert not isinstance(client, SharedMemoryClient)  # Triton in process reads tdask's buffers


@pytest.mark.cluster
def test_a_tritonserver_serves_through_the_one_interface(server):
    """The subprocess kind's clients satisfy the interface's protocols, answer with the neutral result
    type and fail with the neutral error type (the HTTP and gRPC ones are its subclasses)."""
    from tdask.triton.grpc_stream import TritonStreamError
    from tdask.triton.http_client import TritonHttpError
    from tdask.triton.interface import InferClient, InferResult, StreamClient, TritonInferError
    from tdask.triton.shared_memory import SharedMemoryClient

    assert server.broken is None and server.is_alive()
    assert server.metrics_source == server.metrics_url and server.address == server.http_url

    async def go():
        client, stream = server.client(), server.stream_client()
        try:
            assert isinstance(client, InferClient) and isinstance(client, SharedMemoryClient)
            assert isinstance(stream, StreamClient) and not isinstance(stream, InferClient)
            result = await client.infer("encoder", {"input": (np.arange(3, dtype=np.int64), "INT64")})
            with pytest.raises(TritonInferError) as unary:
                await client.infer("nosuch", {"input": (np.arange(3, dtype=np.int64), "INT64")})
            with pytest.raises(TritonInferError) as streamed:
                async for _ in stream.stream("nosuch", {"input": (np.arange(3, dtype=np.int64), "INT64")}):
                    pass
            return result, unary.value, streamed.value
        finally:
            await client.close()
            await stream.close()

    result, unary, streamed = asyncio.run(go())
    assert type(result) is InferResult and result.final
    np.testing.assert_array_equal(result.outputs["output"], np.invert(np.arange(3)))
    assert isinstance(unary, TritonHttpError) and unary.status == 404 and unary.code is None
    assert isinstance(streamed, TritonStreamError) and streamed.status is None and "nosuch" in streamed.message


def test_one_options_object_renders_as_the_command_line(tmp_path):
    """server_args renders a TritonOptions as tritonserver's command line: the repositories,
    server choices, exit timeout, log level, metrics and shared-memory prefix."""
    from tdask.triton import TritonOptions
    from tdask.triton.binary import TritonBinary, server_args

    second = tmp_path / "second"
    second.mkdir()
    options = TritonOptions(
        model_repository=[MODELS, second], name="w1", log_verbose=3, stop_timeout_s=9, metrics=False, extra_args=["--x"]
    )
    args = server_args(
        options,
        TritonBinary(path=Path("/opt/bin/tritonserver")),
        shm_prefix="tdask1-ab_",
        backends=tmp_path,
        grpc_port=1001,
        http_port=1002,
        metrics_port=None,
    )
    assert args[0] == "/opt/bin/tritonserver" and args[-1] == "--x"
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in args[1:-1] if arg.startswith("--"))
    assert [a for a in args if a.startswith("--model-repository=")] == [
        f"--model-repository={MODELS.resolve()}",
        f"--model-repository={second.resolve()}",
    ]
    assert flags["model-control-mode"] == "explicit" and flags["exit-timeout-secs"] == "4"
    assert flags["strict-readiness"] == flags["exit-on-error"] == "true"
    assert flags["log-verbose"] == "3" and flags["allow-metrics"] == "false" and "metrics-port" not in flags
    assert flags["backend-config"] == "python,shm-region-prefix-name=tdask1-ab_"
    assert flags["backend-directory"] == str(tmp_path) and flags["grpc-port"] == "1001"
    with pytest.raises(ValueError, match="metrics port"):
        server_args(
            TritonOptions(model_repository=MODELS, metrics=True),
            TritonBinary(path=Path("tritonserver")),
            shm_prefix="p_",
            backends=None,
            grpc_port=1,
            http_port=2,
            metrics_port=None,
        )

    # The C-API rendering (server_options) is applied to a real in-process Triton in
    # tests/test_triton_inprocess.py::test_lifecycle_inference_errors_and_log: both repositories,
    # explicit model control, the log file and the stubs' shared-memory prefix are checked there.


# ---------------------------------------------------------------------------- the reaper


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_SLEEP = "import time; time.sleep(600)"
# A "server": leads its own process group and forks a member of it (a "stub" of its group).
_LEADER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {_SLEEP!r}]); time.sleep(600)"


def _group_member(leader: int) -> int:
    from tests.conftest import wait_for

    wait_for(lambda: psutil.Process(leader).children(), timeout=30, message="the leader forked nothing")
    (member,) = psutil.Process(leader).children()
    assert os.getpgid(member.pid) == leader
    return member.pid


@pytest.mark.cluster
@pytest.mark.parametrize("how", ["owner-killed", "owner-killed-nogroup", "server-killed", "python-m"])
def test_the_reaper_ends_what_a_dead_owner_or_server_leaves(tmp_path, how):
    """The reaper (tdask/triton/reaper.py, a process of its own) wakes when its owner dies (its
    lifeline pipe reads end-of-file), the server dies (pidfd), or its lifeline is closed, then
    SIGKILLs the server's process group (unless told nogroup) and every process naming the
    shared-memory prefix, unlinks the prefix's regions and exits."""
    from tdask.triton.process import SHM_DIR, Reaper, new_shm_prefix
    from tests.conftest import wait_for

    prefix = new_shm_prefix()
    region = SHM_DIR / f"{prefix}region"
    region.write_bytes(b"x")
    stub = subprocess.Popen([sys.executable, "-c", _SLEEP, prefix], start_new_session=True)  # names the prefix
    started: list[int] = [stub.pid]
    group = how != "owner-killed-nogroup"
    try:
        if how.startswith("owner-killed"):
            # The owner starts the server and its reaper, then is SIGKILLed: nothing of it runs any more.
            owner = textwrap.dedent(
                f"""
                import json, os, signal, subprocess, sys, time
                import psutil
                from tdask.triton.process import Reaper
                leader = subprocess.Popen(
                    [sys.executable, "-c", {_LEADER!r}], start_new_session=True, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,  # what outlives this process must not hold its output open
                )
                while not psutil.Process(leader.pid).children():
                    time.sleep(0.01)
                member = psutil.Process(leader.pid).children()[0].pid
                reaper = Reaper(leader.pid, {prefix!r}, kill_group={group!r})
                print(json.dumps({{"leader": leader.pid, "member": member, "reaper": reaper.pid}}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
                """
            )
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODELS.parent), os.environ.get("PYTHONPATH", "")]))
            done = subprocess.run([sys.executable, "-c", owner], capture_output=True, text=True, timeout=120, env=env)
            assert done.returncode == -signal.SIGKILL and done.stdout, done.stderr
            pids = json.loads(done.stdout)
            leader, member, reaper_pid = pids["leader"], pids["member"], pids["reaper"]
            started += [leader, member, reaper_pid]
        else:
            leader_process = subprocess.Popen([sys.executable, "-c", _LEADER], start_new_session=True)
            leader = leader_process.pid
            started.append(leader)
            member = _group_member(leader)
            started.append(member)
            if how == "server-killed":
                reaper = Reaper(leader, prefix)
                assert reaper.process is not None
                reaper_pid = reaper.process.pid
                os.kill(leader, signal.SIGKILL)
                assert reaper.process.wait(timeout=30) == 0  # it acted on its own, not on release()
                reaper.release()
            else:  # the program itself, run as `python -m tdask.triton.reaper`, its lifeline closed
                read_end, write_end = os.pipe()
                program = subprocess.Popen(
                    [sys.executable, "-m", "tdask.triton.reaper", str(read_end), str(leader), prefix, str(SHM_DIR)],
                    pass_fds=(read_end,),
                    start_new_session=True,
                )
                os.close(read_end)
                reaper_pid = program.pid
                time.sleep(1.0)
                assert program.poll() is None and not _gone(member), "the reaper acted before its lifeline closed"
                os.close(write_end)
                assert program.wait(timeout=60) == 0
            leader_process.wait(timeout=30)

        wait_for(lambda: _gone(stub.pid), timeout=30, message="the process naming the prefix outlived the reaper")
        wait_for(lambda: not region.exists(), timeout=30, message="the prefix's shared memory outlived the reaper")
        wait_for(lambda: _gone(reaper_pid), timeout=30, message="the reaper did not exit")
        if group:
            assert _gone(leader) and _gone(member), "the server's process group outlived the reaper"
        else:  # Triton in a worker's process: the owner's group is not the reaper's to end
            assert not _gone(leader) and not _gone(member)
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stub.wait(timeout=30)
        region.unlink(missing_ok=True)


@pytest.mark.cluster
def test_a_stub_replaced_by_an_ensembles_load_is_not_a_death(tmp_path):
    """Loading an ensemble reloads its composing models (Triton 2.51, explicit mode): their old
    stubs end once the new ones serve. The stub watch must take that for a replacement, not a
    death (it gave the server up: the bench's ensemble baseline died that way), and watch the
    new stubs, whose death still ends the server."""
    repo = tmp_path / "repo"
    for name in ("encoder", "decoder"):
        shutil.copytree(MODELS / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    ensemble = Path(__file__).resolve().parent.parent / "bench" / "models" / "encoder_decoder_ensemble"
    shutil.copytree(ensemble, repo / ensemble.name)
    (repo / ensemble.name / "1").mkdir(exist_ok=True)

    async def go() -> dict[str, object]:
        server = TritonServer(model_repository=repo, log_dir=tmp_path, name="ensemble")
        await server.start()
        try:
            await server.load_model("encoder")
            await server.load_model("decoder")
            first = set(server._stub_pids("encoder"))
            await server.load_model(ensemble.name)  # reloads encoder and decoder: new stubs
            deadline = time.monotonic() + 30
            while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in first):
                assert time.monotonic() < deadline, "the replaced stubs did not end"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # the watch's reader runs
            broken_after_reload = server.broken
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                x = np.arange(5, dtype=np.int64)
                answer = infer(client, ensemble.name, {"input": x}).as_numpy("output")
            second = set(server._stub_pids("encoder"))
            os.kill(next(iter(second)), signal.SIGKILL)  # a real death of a new stub
            deadline = time.monotonic() + 10
            while server.broken is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return {
                "first": first,
                "second": second,
                "broken_after_reload": broken_after_reload,
                "answer": answer,
                "broken_after_kill": server.broken,
            }
        finally:
            await server.stop()

    seen = asyncio.run(go())
    assert seen["first"] and seen["second"] and not seen["first"] & seen["second"], seen
    assert seen["broken_after_reload"] is None, seen
    np.testing.assert_array_equal(seen["answer"], np.arange(5, dtype=np.int64))
    assert "of model 'encoder' died" in str(seen["broken_after_kill"]), seen
