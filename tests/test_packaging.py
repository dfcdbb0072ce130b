"""Packaging: the wheel carries the hello world's models (top-level ``models/``) and every module,
and ``MODEL_REPOSITORY`` resolves in a non-editable and in an editable install.

Each install goes into a bare virtual environment of its own (no pip in it: this environment's
pip installs into it, ``--no-deps``), which sees this environment's packages for tdask's
dependencies through a ``.pth`` line, after its own.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(240)

SHOW = "import tdask.hello_world as h, tdask; print(h.MODEL_REPOSITORY); print(tdask.__file__)"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """What a build reads (pyproject, README, tdask/, models/), copied: a build writes into its tree."""
    dest = tmp_path_factory.mktemp("source") / "tdask-src"
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(Path(ROOT) / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("tdask", "models"):
        shutil.copytree(Path(ROOT) / name, dest / name, ignore=ignore)
    return dest


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH (the conftest puts the checkout there)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def bare_venv(path: Path) -> Path:
    """A venv without pip whose ``sys.path`` ends with this environment's site-packages."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "zz_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def resolve(python: Path, cwd: Path) -> tuple[Path, Path]:
    """MODEL_REPOSITORY and tdask's own file, as that interpreter sees them (no PYTHONPATH)."""
    result = subprocess.run([python, "-c", SHOW], capture_output=True, text=True, env=clean_env(), cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    repository, module = result.stdout.split()
    return Path(repository), Path(module)


def assert_is_the_model_repository(path: Path) -> None:
    for model in ("encoder", "decoder"):
        assert (path / model / "config.pbtxt").is_file(), sorted(path.rglob("*"))
        assert (path / model / "1" / "model.py").is_file(), sorted(path.rglob("*"))


def test_the_wheel_carries_the_models_and_every_module_and_finds_them_installed(source, tmp_path):
    pip("wheel", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(source))
    (wheel,) = (tmp_path / "dist").glob("tdask-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("encoder", "decoder"):
        assert {f"tdask/models/{model}/config.pbtxt", f"tdask/models/{model}/1/model.py"} <= names, sorted(names)
    assert "tdask/tdask.yaml" in names
    modules = {p.relative_to(ROOT).as_posix() for p in Path(ROOT, "tdask").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel (pyproject's packages list): {modules - names}"
    assert not any(name.startswith("models/") for name in names), "models/ ships inside tdask, not beside it"

    python = bare_venv(tmp_path / "venv")
    # --ignore-installed: the parent environment, seen through the .pth, may hold a tdask too.
    pip("--python", str(python), "install", "--no-deps", "--ignore-installed", str(wheel))
    repository, module = resolve(python, tmp_path)
    site_packages = tmp_path / "venv" / "lib"
    assert module.is_relative_to(site_packages), module  # the installed copy, not the checkout
    assert repository == module.parent / "models"
    assert_is_the_model_repository(repository)


def test_an_editable_install_finds_the_checkouts_models(source, tmp_path):
    python = bare_venv(tmp_path / "venv")
    pip("--python", str(python), "install", "--no-deps", "--ignore-installed", "--editable", str(source))
    repository, module = resolve(python, tmp_path)
    assert module == source / "tdask" / "__init__.py"
    assert repository == source / "models"
    assert_is_the_model_repository(repository)
