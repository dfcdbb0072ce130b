"""Triton in this process (tdask.triton.inprocess): lifecycle, logs, errors, both callback paths.

The operator-level behaviour (bad requests, deadlines, a misbehaving model, a killed stub or
worker) is covered in both modes by tests/test_triton_operator.py and test_triton_streaming.py;
these tests drive the in-process server directly, each in a fresh Python process, since
Triton's core is loaded once per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TEST_MODELS = ROOT / "tests" / "models"


def _run(script: str, tmp_path: Path, timeout: float = 120) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rc={done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("shim", [True, False], ids=["c-shim", "python-callbacks"])
def test_lifecycle_inference_errors_and_log(tmp_path, shim):
    """Start, load with an override (from the second repository), infer (INT64 and BYTES, parameters),
    typed errors for a bad input and a raising model, timeout, unload, stop: nothing left behind."""
    script = f"""
    import asyncio, json, os
    import numpy as np
    from tdask.triton.inprocess import InProcessServer
    from tdask.triton.interface import InferClient, StreamClient, TritonInferError, ReservedParameterError
    from tdask.triton.shared_memory import SharedMemoryClient
    from tdask.triton.process import SHM_DIR

    async def go():
        out = {{}}
        server = InProcessServer(model_repository=[{str(TEST_MODELS)!r}, {str(MODELS)!r}],
                                 log_dir={str(tmp_path)!r}, name="w/1", use_shim={shim!r})
        async with server:
            await server.start()  # a no-op
            out["native"] = server.native_callbacks
            await server.load_model("encoder", {{"parameters": {{"input_copies": "3"}}}})
            await server.load_model("bytes_upper")
            await server.load_model("misbehaving")
            client = server.client()
            out["interface"] = [isinstance(client, InferClient), isinstance(server.stream_client(), StreamClient),
                                isinstance(client, SharedMemoryClient)]
            out["metrics_source"] = server.metrics_source == server.metrics_text and "nv_" in server.metrics_text()
            x = np.arange(5, dtype=np.int64)
            r = await client.infer("encoder", {{"input": (x, "INT64")}}, request_id="r1")
            out["encoded"] = r.outputs["output"].tolist()
            out["copies"] = r.outputs["input_copies"].tolist()
            r = await client.infer("encoder", {{"input": (x, "INT64")}}, parameters={{"input_copies": 1}})
            out["copies_param"] = r.outputs["input_copies"].tolist()
            words = np.array([b"ab", b"", b"xY"], dtype=object)
            r = await client.infer("bytes_upper", {{"text": (words, "BYTES")}})
            out["bytes"] = [bytes(v).decode() for v in r.outputs[next(iter(r.outputs))].reshape(-1)]
            errors = {{}}
            for label, call in {{
                "dtype": client.infer("encoder", {{"input": (x.astype(np.int32), "INT32")}}),
                "unknown": client.infer("nope", {{"input": (x, "INT64")}}),
                "raise": client.infer("misbehaving", {{"input": (np.arange(4, dtype=np.int64), "INT64")}},
                                      parameters={{"mode": "raise"}}),
            }}.items():
                try:
                    await call
                    errors[label] = None
                except TritonInferError as exc:
                    errors[label] = [exc.status, exc.message, type(exc).__name__, exc.code]
            out["errors"] = errors
            try:
                await client.infer("encoder", {{"input": (x, "INT64")}}, parameters={{"priority": 1}})
            except ReservedParameterError:
                out["reserved"] = True
            try:
                await client.infer("encoder", {{"input": (np.arange(1000, dtype=np.int64), "INT64")}},
                                   parameters={{"delay": 0.001}}, timeout=0.2)
            except TimeoutError:
                out["timeout"] = True
            r = await client.infer("encoder", {{"input": (x, "INT64")}})  # serves on
            out["after"] = r.outputs["input_copies"].tolist()
            await server.unload_model("misbehaving")
            out["prefix"] = server.shm_region_prefix
            # The backend config's shared-memory prefix reached the python backend: its stubs'
            # regions carry it (C-API options rendered from TritonOptions, applied for real).
            out["shm_during"] = [p.name for p in SHM_DIR.glob(out["prefix"] + "*")]
        await server.stop()  # a no-op
        out["alive"] = server.is_alive()
        out["shm_left"] = [p.name for p in SHM_DIR.glob(out["prefix"] + "*")]
        try:
            await server.start()
        except RuntimeError as exc:
            out["restart"] = str(exc)
        return out

    print(json.dumps(asyncio.run(go())))
    """
    out = _run(script, tmp_path)
    import shutil

    if shim:
        assert out["native"] == (shutil.which("cc") is not None or shutil.which("gcc") is not None)
    else:
        assert out["native"] is False
    assert out["encoded"] == [~v for v in range(5)] * 3 and out["copies"] == [3]
    assert out["copies_param"] == [1]
    assert out["bytes"] == ["AB", "", "XY"]
    # One error type for both kinds (the in-process path's own, not the HTTP client's), with the
    # HTTP status Triton's endpoint gives the same error.
    assert {tuple(e[2:]) for e in out["errors"].values()} == {("TritonInferError", None)}, out["errors"]
    assert out["interface"] == [True, True, False]  # no shared-memory extension in process: no need
    assert out["metrics_source"] is True
    assert out["errors"]["dtype"][0] == 400 and "INT32" in out["errors"]["dtype"][1]
    assert out["errors"]["unknown"][0] in (400, 404) and "nope" in out["errors"]["unknown"][1]
    assert out["errors"]["raise"][0] in (400, 500) and "raised on purpose" in out["errors"]["raise"][1]
    assert out["reserved"] and out["timeout"] and out["after"] == [3]
    assert out["shm_during"], "no shared-memory region with the server's prefix while its stubs ran"
    assert out["alive"] is False and out["shm_left"] == []
    assert "cannot be started" in out["restart"]
    log = (tmp_path / "w_1.triton.log").read_text()  # <log-dir>/<worker>.triton.log, "/" made safe
    assert "starting Triton in process" in log and "successfully loaded 'encoder'" in log


def test_large_outputs_are_handed_out_without_a_copy_and_their_buffers_come_back(tmp_path):
    """With the C shim, an output of 64 KiB or more is a read-only numpy array over the buffer
    Triton wrote (no copy): it stays intact while later responses are read, and goes back to
    the shim's pool once the array is collected. Small outputs are copied."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the C shim (and its allocator) cannot be built here")
    script = f"""
    import asyncio, gc, json
    import numpy as np
    from tdask.triton.inprocess import InProcessServer

    async def go():
        out = {{}}
        server = InProcessServer(model_repository=[{str(MODELS)!r}], log_dir={str(tmp_path)!r}, name="w")
        async with server:
            await server.load_model("encoder")
            client = server.client()
            buffers = server.completions.buffers
            n = 100_000
            first = (await client.infer("encoder", {{"input": (np.arange(n, dtype=np.int64), "INT64")}})).outputs
            out["adopted"] = buffers.adopted
            out["writeable"] = bool(first["output"].flags.writeable)
            for k in range(1, 4):  # later responses, while the first array lives
                x = np.full(n, k, dtype=np.int64)
                r = await client.infer("encoder", {{"input": (x, "INT64")}})
                assert (r.outputs["output"] == ~x).all()
            out["first_intact"] = bool((first["output"] == ~np.arange(n, dtype=np.int64)).all())
            del r, first
            gc.collect()
            hits = server.completions.pool_stats()[0]
            await client.infer("encoder", {{"input": (np.arange(n, dtype=np.int64), "INT64")}})
            out["reused"] = server.completions.pool_stats()[0] - hits
            before = buffers.adopted
            small = await client.infer("encoder", {{"input": (np.arange(5, dtype=np.int64), "INT64")}})
            out["small_adopted"] = buffers.adopted - before
            out["small"] = small.outputs["output"].tolist()
        return out

    print(json.dumps(asyncio.run(go())))
    """
    out = _run(script, tmp_path)
    assert out["adopted"] == 1 and out["writeable"] is False
    assert out["first_intact"], "a later response wrote into the buffer of an array still alive"
    assert out["reused"] >= 1, "the collected array's buffer did not go back to the pool"
    assert out["small_adopted"] == 0 and out["small"] == [~v for v in range(5)]


