"""Deployment files (fast tier: no cluster): what a valid file becomes, and how an invalid one is refused.

Every refusal names the file, the line of the offending key and the field, before anything
starts; unknown fields get the closest known one. Also here: ``tdask serve --check`` and
``--model-repository`` (the plan, nothing started), a malformed ``--tdask-operator``, and
``tdask status``'s table from a registry state.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tdask import Deployment
from tdask.cli import main
from tdask.deployment_file import load_deployment_file, loads_deployment, repository_models, spec_for_repository
from tdask.exceptions import DeploymentFileError, TdaskError
from tdask.host.preload import parse_operator_option
from tdask.operate import format_status
from tests.conftest import ROOT

MODELS = Path(ROOT) / "models"
TEST_MODELS = Path(ROOT) / "tests" / "models"
EXAMPLE = Path(ROOT) / "examples" / "hello_world.yaml"


def write(tmp_path: Path, text: str, name: str = "deploy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def refusal(tmp_path: Path, text: str) -> DeploymentFileError:
    path = write(tmp_path, text)
    with pytest.raises(DeploymentFileError) as info:
        load_deployment_file(path)
    error = info.value
    assert error.file == str(path)
    assert str(error).startswith(f"{path}:{error.line}:"), str(error)
    return error


# -- a valid file ---------------------------------------------------------------------------------


def test_the_example_file_is_the_hello_world():
    spec = load_deployment_file(EXAMPLE)
    configs = {config.key: (config, n) for config, n in spec.operator_configs()}
    assert sorted(configs) == ["decoder/1", "encoder/1", "encoder_decoder/1"]
    encoder, n = configs["encoder/1"]
    assert n == 1 and encoder.is_triton and encoder.repository == str(MODELS.resolve())
    assert encoder.max_inflight_requests == 4
    assert encoder.parameters["config"]["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
    assert configs["encoder_decoder/1"][0].implementation == "tdask.hello_world.operators:EncoderDecoder"
    auto = spec.autoscaling["encoder_decoder/1"]
    assert (auto.minimum, auto.maximum, auto.target_inflight_per_worker) == (1, 3, 4.0)
    assert (auto.up_delay, auto.down_delay) == (5.0, 60.0)  # "5s", "1 minute"
    kwargs = spec.deployment_kwargs()
    assert kwargs["protocol"] == "tcp" and kwargs["host"] == "127.0.0.1"
    assert kwargs["log_dir"] == str((Path(ROOT) / "tdask-logs").resolve())  # relative to the file


def test_every_field(tmp_path):
    for name in ("ca.pem", "node.pem", "node.key"):
        (tmp_path / name).write_text("x")
    path = write(
        tmp_path,
        f"""
        cluster:
          protocol: tls
          host: 127.0.0.1
          scheduler_port: 8999
          dashboard_address: null
          log_dir: logs
          log_level: info
          startup_timeout_s: 30
          tls: {{ca_file: ca.pem, cert: node.pem, key: node.key}}
        operators:
          - name: upper
            implementation: triton
            repository: {TEST_MODELS}
            parameters: {{model: bytes_upper}}
            version: 1
            workers: 2
            max_inflight_requests: 3
            resources: {{GPU: 1}}
            routing: hash:session
            log_level: debug
            autoscaling: {{minimum: 1, maximum: 4, up_delay: 2, down_delay: 10s}}
          - name: double
            implementation: tests.operators:Identity
            parameters: {{factor: 3}}
            execution_timeout_s: 1 minute
        """,
    )
    spec = load_deployment_file(path)
    c = spec.cluster
    assert (c.protocol, c.scheduler_port, c.dashboard_address, c.log_level) == ("tls", 8999, None, "INFO")
    assert c.log_dir == str(tmp_path / "logs") and c.startup_timeout_s == 30.0
    assert c.tls is not None and c.tls.ca_file == str(tmp_path / "ca.pem")
    upper, double = spec.operators
    assert (upper.workers, upper.max_inflight_requests, upper.resources) == (2, 3, {"GPU": 1.0})
    assert upper.config().routing == {"policy": "hash", "parameter": "session"}
    assert upper.autoscaling is not None and upper.autoscaling.target_inflight_per_worker == 3.0  # its max_inflight
    assert spec.operator_options() == {"upper/1": {"resources": {"GPU": 1.0}}}
    assert double.config().parameters == {"factor": 3}
    assert double.config().execution_timeout_s == 60.0 and upper.config().execution_timeout_s is None
    kwargs = spec.deployment_kwargs()
    security = kwargs["security"]
    assert security.tls_ca_file == str(tmp_path / "ca.pem") and security.tls_worker_cert == str(tmp_path / "node.pem")
    # What Deployment makes of it (nothing started): one worker spec per worker, GPU resources on upper's.
    deployment = Deployment.from_file(path)
    assert deployment.spec is not None and sorted(deployment.workers_spec) == ["double.0", "upper.0", "upper.1"]
    assert deployment._worker_options("upper.0", upper.config())["resources"] == {"GPU": 1.0}
    assert "resources" not in deployment._worker_options("double.0", double.config())
    assert deployment.scheduler_port == 8999


def test_the_colocated_example_file_puts_the_hello_world_on_each_encoder_worker():
    spec = load_deployment_file(Path(ROOT) / "examples" / "hello_world_colocated.yaml")
    assert spec.deployment_kwargs()["colocate"] == {"decoder": "encoder", "encoder_decoder": "encoder"}
    deployment = Deployment.from_spec(spec)
    assert list(deployment.workers_spec) == ["encoder.0"]
    assert [c.key for c in deployment.guests["encoder"]] == ["decoder/1", "encoder_decoder/1"]


def test_colocated_operators_run_on_their_hosts_workers(tmp_path):
    """``colocate_with``: no workers of its own; the Deployment gets ``colocate`` and puts the
    guest in its host's workers' plugin."""
    path = write(
        tmp_path,
        """
        operators:
          - {name: forward, implementation: tests.operators:Forward, workers: 2}
          - {name: producer, implementation: tests.operators:Producer, colocate_with: forward}
        """,
    )
    spec = load_deployment_file(path)
    assert spec.deployment_kwargs()["colocate"] == {"producer": "forward"}
    assert "producer/1 on the workers of forward" in spec.describe() and ", 2 workers" in spec.describe()
    deployment = Deployment.from_spec(spec)
    assert sorted(deployment.workers_spec) == ["forward.0", "forward.1"]
    assert [c.key for c in deployment.guests["forward"]] == ["producer/1"]
    assert deployment.operator_workers("producer") == ["forward.0", "forward.1"]
    options = deployment._worker_options("forward.0", deployment.workers_spec["forward.0"])
    (host,) = options["plugins"]
    assert [c.key for c in host.operators] == ["forward/1", "producer/1"]
    with pytest.raises(ValueError, match="runs on the workers of 'forward'"):
        deployment._operator_config("producer")


@pytest.mark.parametrize(
    ("colocate", "words"),
    [
        ({"nope": "a"}, "'nope' is not an operator"),
        ({"b": "nope"}, "not an operator of this deployment with workers of its own"),
        ({"b": "a", "a": "b"}, "not an operator of this deployment with workers of its own"),
        ({"c": "a"}, "takes no worker count of its own"),
    ],
)
def test_a_deployment_refuses_colocation_it_cannot_do(colocate, words):
    from tdask import OperatorConfig

    ops = [
        OperatorConfig(name="a", implementation="tests.operators:Identity"),
        OperatorConfig(name="b", implementation="tests.operators:Identity"),
        (OperatorConfig(name="c", implementation="tests.operators:Identity"), 2),
    ]
    with pytest.raises(ValueError, match=words):
        Deployment(ops, colocate=colocate)


def test_an_entry_without_a_name_serves_every_model(tmp_path):
    path = write(tmp_path, f"operators: [{{implementation: triton, repository: {TEST_MODELS}, workers: 1}}]")
    spec = load_deployment_file(path)
    assert [op.name for op in spec.operators] == repository_models(TEST_MODELS)
    with_config = sorted(p.parent.name for p in TEST_MODELS.glob("*/config.pbtxt"))
    assert repository_models(TEST_MODELS) == with_config
    assert {"bytes_upper", "counter", "dtypes", "misbehaving"} <= set(with_config)
    spec = spec_for_repository(MODELS, workers=2, max_inflight_requests=4)
    assert [(c.name, c.max_inflight_requests, n) for c, n in spec.operator_configs()] == [
        ("decoder", 4, 2),
        ("encoder", 4, 2),
    ]


# -- refusals: file, line, field ------------------------------------------------------------------

BAD_FILES = [
    # (file, line, field, words in the message)
    (
        "operators:\n  - name: encoder\n    implementation: triton\n    repository: {models}\n    max_inflight: 4\n",
        5,
        "operators[0].max_inflight",
        "did you mean `max_inflight_requests`",
    ),
    (
        "clustr:\n  protocol: tcp\noperators:\n  - {{name: a, implementation: tests.operators:Identity}}\n",
        1,
        "clustr",
        "did you mean `cluster`",
    ),
    (
        "cluster:\n  protocol: udp\noperators:\n  - {{name: a, implementation: tests.operators:Identity}}\n",
        2,
        "cluster.protocol",
        "must be one of tcp, tls, ucxx",
    ),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n    workers: two\n",
        4,
        "operators[0].workers",
        "expected an integer",
    ),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n  - name: b\n"
        "    implementation: tests.operators:Identity\n    max_inflight_requests: 0\n",
        6,
        "operators[1].max_inflight_requests",
        "must be >= 1",
    ),
    (
        "operators:\n  - name: encodr\n    implementation: triton\n    repository: {models}\n",
        2,
        "operators[0].name",
        "did you mean 'encoder'",
    ),
    (
        "operators:\n  - name: encoder\n    implementation: triton\n    repository: {models}\n    version: 2\n",
        5,
        "operators[0].version",
        "has no version 2",
    ),
    (
        "operators:\n  - name: encoder\n    implementation: triton\n    repository: ./nowhere\n",
        4,
        "operators[0].repository",
        "is not a directory",
    ),
    (
        "operators:\n  - name: a\n    implementation: no_such_module_here:Op\n",
        3,
        "operators[0].implementation",
        "no module 'no_such_module_here'",
    ),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n"
        "    autoscaling: {{minimum: 3, maximum: 2}}\n",
        4,
        "operators[0].autoscaling.minimum",
        "minimum 3 is above maximum 2",
    ),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n"
        "    autoscaling:\n      minimum: 1\n      maximum: 2\n      up_delay: soon\n",
        7,
        "operators[0].autoscaling.up_delay",
        "expected a duration",
    ),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n"
        "  - name: a\n    implementation: tests.operators:Identity\n",
        4,
        "operators[1]",
        "listed twice (first on line 2)",
    ),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n    routing: random\n",
        4,
        "operators[0].routing",
        "routing policy must be one of",
    ),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n    resources: {{GPU: -1}}\n",
        4,
        "operators[0].resources.GPU",
        "must be > 0",
    ),
    (
        "cluster:\n  log_dir: x\n  tls: {{temporary: true}}\n"
        "operators:\n  - {{name: a, implementation: tests.operators:Identity}}\n",
        3,
        "cluster.tls",
        "set `protocol: tls`",
    ),
    ("operators:\n  - name: a\n    implementation: [triton\n", 4, "", "not valid YAML"),
    ("cluster: {{}}\n", 1, "", "needs `operators:`"),
    ("operators:\n  - name: a\n", 2, "operators[0]", "missing field `implementation`"),
    (
        "operators:\n  - name: a\n    implementation: tests.operators:Identity\n    execution_timeout_s: 0\n",
        4,
        "operators[0].execution_timeout_s",
        "must be a duration > 0",
    ),
    (
        "operators:\n  - {{name: a, implementation: tests.operators:Identity}}\n"
        "  - {{name: b, implementation: tests.operators:Identity, colocate_with: c}}\n",
        3,
        "operators[1].colocate_with",
        "'c' is not an operator of this file",
    ),
    (
        "operators:\n  - {{name: a, implementation: tests.operators:Identity, colocate_with: b}}\n"
        "  - {{name: b, implementation: tests.operators:Identity, colocate_with: a}}\n",
        2,
        "operators[0].colocate_with",
        "'b' is co-located itself",
    ),
    (
        "operators:\n  - {{name: a, implementation: tests.operators:Identity}}\n"
        "  - name: b\n    implementation: tests.operators:Identity\n    colocate_with: a\n    workers: 2\n",
        6,
        "operators[1].workers",
        "runs on every worker of 'a'",
    ),
]


@pytest.mark.parametrize(("text", "line", "field", "words"), BAD_FILES, ids=[b[2] or b[3] for b in BAD_FILES])
def test_bad_files_name_file_line_and_field(tmp_path, text, line, field, words):
    error = refusal(tmp_path, text.format(models=MODELS))
    assert (error.line, error.field) == (line, field), str(error)
    assert words in str(error), str(error)
    assert isinstance(error, TdaskError) and isinstance(error, ValueError)


def test_every_problem_is_reported_at_once(tmp_path):
    error = refusal(
        tmp_path,
        """
        cluster:
          protocl: tcp
        operators:
          - name: a
            implementation: tests.operators:Identity
            workers: 0
          - name: b
            implementation: tests.operators:Identity
            max_inflight_requests: many
        """,
    )
    fields = [(line, field) for line, field, _ in error.errors]
    assert fields == [(2, "cluster.protocl"), (6, "operators[0].workers"), (9, "operators[1].max_inflight_requests")]
    assert len(str(error).splitlines()) == 3


def test_a_missing_file(tmp_path):
    with pytest.raises(DeploymentFileError, match="cannot read the deployment file"):
        load_deployment_file(tmp_path / "nope.yaml")
    with pytest.raises(DeploymentFileError, match="holds no Triton model"):
        spec_for_repository(tmp_path)
    with pytest.raises(DeploymentFileError, match="expected a mapping"):
        loads_deployment("- a\n- b\n")


# -- the commands, nothing started ----------------------------------------------------------------


def test_serve_check_prints_the_plan_and_starts_nothing():
    result = CliRunner().invoke(main, ["serve", str(EXAMPLE), "--check"])
    assert result.exit_code == 0, result.output
    assert "3 operators, 3 workers" in result.output
    assert "encoder_decoder/1 x1: tdask.hello_world.operators:EncoderDecoder" in result.output
    result = CliRunner().invoke(main, ["serve", "--model-repository", str(TEST_MODELS), "--check"])
    assert result.exit_code == 0, result.output
    for model in ("bytes_upper", "counter", "dtypes", "misbehaving"):
        assert f"  {model}/1 x1: model of {TEST_MODELS.resolve()}" in result.output


def test_serve_refuses_a_bad_file_before_starting(tmp_path):
    path = write(tmp_path, "operators:\n  - name: a\n    implementation: tests.operators:Identity\n    wokers: 2\n")
    result = CliRunner().invoke(main, ["serve", str(path)])
    assert result.exit_code == 2
    assert f"{path}:4: operators[0].wokers: unknown field `wokers`; did you mean `workers`?" in result.output
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2 and "give a deployment FILE or --model-repository DIR" in result.output


def test_hello_world_flag_points_at_serve(tmp_path):
    result = CliRunner().invoke(main, ["deploy", "--triton-core-models", str(TEST_MODELS)])
    assert result.exit_code == 2
    assert "tdask serve --model-repository" in result.output


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{bad", "not JSON"),
        ('{"nmae": "x", "implementation": "triton"}', "unknown field 'nmae' (did you mean 'name'?)"),
        ('{"name": "x", "implementation": "nocolon"}', "implementation must be"),
        ("@/nonexistent/ops.yaml", "cannot read /nonexistent/ops.yaml"),
        ('{"name": "x"}', "missing field 'implementation'"),
    ],
)
def test_malformed_tdask_operator(text, words):
    with pytest.raises(click.BadParameter, match=None) as info:
        parse_operator_option(text)
    assert words in info.value.message


def test_status_table():
    state = {
        "names": {"tcp://127.0.0.1:1": "double.0", "tcp://127.0.0.1:2": "broken.0"},
        "operators": {
            "double/1": {
                "name": "double",
                "version": 1,
                "state": "ready",
                "reason": None,
                "workers": ["double.0"],
                "broker_errors": {"OperatorUnavailableError": 1},
            },
            "broken": {"name": "broken", "version": None, "state": "failed", "reason": "setup failed: boom"},
        },
        "workers": {
            "tcp://127.0.0.1:1": {
                "double/1": {"inflight": 2, "limit": 4, "outcomes": {"ok": 10, "OperatorError": 2}},
            }
        },
        "queued": {"double/1": 3},
        "starting": ["late.0"],
    }
    lines = format_status(state, "tcp://127.0.0.1:8786").splitlines()
    assert lines[0] == "scheduler tcp://127.0.0.1:8786: 1 of 2 operators ready"
    assert lines[1].split() == ["OPERATOR", "VERSION", "STATE", "WORKERS", "IN", "FLIGHT", "QUEUED", "ANSWERED"] + [
        "ERRORS",
        "REASON",
    ]
    assert lines[2].split()[:4] == ["broken", "-", "failed", "-"] and lines[2].endswith("setup failed: boom")
    row = lines[3].split("  ")
    row = [c.strip() for c in row if c.strip()]
    assert row == [
        "double",
        "1",
        "ready",
        "double.0",
        "2/4",
        "3",
        "12",
        "OperatorError x2, OperatorUnavailableError x1",
    ]
    assert any(line.startswith("double.0") and "double/1 2/4" in line for line in lines)
    assert any(line.startswith("late.0") and "starting" in line for line in lines)


def test_the_readme_shows_the_example_file():
    import re

    import yaml

    readme = (Path(ROOT) / "README.md").read_text()
    section = readme.split("### A deployment file", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "the README shows a deployment file"
    assert yaml.safe_load(block.group(1)) == yaml.safe_load(EXAMPLE.read_text())


def test_problems_are_listed_in_the_files_order(tmp_path):
    error = refusal(
        tmp_path,
        """
        operators:
          - name: a
            implementation: tests.operators:Identity
            workers: 5
            autoscaling: {minimum: 1, maximum: 2, up_delay: soon}
        """,
    )
    assert [(line, field) for line, field, _ in error.errors] == [
        (4, "operators[0].workers"),
        (5, "operators[0].autoscaling.up_delay"),
    ]
    assert error.line == 4 and "outside the autoscaling bounds 1..2" in str(error).splitlines()[0]


def test_status_says_when_the_scheduler_cannot_be_reached():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["status", "--scheduler", f"tcp://127.0.0.1:{port}", "--timeout", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: the scheduler at tcp://127.0.0.1:{port} cannot be reached"), result.output
