"""The ``tdask`` command group: ``tdask check`` on this machine's real Triton, help, usage errors, and
the hello world run through the group (a real cluster, as a subprocess)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import tomllib
import warnings
from importlib.metadata import EntryPoint
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tdask.cli import main
from tests.conftest import ROOT
from tests.test_hello_world import PY, _assert_clean, _env, _run

pytestmark = pytest.mark.timeout(300)

CHECKS = ["tritonserver", "python-stub", "in-process", "numpy", "loopback", "versions", "gpu"]


def test_check_passes_here_with_one_line_per_check():
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[1] for line in lines] == CHECKS
    by_name = {line.split()[1]: line for line in lines}
    for name in CHECKS[:-1]:  # the gpu line is a warning where there is none
        assert by_name[name].startswith("OK "), by_name[name]
    origins = r"the nvidia-pytriton wheel|PATH|\$TDASK_TRITONSERVER|/opt/tritonserver"
    assert re.search(rf"tritonserver \(from ({origins})\)$", by_name["tritonserver"]), by_name["tritonserver"]
    assert "triton_python_backend_stub" in by_name["python-stub"]
    assert re.search(r"libtritonserver\S* \(C API 1\.\d+\); callbacks: (C shim|Python)", by_name["in-process"])
    assert re.search(r"tdask [\d.]+, dask [\d.]+, distributed [\d.]+", by_name["versions"])


@pytest.mark.cluster
def test_check_json_is_one_object():
    """Through ``python -m tdask.cli``, as a user runs it."""
    result = subprocess.run(
        [PY, "-m", "tdask.cli", "check", "--json"], env=_env(), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["ok"] for c in report["checks"] if c["required"])
    assert {c["status"] for c in report["checks"]} <= {"OK", "WARN"}


def test_check_fails_without_a_tritonserver(tmp_path):
    missing = str(tmp_path / "no-tritonserver")
    result = CliRunner().invoke(main, ["check"], env={"TDASK_TRITONSERVER": missing})
    assert result.exit_code == 1, result.output
    assert re.search(rf"^FAIL tritonserver .*{re.escape(missing)}", result.output, re.M), result.output
    assert re.search(r"^FAIL python-stub ", result.output, re.M), result.output
    assert re.search(r"^OK   numpy ", result.output, re.M), result.output


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:")[1].split()
    for name in ("check", "client", "deploy", "hello-world"):
        assert name in commands, result.output
    # A lazy subcommand has the hello world's own flags.
    result = CliRunner().invoke(main, ["hello-world", "--help"])
    assert result.exit_code == 0, result.output
    assert "--encoders" in result.output and "--requests-per-client" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["check", "--nope"], "No such option"),
        (["nope"], "No such command 'nope'"),
        (["hello-world", "--encoders", "0", "1", "1", "CPU"], "N must be >= 1"),
        (["client"], "--scheduler-address is required"),
    ],
)
def test_bad_usage_is_a_usage_error(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # click's usage error, not an exception


def test_the_group_does_not_import_the_hello_world():
    code = "import sys, tdask.cli; print(sorted(m for m in sys.modules if m.startswith('tdask.hello_world')))"
    result = subprocess.run([PY, "-c", code], env=_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_dask_tdask_through_the_dask_cli_entry_point():
    """``dask tdask check``: the entry point pyproject declares, registered the way ``dask`` does."""
    import dask.cli

    pyproject = tomllib.loads(Path(ROOT, "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["tdask"] == "tdask.cli:main"
    value = pyproject["project"]["entry-points"]["dask_cli"]["tdask"]
    dask_group = click.Group(name="dask", commands=dict(dask.cli.cli.commands))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dask only warns when an entry point does not load
        dask.cli._register_command_ep(dask_group, EntryPoint(name="tdask", value=value, group="dask_cli"))
    result = CliRunner().invoke(dask_group, ["tdask", "check"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK   tritonserver")


@pytest.mark.cluster
def test_hello_world_through_the_group(tmp_path):
    since = time.time()
    args = ["hello-world", "--requests-per-client", "20", "--dashboard-address", "127.0.0.1:0"]
    result = _run(["-m", "tdask.cli", *args, "--log-dir", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^scheduler: tcp://127\.0\.0\.1:\d+$", result.stdout, re.M)
    assert "Correct: 20/20" in result.stdout
    _assert_clean(since)