@pytest.mark.parametrize("mode", ["in-process", "subprocess"])
def test_a_failing_load_is_a_prompt_error_and_a_hung_load_breaks_the_server(tmp_path, mode):
    """Loads that fail (initialize raises, an unknown backend) raise TritonServerError with Triton's
    reason within seconds, and the server serves on. (In process they used to be retried for ever:
    the C API leaves the load retry count uninitialized.) A load that never returns (initialize
    hangs; Triton 2.51 cannot interrupt it) raises once its timeout passes and breaks the server:
    its exit callbacks fire (the worker restarts on that), the stop is prompt, the process exits
    and no stub or shared-memory region outlives it."""
    script = f"""
    import asyncio, json, os, time
    import numpy as np
    from tdask.triton.inprocess import InProcessServer
    from tdask.triton.server import TritonServer, TritonServerError

    async def go():
        out = {{"exited": []}}
        cls = InProcessServer if {mode!r} == "in-process" else TritonServer
        # stop_timeout_s=2: Triton's exit timeout 1 s (not 5), its wait for the hung load at the stop.
        server = cls(model_repository=[{str(TEST_MODELS)!r}, {str(MODELS)!r}], log_dir={str(tmp_path)!r},
                     name="loads", stop_timeout_s=2)
        await server.start()
        server.add_exit_callback(out["exited"].append)
        out["prefix"] = server.shm_region_prefix
        for label, config in (("raise", {{"parameters": {{"init": "raise"}}}}), ("backend", {{"backend": "nope"}})):
            began = time.monotonic()
            try:
                await server.load_model("misbehaving", config, timeout_s=60)
            except TritonServerError as exc:
                out[label] = [str(exc), time.monotonic() - began]
        await server.load_model("encoder", timeout_s=60)
        client = server.client()  # either kind's, through the one interface
        r = await client.infer("encoder", {{"input": (np.arange(2, dtype=np.int64), "INT64")}})
        out["served"] = r.outputs["output"].tolist()
        began = time.monotonic()
        try:
            await server.load_model("misbehaving", {{"parameters": {{"init": "hang"}}}}, timeout_s=3)
        except TritonServerError as exc:
            out["hang"] = [str(exc), time.monotonic() - began]
        for _ in range(100):
            if out["exited"]:
                break
            await asyncio.sleep(0.05)
        out["alive"] = server.is_alive()
        out["broken"] = server.broken
        began = time.monotonic()
        await server.stop()
        out["stop_s"] = time.monotonic() - began
        return out

    print(json.dumps(asyncio.run(go())))
    """
    out = _run(script, tmp_path, timeout=150)
    assert "failed to initialize on purpose" in out["raise"][0] and out["raise"][1] < 30, out
    assert "nope" in out["backend"][0] and out["backend"][1] < 30, out
    assert out["served"] == [-1, -2]
    assert "cannot be interrupted" in out["hang"][0] and 3 <= out["hang"][1] < 10, out
    assert out["exited"] and out["alive"] is False, out
    # Why it cannot serve on: in process, the load; a tritonserver was killed for it.
    expected = "cannot be interrupted" if mode == "in-process" else "exited (status -9)"
    assert expected in (out["broken"] or ""), out
    assert out["stop_s"] < 30, out

    import psutil

    def leftovers() -> list[str]:
        found = [
            f"{p.pid} {p.name()}"
            for p in psutil.process_iter(["cmdline"])
            if out["prefix"] in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE
        ]
        return found + [r.name for r in Path("/dev/shm").glob(out["prefix"] + "*")]

    wait_for(lambda: not leftovers(), timeout=15, message=lambda: f"left behind: {leftovers()}")


