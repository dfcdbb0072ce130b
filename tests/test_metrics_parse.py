"""Prometheus output parses cleanly, and a Deployment is quiet by default (issue 23, item 6b/6c).

One small deployment (the hello world's encoder, in-process Triton), run as a script in a
subprocess: its worker's and its scheduler's /metrics are scraped and parsed with
prometheus_client's own parser (Triton's re-exported counters used to come out as empty
counters plus untyped families), and its stderr lines are counted (35-180 INFO lines before,
with or without ``log_level="warning"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys, time, urllib.request
import dask
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tdask import Deployment, OperatorConfig, RemoteOperator
from tdask.hello_world import MODEL_REPOSITORY


def scrape(url):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.type != "unknown", f"untyped family {family.name}: {family.samples[:2]}"
        if family.name.startswith("dask_"):  # Dask's own gauge x and counter x_total share a name
            continue
        assert family.name not in families, f"family {family.name} twice"
        families[family.name] = [family.type, [[s.name, s.value] for s in family.samples]]
    return families


if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    encoder = OperatorConfig(name="encoder", implementation="triton", repository=MODEL_REPOSITORY)
    with dask.config.set({"tdask.worker.report-interval": "300ms"}):
        with Deployment([encoder], dashboard_address="127.0.0.1:0", **kwargs) as deployment:
            operator = RemoteOperator("encoder", client=deployment.client)
            for i in range(3):
                operator.infer(inputs={"input": np.arange(i + 1, dtype=np.int64)}, timeout=60)
            workers = deployment.client.scheduler_info(n_workers=-1)["workers"]
            port = next(w["services"]["dashboard"] for w in workers.values())
            urls = {"worker": f"http://127.0.0.1:{port}/metrics",
                    "scheduler": deployment.dashboard_link.rsplit("/status", 1)[0] + "/metrics"}
            out = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until both show the three successes
                out = {label: scrape(url) for label, url in urls.items()}
                success = [f.get("nv_inference_request_success", ["", []])[1] for f in out.values()]
                counts = [sum(v for _, v in samples) for samples in success]
                if counts == [3.0, 3.0]:
                    break
                time.sleep(0.3)
            print(json.dumps(out))
"""


def _run(tmp_path: Path, kwargs: dict) -> tuple[dict, list[str]]:
    script = tmp_path / "deploy_small.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["DASK_TDASK__LOG_DIR"] = str(tmp_path / "logs")  # tdask.log-dir: no log_dir given to the Deployment
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(kwargs)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr.splitlines()


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    """The deployment with its defaults: (scraped families, stderr lines, its directory)."""
    where = tmp_path_factory.mktemp("quiet")
    return (*_run(where, {}), where)


def test_tritons_counters_parse_as_counters_with_samples(quiet_run):
    """Every nv_inference_* counter on the worker's and the scheduler's /metrics is one counter
    family holding its samples (named <family>_total), none left untyped; the successes count 3."""
    scraped = quiet_run[0]
    for where, families in scraped.items():
        triton = {name: value for name, value in families.items() if name.startswith("nv_inference")}
        counters = {name for name, (kind, _) in triton.items() if kind == "counter"}
        assert {"nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count"} <= counters, (
            where,
            sorted(triton),
        )
        assert not [name for name, (kind, _) in triton.items() if kind == "unknown"], (where, triton)
        for name in counters:
            samples = triton[name][1]
            assert samples, (where, name, "no samples")
            assert {sample for sample, _ in samples} == {f"{name}_total"}, (where, name, samples)
        assert sum(v for _, v in triton["nv_inference_request_success"][1]) == 3, (where, triton)
        assert families["tdask_requests"][0] == "counter" and families["tdask_requests"][1], where


def test_tritons_log_goes_to_the_configured_log_dir_not_the_scratch_directory(quiet_run):
    """With no log_dir, the worker's Triton log is in tdask.log-dir (it was in the worker's scratch
    directory, deleted with the worker)."""
    logs = quiet_run[2] / "logs"
    assert "starting Triton in process" in (logs / "encoder.0.triton.log").read_text()


def test_a_deployment_prints_nothing_on_stderr_by_default(quiet_run):
    """As quiet as Dask's LocalCluster: no INFO line from the scheduler, nannies, workers or
    Triton (52 lines before this change, for this deployment)."""
    stderr = quiet_run[1]
    assert not [line for line in stderr if " - INFO - " in line], "\n".join(stderr)
    assert len(stderr) <= 3, "\n".join(stderr)


def test_log_level_warning_is_quiet_too_and_info_still_speaks(tmp_path):
    """log_level="warning" was as loud as the default (it reached only the workers' loggers);
    log_level="info" still shows the workers' and the scheduler's INFO lines."""
    _, stderr = _run(tmp_path, {"log_level": "warning"})
    assert not [line for line in stderr if " - INFO - " in line], "\n".join(stderr)
    _, stderr = _run(tmp_path, {"log_level": "info"})
    info = [line for line in stderr if " - INFO - " in line]
    assert any("distributed.scheduler" in line for line in info), "\n".join(stderr)
    assert any("Triton server 'encoder.0' ready" in line for line in info), "\n".join(stderr)
