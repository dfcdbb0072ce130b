"""A script that starts a Deployment without ``if __name__ == "__main__":`` fails fast, naming the fix
(issue 23, item 6a). Before, it hung (180 s tried) printing nanny-start-failed tracebacks: every
worker process, spawned, imported the script again and started the deployment again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent

HEAD = """
from tdask import Deployment, OperatorConfig
from tdask.hello_world import MODEL_REPOSITORY
encoder = OperatorConfig(name="encoder", implementation="triton", repository=MODEL_REPOSITORY)
"""

SCRIPTS = {
    # The plain mistake: caught in the script's own process before anything starts.
    "top-level": HEAD + "with Deployment([encoder], dashboard_address=None) as d:\n    print('started')\n",
    # A guard that does not guard (true in the spawned workers too): caught in each worker as it
    # imports the script, which tells the script's process; that one stops waiting.
    "worker-side": HEAD
    + "if __name__ in ('__main__', '__mp_main__'):\n"
    + "    with Deployment([encoder], dashboard_address=None) as d:\n        print('started')\n",
}


@pytest.mark.parametrize("case", list(SCRIPTS))
def test_a_script_without_the_main_guard_fails_fast_naming_the_fix(tmp_path, case):
    script = tmp_path / "pipeline.py"
    script.write_text(SCRIPTS[case])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    took = time.monotonic() - began
    assert done.returncode != 0 and "started" not in done.stdout, done.stdout + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tdask.exceptions.MainGuardError: "), done.stderr[-3000:]
    assert 'put the code that starts it under `if __name__ == "__main__":`' in last, last
    assert str(script) in last, last
    if case == "top-level":
        assert "(line 5)" in last, last
    assert took < 60, took  # not a hang until some deadline
    left = [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]
    assert not left, left


def test_the_guarded_script_still_runs(tmp_path):
    """The same deployment under the guard starts (the check is quiet about guarded code)."""
    script = tmp_path / "pipeline.py"
    script.write_text(
        HEAD + "if __name__ == '__main__':\n    with Deployment([encoder], dashboard_address=None) as d:\n"
        "        print('started')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-3000:]