def test_a_graceful_stop_answers_what_is_in_flight_and_leaves_triton_nothing_to_wait_for(tmp_path):
    """stop() while a request runs (the encoder sleeping about 0.5 s): the request is answered, right,
    not failed; every model is unloaded before Triton's own stop, which finds no live model at
    its first look (its exit timeout 0: no once-a-second wait); no stub is left when stop returns."""
    script = f"""
    import asyncio, json, logging
    import numpy as np, psutil
    from tdask.triton.inprocess import InProcessServer

    warnings = []
    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())
    logging.getLogger("tdask").addHandler(Keep())

    async def go():
        server = InProcessServer(model_repository={str(MODELS)!r}, log_dir={str(tmp_path)!r}, name="graceful")
        await server.start()
        await server.load_model("encoder")
        await server.load_model("decoder")
        x = np.arange(1000, dtype=np.int64)
        call = asyncio.ensure_future(
            server.client().infer("encoder", {{"input": (x, "INT64")}}, parameters={{"delay": 0.0005}})
        )
        await asyncio.sleep(0.2)  # the encoder is sleeping in its execute()
        running = not call.done()
        await server.stop()
        answer = await call
        return {{
            "running_at_stop": running,
            "answer_right": answer.outputs["output"].tolist() == (~x).tolist(),
            "children": [p.name() for p in psutil.Process().children(recursive=True)],
            "warnings": warnings,
        }}

    print(json.dumps(asyncio.run(go())))
    """
    out = _run(script, tmp_path)
    assert out["running_at_stop"], "the request had finished before the stop: the test proves nothing"
    assert out["answer_right"], out
    assert out["children"] == [], f"stubs left when stop returned: {out['children']}"
    assert out["warnings"] == [], out["warnings"]
    log = (tmp_path / "graceful.triton.log").read_text()
    assert "Found 0 live models" in log and "Timeout 0: Found 0 live models" in log, log[-3000:]
    assert "successfully unloaded 'encoder'" in log and "successfully unloaded 'decoder'" in log


