"""Every program in examples/ runs (as a user would run it) and says it was right.

The Kubernetes and SLURM recipes cannot reach a cluster manager here: their manifests and job
script are built by the examples themselves and their commands parsed by the real commands
(tests/commands.py); the SLURM job script is also run as a node would run it, against a
``SLURMCluster``'s own scheduler on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tdask.host.preload import parse_operator_option
from tests.commands import operator_names, parse
from tests.conftest import ROOT, assert_no_children

pytestmark = pytest.mark.timeout(240)

EXAMPLES = Path(ROOT) / "examples"
PY = sys.executable


def run_example(args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None) -> str:
    """Run an example in a session of its own; kill all of it if it outlives ``timeout``."""
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "PATH": os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""),
        **(env or {}),
    }
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{args} did not finish in {timeout} s:\n{out}\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"{args} exited with {proc.returncode}:\n{out}\n{err[-5000:]}"
    return out


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_example_has_a_readme_line_and_a_test():
    readme = (EXAMPLES / "README.md").read_text()
    this = Path(__file__).read_text()
    programs = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh"))
    assert programs, "examples/ has programs"
    for name in programs:
        assert f"`{name}`" in readme, f"examples/README.md says nothing of {name}"
        assert f'"{name}"' in this or f'"{Path(name).stem}"' in this, f"no test runs {name}"


@pytest.mark.cluster
def test_three_stage_pipeline(tmp_path):
    out = run_example([PY, str(EXAMPLES / "three_stage_pipeline.py")], tmp_path)
    assert "correct: 20/20" in out, out
    # The linear stage has two workers: the orchestrator spread its calls over both.
    assert "-> linear.0 ->" in out and "-> linear.1 ->" in out, out
    assert_no_children()


@pytest.mark.cluster
def test_streaming(tmp_path):
    out = run_example([PY, str(EXAMPLES / "streaming.py"), "--prompts", "3", "--max-tokens", "20"], tmp_path)
    assert "correct: 3/3" in out, out
    for first, last in re.findall(r"20 tokens streamed .* first after ([\d.]+) ms, last after ([\d.]+) ms", out):
        # 20 decode steps of 5 ms each: the first token arrived long before the last one.
        assert float(last) - float(first) > 19 * 5 * 0.9, out
    assert len(re.findall(r"tokens streamed \(prefill\.0 -> decode\.\d\)", out)) == 3, out
    assert_no_children()


@pytest.mark.cluster
def test_batch_inference(tmp_path):
    out = run_example([PY, str(EXAMPLES / "batch_inference.py"), "--rows", "8000", "--chunk", "500"], tmp_path)
    assert "offline: 8000 rows in 16 partitions scored, correct" in out, out
    assert re.search(r"online meanwhile: [1-9]\d* requests", out), out
    assert_no_children()


@pytest.mark.cluster
def test_hand_started_cluster(tmp_path):
    from tests.test_hello_world import _assert_clean

    since = time.time()
    out = run_example(
        ["bash", str(EXAMPLES / "hand_started_cluster.sh"), "--requests-per-client", "5"],
        tmp_path,
        env={"PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()), "LOGS": str(tmp_path)},
        timeout=200,
    )
    assert "Correct: 5/5" in out, out
    # Names, though the workers joined after the client started.
    assert "Answered by: encoder_decoder.0 (encoder.0 -> decoder.0) x5" in out, out
    _assert_clean(since)


@pytest.mark.cluster
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_kubernetes_manifests(tmp_path, gpu):
    pytest.importorskip("dask_kubernetes", reason="dask-kubernetes is not installed (pip install 'tdask[examples]')")
    from dask_kubernetes.operator.validation import validate_cluster_name

    out = run_example([PY, str(EXAMPLES / "kubernetes.py"), "--print", *(["--gpu"] if gpu else [])], tmp_path)
    cluster, *groups = [doc for doc in yaml.safe_load_all(out) if doc]
    assert cluster["kind"] == "DaskCluster" and [g["kind"] for g in groups] == ["DaskWorkerGroup"] * 2
    name = cluster["metadata"]["name"]
    validate_cluster_name(name)
    assert all(g["spec"]["cluster"] == name for g in groups)
    image = "tdask:gpu" if gpu else "tdask:cpu"

    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert scheduler["image"] == image
    assert parse(scheduler["args"])["program"] == ("dask", "scheduler")

    hosted = {}
    for manifest in [cluster, *groups]:
        (container,) = manifest["spec"]["worker"]["spec"]["containers"]  # DaskCluster and DaskWorkerGroup alike
        assert container["image"] == image
        assert {"name": "tdask-wire", "containerPort": 8790, "protocol": "TCP"} in container["ports"]
        # The probes' port is the worker's HTTP server; tests/test_serve.py asks their paths of a real worker.
        assert any(p["name"] == container["readinessProbe"]["httpGet"]["port"] for p in container["ports"])
        assert container["readinessProbe"]["httpGet"]["path"] == "/tdask/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert {"name": "DASK_TDASK__WORKER__WIRE_PORT", "value": "8790"} in container["env"]
        args = container["args"]
        assert args[args.index("worker") + 1] == "$(DASK_SCHEDULER_ADDRESS)"  # before --tdask-operator
        if args[:3] == ["dask", "cuda", "worker"]:
            assert gpu and manifest["kind"] == "DaskWorkerGroup"
            assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
            try:
                params = parse(args)
            except ModuleNotFoundError:  # no dask-cuda here: read the operators without it
                text = args[args.index("--tdask-operator") + 1]
                params = {"operators": parse_operator_option(text)}
        else:
            params = parse(args)
            assert params["program"] == ("dask", "worker") and params["preload"] == ("tdask.worker",)
        (config,) = params["operators"]
        hosted[config.name] = config
    assert sorted(hosted) == ["decoder", "encoder", "encoder_decoder"]
    for model in ("encoder", "decoder"):
        assert hosted[model].repository == "/models"  # where the images of container/ put them
        (group,) = hosted[model].parameters["config"]["instance_group"]
        assert group["kind"] == ("KIND_GPU" if gpu else "KIND_CPU")


@pytest.mark.cluster
def test_slurm_job_script_runs_the_hello_world(tmp_path):
    """The job script a SLURM node would run, run here: its worker hosts the whole hello world."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install 'tdask[examples]')")
    import numpy as np
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from tdask import RemoteOperator

    out = run_example([PY, str(EXAMPLES / "slurm.py"), "--print", "--scheduler-host", "127.0.0.1"], tmp_path)
    assert "#SBATCH -J tdask-hello-world" in out and "#SBATCH --cpus-per-task=4" in out, out

    slurm = load("slurm")
    options = slurm.cluster_options(gpu=True)
    assert options["job_extra_directives"] == ["--gres=gpu:1"]
    options = slurm.cluster_options()
    scheduler_options = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    with SLURMCluster(**options, scheduler_options=scheduler_options) as cluster:
        script = cluster.job_script()
        command = script.strip().splitlines()[-1]
        params = parse(shlex.split(command))
        assert params["program"] == ("python", "-m", "distributed.cli.dask_worker")
        assert params["scheduler"] == cluster.scheduler_address
        assert operator_names(params) == ["encoder", "decoder", "encoder_decoder"]
        # As a node runs it, bound to this machine's loopback (a node binds its own address).
        job = tmp_path / "job.sh"
        job.write_text(script.replace(command, command + " --host 127.0.0.1 --dashboard-address 127.0.0.1:0"))
        env = {**os.environ, "PYTHONPATH": ROOT}
        with open(tmp_path / "job.log", "w") as log:
            node = subprocess.Popen(
                ["bash", str(job)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=120)
                pipeline = RemoteOperator("encoder_decoder", client=client)
                data = np.arange(1000, dtype=np.int64)
                for _ in range(5):
                    response = pipeline.infer(inputs={"input": data}, timeout=120)
                    assert np.array_equal(response.outputs["output"], data)
        except Exception as exc:
            raise AssertionError(f"the job's log:\n{(tmp_path / 'job.log').read_text()[-5000:]}") from exc
        finally:
            os.killpg(node.pid, signal.SIGTERM)  # bash waits for its worker: signal them all, as scancel does
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert_no_children()
