"""A broken model says what Triton said (issue 23, item 5).

Triton answers a load of a model whose ``config.pbtxt`` does not parse, or whose directory does
not match its name, with "failed to poll from model repository" only (its reason goes to its log
or the process's stderr); a python-backend model without its model file makes Triton 2.51's load
wait for ever. The error callers see carries Triton's own reason (the parser's line and column,
"directory name must equal model name", "Python model file not found"), in both server kinds and
through a Deployment's start failure (the text the scheduler's operator registry records).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import pytest

from tdask import Deployment, OperatorConfig
from tests.conftest import assert_no_children, child_pids

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
ENCODER = ROOT / "models" / "encoder"

#: model -> (how its copy of the encoder is broken, what the error must say)
BROKEN = {
    "typo": ("max_batch_size", "max_bacth_size", r'5:\d+ : Message type "inference.ModelConfig" has no field named'),
    "wrongtype": ("TYPE_INT64", "TYPE_INT65", r"1\d:\d+ : .*has no value named TYPE_INT65"),
    "mismatch": (None, None, "unexpected directory name 'mismatch' for model 'other', directory name must equal"),
    "nofile": (None, None, r"Python model file not found in '.*nofile/1/model\.py'"),
}


def broken_repository(root: Path) -> Path:
    """A model repository with one copy of the hello world's encoder per way of breaking it."""
    repo = root / "repo"
    for model, (old, new, _) in BROKEN.items():
        shutil.copytree(ENCODER, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
        config = repo / model / "config.pbtxt"
        text = config.read_text().replace('name: "encoder"', f'name: "{model}"')
        if old is not None:
            text = text.replace(old, new, 1)
        if model == "mismatch":
            text = text.replace('name: "mismatch"', 'name: "other"')
        config.write_text(text)
        if model == "nofile":
            (repo / model / "1" / "model.py").unlink()
    return repo


@pytest.mark.parametrize("kind", ["in-process", "subprocess"])
def test_each_broken_model_fails_with_tritons_reason(tmp_path, kind):
    """Every way of breaking a model gives a TritonServerError carrying Triton's own reason, at
    once (the missing model file too, which Triton alone would wait on for ever); the server
    serves on, and its log is in the log directory given."""
    import re

    repo = broken_repository(tmp_path)
    script = f"""
    import asyncio, json, time
    from tdask.triton.factory import make_server
    from tdask.triton.options import TritonOptions
    from tdask.triton.base import TritonServerError

    async def go():
        out = {{}}
        options = TritonOptions(model_repository={str(repo)!r}, log_dir={str(tmp_path / "logs")!r}, name="w1",
                                metrics=False)
        async with make_server(options, mode={kind!r}) as server:
            for model in {list(BROKEN)!r}:
                began = time.monotonic()
                try:
                    await server.load_model(model, timeout_s=60)
                    out[model] = ["loaded", 0]
                except TritonServerError as exc:
                    out[model] = [str(exc), time.monotonic() - began]
            out["alive"] = server.is_alive()
        return out

    print(json.dumps(asyncio.run(go())))
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=200, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rc={done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    out = json.loads(lines[-1])
    for model, (_, _, said) in BROKEN.items():
        message, took = out[model]
        assert re.search(said, message), (model, message)
        assert took < 30, (model, took)  # not the 60 s load timeout (nofile waited for ever before)
    assert out["alive"] is True
    assert (tmp_path / "logs" / "w1.triton.log").is_file()


def test_a_deployment_with_a_broken_config_fails_saying_what_triton_said(tmp_path):
    """Through a Deployment (in-process Triton, the default): the start failure, which is the text
    the worker's operator registry records for `tdask status`, carries the parse error with its
    line, not only "failed to poll from model repository"; Triton's log is in the log directory."""
    repo = broken_repository(tmp_path)
    before = child_pids()
    broken = OperatorConfig(name="typo", implementation="triton", repository=repo)
    with dask.config.set({"tdask.triton.load-timeout": "60s"}):
        began = time.monotonic()
        with pytest.raises(RuntimeError, match="failed to start.*typo: TritonServerError") as info:
            with Deployment([(broken, 1)], dashboard_address="127.0.0.1:0", log_dir=tmp_path / "logs"):
                pass
    message = str(info.value)
    assert 'has no field named "max_bacth_size"' in message and "config.pbtxt: 5:" in message, message
    assert time.monotonic() - began < 90
    assert list((tmp_path / "logs").glob("*.triton.log")), list((tmp_path / "logs").iterdir())
    assert_no_children(ignore=before)