def test_stubs_do_not_outlive_a_killed_owner(tmp_path):
    """SIGKILL the process hosting Triton: the reaper ends its python-backend stubs and removes their
    shared memory (the owner's process group is left alone)."""
    import psutil

    from tdask.triton.process import SHM_DIR

    script = f"""
    import asyncio, json, os, signal
    from tdask.triton.inprocess import InProcessServer
    server = InProcessServer(model_repository={str(MODELS)!r}, log_dir={str(tmp_path)!r}, name="owned")
    async def go():
        await server.start()
        await server.load_model("encoder")
    asyncio.run(go())
    print(json.dumps({{"pid": os.getpid(), "shm": server.shm_region_prefix}}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
    info = _run(script, tmp_path)

    def stubs() -> list[int]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if info["shm"] in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.info["pid"])
        return found

    wait_for(lambda: stubs() == [], timeout=20, message=lambda: f"stubs outlived their owner: {stubs()}")
    wait_for(lambda: not list(SHM_DIR.glob(info["shm"] + "*")), timeout=20, message="shared memory left behind")


def test_build_shim_ahead_of_use_and_find_it(tmp_path):
    """``python -m tdask.triton.capi --build-shim --into DIR`` (what the container images run) compiles
    the shim; a worker finds it there through $TDASK_SHIM_DIR and logs that it uses it."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here to build the shim with")
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp_path / "cache"))
    built = subprocess.run(
        [sys.executable, "-m", "tdask.triton.capi", "--build-shim", "--into", str(tmp_path / "shim")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    path = Path(built.stdout.strip())
    assert path.parent == tmp_path / "shim" and path.is_file()
    script = """
    import json, logging
    logging.basicConfig(level=logging.INFO)
    from tdask.triton import capi, shim
    print(json.dumps({"found": str(shim.find_shim()), "native": shim.Completions(capi.TritonCApi.load()).native}))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env, TDASK_SHIM_DIR=str(path.parent)),
    )
    assert json.loads(done.stdout.splitlines()[-1]) == {"found": str(path), "native": True}, done.stderr
    assert f"Triton's callbacks: tdask's C shim {path}" in done.stderr
    assert not (tmp_path / "cache").exists(), "nothing was compiled into the user's cache"
