"""The host-copy labels the GPU tests look for are ones the code can emit, checked without a GPU.

``tests/test_gpu_shared_memory.py`` asserts that some labels of
:data:`tdask.data_plane.HOST_COPIES` are absent on the CUDA shared-memory path; an absent label
proves nothing if the code can never emit it. Without a GPU (and with no fake of Triton or cupy
standing in for one), what can be checked is the code itself: each label the GPU tests import is
a constant that some call of :func:`tdask.data_plane.count_host_copy` in tdask passes as its
``where``. That the call runs on a GPU, and counts what it should, is the GPU tests' own job
(they run where a GPU is lent; see docs/design.md, "GPU").
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import tdask
from tdask.triton import operator as triton_operator
from tdask.triton import shared_memory

TDASK = Path(tdask.__file__).parent
GPU_TEST = Path(__file__).parent / "test_gpu_shared_memory.py"


def _labels_the_gpu_test_checks() -> set[str]:
    """The names test_gpu_shared_memory.py imports from tdask and asserts ``not in where``."""
    tree = ast.parse(GPU_TEST.read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tdask")
        for alias in node.names
    }
    checked = {
        node.left.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and isinstance(node.left, ast.Name)
        and any(isinstance(op, ast.NotIn) for op in node.ops)
    }
    return imported & checked


def _where_arguments_of_count_host_copy() -> dict[str, list[str]]:
    """Each name passed as ``where`` to count_host_copy in tdask -> the files that pass it."""
    found: dict[str, list[str]] = {}
    for path in sorted(TDASK.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "count_host_copy"):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            where = node.args[1] if len(node.args) > 1 else keywords.get("where")
            if isinstance(where, ast.Name):
                found.setdefault(where.id, []).append(str(path.relative_to(TDASK)))
    return found


def test_the_gpu_test_checks_the_two_host_copy_labels():
    assert _labels_the_gpu_test_checks() == {"KIND_GPU_OUTPUTS_IN_HOST_MEMORY", "DEVICE_INPUT_IN_HTTP_BODY"}


@pytest.mark.parametrize(
    ("name", "module"),
    [("KIND_GPU_OUTPUTS_IN_HOST_MEMORY", triton_operator), ("DEVICE_INPUT_IN_HTTP_BODY", shared_memory)],
)
def test_each_label_the_gpu_test_checks_is_counted_by_the_code(name, module):
    """The constant is defined once, in the module the GPU test imports it from, is a non-empty
    string, and is what a count_host_copy call of that module passes as its ``where``."""
    value = getattr(module, name)
    assert isinstance(value, str) and value
    passed = _where_arguments_of_count_host_copy()
    assert name in passed, f"no count_host_copy(..., {name}) anywhere in tdask: the GPU test's check proves nothing"
    assert Path(inspect.getfile(module)).name in {Path(p).name for p in passed[name]}, passed[name]
    # No other module spells the same label as a literal (two spellings drift apart).
    literal = [
        str(path.relative_to(TDASK))
        for path in TDASK.rglob("*.py")
        if path != Path(inspect.getfile(module)) and repr(value)[1:-1] in path.read_text()
    ]
    assert not literal, f"{value!r} spelt again in {literal}"
