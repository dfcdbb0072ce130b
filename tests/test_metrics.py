"""Metrics on real clusters: every worker's /metrics and the scheduler's, scraped with prometheus_client's parser.

Counts are checked exactly: after a known number of requests, each worker's outcome counters and
histogram counts moved by exactly the number of answers that worker gave (each response names
its worker), on both request planes, after an operator error and after a worker loss; and the
scheduler's cluster view says the same as the workers themselves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections import Counter
from typing import Any

import dask
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tdask import Deployment, InvalidRequestError, OperatorConfig, OperatorError, RemoteOperator
from tests.conftest import assert_no_children, async_wait_for, run_async, wait_for
from tests.operators import Add, Fail

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, by (sample name, sorted labels)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def worker_urls(client: Any) -> dict[str, tuple[str, str]]:
    """Worker address -> (name, its /metrics URL), from the scheduler."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    return {
        addr: (str(w["name"]), f"http://127.0.0.1:{w['services']['dashboard']}/metrics") for addr, w in info.items()
    }


@pytest.fixture(scope="module", params=["queue", "direct"])
def deployment(request):
    operators = [
        (OperatorConfig(name="add", implementation=Add, max_inflight_requests=2), 2),
        (OperatorConfig(name="fail", implementation=Fail, max_inflight_requests=2), 1),
    ]
    with dask.config.set({"tdask.request.plane": request.param, "tdask.worker.report-interval": "200ms"}):
        with Deployment(operators, dashboard_address="127.0.0.1:0") as dep:
            yield dep
    assert_no_children()


def scheduler_url(deployment: Deployment) -> str:
    assert deployment.dashboard_link is not None
    return deployment.dashboard_link.rsplit("/status", 1)[0] + "/metrics"


def test_counts_and_histograms_match_the_requests_exactly(deployment):
    client = deployment.client
    urls = worker_urls(client)
    before = {addr: scrape(url) for addr, (_, url) in urls.items()}
    op = RemoteOperator("add", client=client)

    async def go(c):
        add = RemoteOperator("add", client=c)
        calls = [add.infer(inputs={"a": np.arange(4), "b": np.ones(4, np.int64)}) for _ in range(30)]
        started = time.perf_counter()
        responses = await asyncio.gather(*calls)
        return responses, time.perf_counter() - started

    responses, elapsed = run_async(deployment.scheduler_address, go)
    responses.append(op.infer(inputs={"a": np.arange(2), "b": np.arange(2)}))
    by_worker = Counter(r.worker for r in responses)
    assert sum(by_worker.values()) == 31 and len(by_worker) == 2
    after = {addr: scrape(url) for addr, (_, url) in urls.items()}
    for addr, n in by_worker.items():
        name = urls[addr][0]
        labels = {"operator": "add", "version": "1", "worker": name}

        def delta(metric: str, **extra: str) -> float:
            return value(after[addr], metric, **labels, **extra) - value(before[addr], metric, **labels, **extra)  # noqa: B023

        assert delta("tdask_requests_total", outcome="ok") == n
        assert delta("tdask_requests_started_total") == n
        for histogram in ("tdask_request_wait_seconds", "tdask_request_execute_seconds", "tdask_request_seconds"):
            assert delta(f"{histogram}_count") == n, histogram
            assert delta(f"{histogram}_bucket", le="+Inf") == n, histogram
        # Time spent on a worker is part of what its caller waited for.
        total = delta("tdask_request_seconds_sum")
        assert 0 < total <= n * elapsed + 1.0
        assert delta("tdask_request_execute_seconds_sum") <= total + 1e-9
        assert value(after[addr], "tdask_requests_inflight_limit", **labels) == 2
        assert value(after[addr], "tdask_requests_inflight", **labels) == 0

    # The scheduler's cluster view (from the workers' periodic reports) says exactly the same.
    def same() -> bool:
        cluster = scrape(scheduler_url(deployment))
        return (
            all(
                value(cluster, metric, operator="add", worker=name) == value(after[addr], metric, operator="add")
                for addr, (name, _) in urls.items()
                for metric in ("tdask_requests_total", "tdask_request_seconds_count", "tdask_request_seconds_bucket")
            )
            and value(cluster, "tdask_operator_workers", operator="add") == 2
        )

    wait_for(same, timeout=10, message="the scheduler's /metrics never matched the workers' own")


