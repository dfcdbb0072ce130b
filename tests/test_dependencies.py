"""The base install and the extras resolve from PyPI alone into one stack (docs/design.md, "Dependencies").

Each install is resolved by ``pip install --dry-run --report`` against https://pypi.org/simple only
(``--isolated``: no local indexes, no constraints files). Skipped when PyPI cannot be reached.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(300)

INSTALLS = ["", "[gpu]", "[ucx]", "[gpu,ucx]"]


def _pypi_unreachable() -> str | None:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError as exc:
        return f"PyPI cannot be reached ({exc})"
    return None


def _resolve(extra: str) -> dict[str, str]:
    """Package name -> version that pip would install for ``tdask<extra>`` in an empty environment."""
    argv = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--quiet", "--ignore-installed"]
    argv += ["--index-url", "https://pypi.org/simple", "--report", "-", f"{ROOT}{extra}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"tdask{extra} does not resolve:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict[str, str]]:
    reason = _pypi_unreachable()
    if reason:
        pytest.skip(reason)
    with ThreadPoolExecutor(len(INSTALLS)) as pool:
        return dict(zip(INSTALLS, pool.map(_resolve, INSTALLS), strict=True))


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def test_every_install_is_on_numpy_1_with_the_bundled_triton(resolved):
    for extra, versions in resolved.items():
        assert _major_minor(versions["numpy"]) < (2, 0), (extra, versions["numpy"])
        assert "nvidia-pytriton" in versions and "tritonclient" in versions, extra
        assert versions["dask"] == versions["distributed"], (extra, versions["dask"], versions["distributed"])


def test_the_extras_are_one_rapids_release_on_one_dask(resolved):
    extras = {extra: resolved[extra] for extra in ("[gpu]", "[ucx]", "[gpu,ucx]")}
    assert len({v["dask"] for v in extras.values()}) == 1, {e: v["dask"] for e, v in extras.items()}
    assert len({v["rapids-dask-dependency"] for v in extras.values()}) == 1
    both = resolved["[gpu,ucx]"]
    assert both["dask-cuda"] == resolved["[gpu]"]["dask-cuda"]
    assert both["distributed-ucxx-cu12"] == resolved["[ucx]"]["distributed-ucxx-cu12"]
    assert both["cupy-cuda12x"] == resolved["[gpu]"]["cupy-cuda12x"]
    # dask-cuda and rapids-dask-dependency are released together (26.6 with 26.6).
    assert _major_minor(both["dask-cuda"]) == _major_minor(both["rapids-dask-dependency"])
    assert not any(name.endswith("-cu13") or name == "cupy-cuda13x" for name in both), sorted(both)


def test_the_base_install_takes_at_least_the_extras_dask(resolved):
    base = tuple(int(p) for p in resolved[""]["dask"].split("."))
    extras = tuple(int(p) for p in resolved["[gpu,ucx]"]["dask"].split("."))
    assert base >= extras
    assert "dask-cuda" not in resolved[""] and "distributed-ucxx-cu12" not in resolved[""]
