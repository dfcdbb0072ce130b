"""The README's Python example runs as written (as a script, since it starts worker processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, assert_no_children

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def test_readme_python_example(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has a Python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    result = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=150,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^\[0 2 4\] from tcp://127\.0\.0\.1:\d+$", result.stdout, re.M), result.stdout
    assert_no_children()