def test_operator_errors_are_counted_by_type(deployment):
    client = deployment.client
    (addr, (name, url)) = next((a, u) for a, u in worker_urls(client).items() if u[0] == "fail.0")
    before = scrape(url)
    fail = RemoteOperator("fail", client=client)
    with pytest.raises(OperatorError, match="boom"):
        fail.infer(parameters={"mode": "raise"}, timeout=30)
    for _ in range(2):
        with pytest.raises(InvalidRequestError):
            fail.infer(parameters={"mode": "invalid"}, timeout=30)
    after = scrape(url)

    def delta(metric: str, **labels: str) -> float:
        return value(after, metric, operator="fail", worker=name, **labels) - value(
            before, metric, operator="fail", worker=name, **labels
        )

    assert delta("tdask_requests_total", outcome="OperatorError") == 1
    assert delta("tdask_requests_total", outcome="InvalidRequestError") == 2
    assert delta("tdask_requests_total", outcome="ok") == 0
    assert delta("tdask_request_seconds_count") == 3  # errors are answers too: timed like the others

    def reported() -> bool:
        cluster = scrape(scheduler_url(deployment))
        return value(cluster, "tdask_requests_total", operator="fail", outcome="InvalidRequestError") == value(
            after, "tdask_requests_total", operator="fail", outcome="InvalidRequestError"
        )

    wait_for(reported, timeout=10, message="the scheduler never saw the errors")


def test_worker_loss_counts_retries_and_the_loss(deployment):
    """SIGKILL a worker holding requests: the survivors count them as retried, the scheduler counts the loss."""
    client = deployment.client
    cluster_before = scrape(scheduler_url(deployment))
    urls = worker_urls(client)
    before = {addr: scrape(url) for addr, (_, url) in urls.items()}
    victim = next(a for a, (name, _) in urls.items() if name == "add.0")
    pid = client.run(os.getpid, workers=[victim])[victim]

    async def go(c):
        async def victim_full() -> dict[str, Any] | None:
            stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"](), workers=[victim])
            s = stats[victim]["add/1"]
            return s if s["inflight"] == 2 else None

        op = RemoteOperator("add", client=c)
        tasks = [
            asyncio.create_task(
                op.infer(inputs={"a": np.array([i]), "b": np.array([1])}, parameters={"delay": 1.0}, timeout=60)
            )
            for i in range(8)
        ]
        held = await async_wait_for(victim_full, message="the victim never ran two requests")
        os.kill(pid, signal.SIGKILL)
        return held, await asyncio.gather(*tasks)

    held, responses = run_async(deployment.scheduler_address, go)
    assert [int(r.outputs["out"][0]) for r in responses] == [i + 1 for i in range(8)]
    assert all(r.worker != victim for r in responses)
    expected_retries = held["inflight"] + held["waiting"]  # what the victim held (queue plane: no waiting)

    def counted() -> dict[str, Samples] | None:
        now = {addr: scrape(url) for addr, (_, url) in worker_urls(client).items()}
        retried = sum(
            value(s, "tdask_requests_retried_total", operator="add")
            - value(before.get(a, {}), "tdask_requests_retried_total", operator="add")
            for a, s in now.items()
        )
        return now if retried == expected_retries else None

    now = wait_for(counted, timeout=30, message="the re-sent requests were not counted as retried")
    served = Counter(r.worker for r in responses)
    for addr, n in served.items():
        ok = value(now[addr], "tdask_requests_total", operator="add", outcome="ok")
        assert ok - value(before.get(addr, {}), "tdask_requests_total", operator="add", outcome="ok") == n

    def lost() -> bool:
        cluster = scrape(scheduler_url(deployment))
        losses = value(cluster, "tdask_worker_losses_total", operator="add", worker="add.0") - value(
            cluster_before, "tdask_worker_losses_total", operator="add", worker="add.0"
        )
        return losses == 1

    wait_for(lost, timeout=30, message="the scheduler did not count the lost worker")
    # The Nanny brings add.0 back (a fresh process): wait, so later tests see two add workers.
    wait_for(lambda: len(client.run_on_scheduler(_add_hosts)) == 2, timeout=60, message="add.0 never came back")


def _add_hosts(dask_scheduler: Any) -> list[str]:
    from tdask.scheduler.broker import BROKER_NAME

    return sorted(dask_scheduler.plugins[BROKER_NAME].hosts.get("add/1", {}))
