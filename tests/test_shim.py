"""The in-process mode's C shim cannot hurt a worker (issue 23, item 4).

A cached shim that is truncated, empty, random, garbled inside its code or a foreign library
is never mapped: it fails verification (its content hash against the stamp written at build),
is rebuilt once and then serves; a compiler that hangs costs a bounded wait, then Python
callbacks. Each case runs in a fresh Python process (a bad shim loaded would kill it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

if not (shutil.which("cc") or shutil.which("gcc")):
    pytest.skip("no C compiler here to build the shim with", allow_module_level=True)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        TDASK_SHIM_DIR=str(tmp_path / "shim"),
        **extra,
    )


def _python(script: str, env: dict[str, str], timeout: float = 180) -> tuple[dict, str, float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout, env=env
    )
    took = time.monotonic() - began
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, f"rc={done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1]), done.stderr, took


def _build(tmp_path: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "tdask.triton.capi", "--build-shim", "--into", str(tmp_path / "shim")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def _text_section(data: bytes) -> tuple[int, int]:
    """(offset, size) of an ELF64 little-endian file's ``.text``."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        end = data.index(b"\0", names_at + name)
        if data[names_at + name : end] == b".text":
            return offset, size
    raise AssertionError("no .text section")


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:4096])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "garbled-text":
        offset, size = _text_section(data)
        path.write_bytes(data[:offset] + b"\0" * size + data[offset + size :])  # same ELF, code zeroed
    elif how == "foreign-elf":
        import _ctypes

        other = getattr(_ctypes, "__file__", None)
        if other is None:
            pytest.skip("_ctypes is built into this Python: no other shared library at hand")
        shutil.copyfile(other, path)  # a valid shared library without the shim's symbols
    else:
        raise AssertionError(how)


CASES = ["truncated", "empty", "random", "garbled-text", "foreign-elf"]

CHECK_EACH = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from tdask.triton import capi, shim
api = capi.TritonCApi.load()
completions = shim.Completions(api)
completions.pool_stats()  # calls into the shim: garbage in its code would crash here
print(json.dumps({"native": completions.native}))
"""


@pytest.mark.parametrize("how", CASES)
def test_a_corrupt_cached_shim_is_never_loaded_and_is_rebuilt(tmp_path, how):
    """Truncated (SIGBUS before), garbled code (SIGSEGV before), empty, random bytes (never
    rebuilt before), another library (AttributeError before): each is detected before it is
    mapped, rebuilt once with one log line naming the file, and the rebuilt shim serves."""
    path = _build(tmp_path)
    good = path.read_bytes()
    _corrupt(path, how)
    assert path.read_bytes() != good
    out, stderr, _ = _python(CHECK_EACH, _env(tmp_path))
    assert out == {"native": True}, stderr
    assert f"tdask's C shim {path} is unusable" in stderr and "rebuilding it" in stderr, stderr
    rebuilt = path.read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == (path.parent / (path.name + ".sha256")).read_text().split()[0]
    assert rebuilt[:4] == b"\x7fELF" and len(rebuilt) == len(good)
    assert not (tmp_path / "cache").exists(), "rebuilt where it was, not in the user's cache"


def test_a_hanging_compiler_costs_a_bounded_wait_then_python_callbacks(tmp_path):
    """A compiler that never finishes delays the start by SHIM_START_WAIT_S at most (60 s before):
    Python callbacks serve, one warning names the file."""
    compiler = tmp_path / "cc-hangs"
    compiler.write_text("#!/bin/sh\nexec sleep 30\n")
    compiler.chmod(0o755)
    script = """
    import json, logging, time
    logging.basicConfig(level=logging.INFO)
    from tdask.triton import capi, shim
    shim.SHIM_START_WAIT_S = 2.0
    api = capi.TritonCApi.load()
    began = time.monotonic()
    completions = shim.Completions(api)
    print(json.dumps({"native": completions.native, "took": time.monotonic() - began}))
    """
    out, stderr, _ = _python(script, _env(tmp_path, CC=str(compiler)))
    assert out["native"] is False and out["took"] < 20, (out, stderr)
    assert "is still compiling after 2s; using Python callbacks" in stderr, stderr
    assert str(tmp_path / "cache" / "tdask" / "tdask_inprocess_shim-") in stderr, stderr  # names the file


def test_in_process_triton_serves_after_its_shim_was_garbled(tmp_path):
    """A real in-process Triton server (as a worker starts it) over a shim whose code was zeroed:
    it starts, loads a model, answers a request with the C shim, and the file was rebuilt."""
    path = _build(tmp_path)
    _corrupt(path, "garbled-text")
    script = f"""
    import asyncio, json, logging
    import numpy as np
    logging.basicConfig(level=logging.INFO)
    from tdask.triton.inprocess import InProcessServer

    async def go():
        server = InProcessServer(model_repository=[{str(MODELS)!r}], log_dir={str(tmp_path / "logs")!r},
                                 name="shim", metrics=False)
        async with server:
            await server.load_model("encoder")
            x = np.arange(4, dtype=np.int64)
            r = await server.client().infer("encoder", {{"input": (x, "INT64")}})
            return {{"native": server.native_callbacks, "output": r.outputs["output"].tolist()}}

    print(json.dumps(asyncio.run(go())))
    """
    out, stderr, _ = _python(script, _env(tmp_path))
    assert out["native"] is True, stderr
    assert out["output"][:4] == [~v for v in range(4)], out
    assert f"tdask's C shim {path} is unusable" in stderr, stderr
    assert (
        hashlib.sha256(path.read_bytes()).hexdigest() == (path.parent / (path.name + ".sha256")).read_text().split()[0]
    )
