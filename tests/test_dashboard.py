"""The hello world's pipeline under traffic: Triton's own metrics per worker, and tdask's dashboard page in a browser.

The browser is Debian's headless chromium driven by Playwright (``apt-get install chromium``;
never ``playwright install``); the test skips, saying why, only where either is missing. It keeps
a screenshot of the page in ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tdask import Deployment, InvalidRequestError, RemoteOperator
from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators
from tests.conftest import ROOT, assert_no_children, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ARTIFACTS = Path(ROOT) / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def pipeline(request):
    """The hello world's pipeline, its Triton in the mode the test asks for (indirect parameter)."""
    operators = hello_world_operators(
        encoders=TritonGroup(workers=1, max_inflight=2, instances=1, kind="CPU"),
        decoders=TritonGroup(workers=1, max_inflight=2, instances=1, kind="CPU"),
        encoder_decoders=PythonGroup(workers=1, max_inflight=4),
    )
    settings = {"tdask.worker.report-interval": "500ms", "tdask.triton.mode": request.param}
    with dask.config.set(settings):
        with Deployment(operators, dashboard_address="127.0.0.1:0") as deployment:
            yield deployment
    assert_no_children()


def _samples(url: str) -> list[Any]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _triton_successes(url: str, model: str, worker: str) -> float:
    return sum(
        s.value
        for s in _samples(url)
        if s.name == "nv_inference_request_success_total"  # a counter: prometheus_client's naming
        and s.labels.get("model") == model
        and s.labels.get("worker") == worker
    )


@pytest.mark.parametrize("pipeline", ["in-process", "subprocess"], indirect=True)
def test_triton_metrics_per_worker(pipeline):
    """Triton's per-model counters appear on the worker's /metrics and the scheduler's, labelled by worker:
    read from its metrics endpoint (subprocess) or its C API (in process)."""
    client = pipeline.client
    info = client.scheduler_info(n_workers=-1)["workers"]
    port = next(w["services"]["dashboard"] for w in info.values() if w["name"] == "encoder.0")
    worker_url = f"http://127.0.0.1:{port}/metrics"
    scheduler_url = pipeline.dashboard_link.rsplit("/status", 1)[0] + "/metrics"
    before = _triton_successes(worker_url, "encoder", "encoder.0")
    encoder = RemoteOperator("encoder", client=client)
    for i in range(7):
        encoder.infer(inputs={"input": np.arange(i + 1, dtype=np.int64)}, timeout=60)
    # Read from Triton at each report (every 500 ms here), by the worker itself.
    wait_for(
        lambda: _triton_successes(worker_url, "encoder", "encoder.0") == before + 7,
        timeout=15,
        message="Triton's count of encoder successes never showed 7 more on the worker's /metrics",
    )
    count = _triton_successes(worker_url, "encoder", "encoder.0")
    wait_for(
        lambda: _triton_successes(scheduler_url, "encoder", "encoder.0") == count,
        timeout=15,
        message="the scheduler's /metrics never carried the worker's Triton counts",
    )
    names = {s.name for s in _samples(worker_url)}
    assert {"nv_inference_queue_duration_us_total", "nv_inference_compute_infer_duration_us_total"} <= names, names


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed (it is in the test extra: pip install -e '.[test]')")
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")


@pytest.mark.parametrize("pipeline", ["in-process"], indirect=True)  # the page is the same in both modes
def test_dashboard_page_in_a_browser(pipeline, record_property):
    """Open the Dask dashboard, follow its navigation to tdask's page while traffic runs, read what it drew."""
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    client = pipeline.client
    base = pipeline.dashboard_link.rsplit("/status", 1)[0]
    stop = threading.Event()
    failures: list[BaseException] = []

    def traffic() -> None:
        rng = np.random.default_rng(0)
        pipe, encoder = RemoteOperator("encoder_decoder", client=client), RemoteOperator("encoder", client=client)
        i = 0
        while not stop.is_set():
            try:
                pipe.infer(inputs={"input": rng.integers(0, 1000, 10_000)}, timeout=30)  # 80 kB: by reference
                i += 1
                if i % 10 == 0:  # an error now and then, for the errors panel
                    with pytest.raises(InvalidRequestError):
                        encoder.infer(inputs={"input": np.zeros(3, np.float32)}, timeout=30)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                failures.append(exc)
                return

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            browser = p.chromium.launch_persistent_context(
                profile,
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1250},
            )
            try:
                page = browser.new_page()
                page.goto(base + "/status")
                assert page.locator("a[href='individual-tdask']").count() == 1, "tdask is listed under More..."
                page.click("a[href='tdask']")  # the top navigation
                page.wait_for_url("**/tdask")

                def drawn() -> dict[str, Any] | None:
                    rows = page.locator(".slick-row").all_inner_texts()
                    table = {r.split()[0]: r.split() for r in rows if r.split()}
                    row = table.get("encoder_decoder/1")
                    return table if row is not None and float(row[2]) > 0 else None

                table = wait_for(drawn, timeout=30, interval=0.5, message="the page never showed a non-zero rate")
                assert {"encoder/1", "decoder/1", "encoder_decoder/1"} <= set(table), table
                assert table["encoder_decoder/1"][1] == "encoder_decoder.0", "hosts are named, not addressed"
                plotted = page.evaluate(
                    "name => Math.max(0, ...Bokeh.documents[0].get_model_by_name(name).data.rate)",
                    "tdask-series-encoder_decoder/1",
                )
                assert plotted > 0, "the rate line was drawn with non-zero points"
                wait_for(
                    lambda: (
                        page.evaluate(
                            "name => Math.max(0, ...Bokeh.documents[0].get_model_by_name(name).data.errors)",
                            "tdask-series-encoder/1",
                        )
                        > 0
                    ),
                    timeout=15,
                    interval=0.5,
                    message="the encoder's errors were never drawn",
                )
                time.sleep(3)  # a few more points on the lines, for the screenshot
                ARTIFACTS.mkdir(exist_ok=True)
                shot = ARTIFACTS / "dashboard-tdask.png"
                page.screenshot(path=str(shot), full_page=True)
                record_property("screenshot", str(shot))
                page.goto(base + "/individual-tdask")  # the bare page of "More..."
                wait_for(lambda: page.locator(".slick-row").count() >= 3, timeout=15, message="bare page empty")
            finally:
                browser.close()
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
