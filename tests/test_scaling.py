"""Operating a deployment under traffic: scale, rolling update, autoscaling, the CLI's commands.

One deployment for the module (an ``Add`` operator that sleeps, recording its executions per
request id, tests/executions.py). Each test puts a steady load on it from several callers,
changes the deployment, and checks that every request was answered exactly once and executed
exactly once (nothing lost, failed or served twice).
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from distributed import Scheduler

from tdask import Deployment, OperatorConfig, OperatorUnavailableError, RemoteOperator
from tdask.control import NoClusterManagerError, deployment_command
from tdask.remote import _ClientEndpoint
from tests.conftest import run_async, wait_for
from tests.executions import Answers, Ledger, check
from tests.operators import Add

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("executions")


@pytest.fixture(scope="module")
def deployment(ledger_dir):
    config = OperatorConfig(
        name="sleeper", implementation=Add, max_inflight_requests=2, parameters={"record_dir": str(ledger_dir)}
    )
    with Deployment([config], dashboard_address=None) as dep:
        yield dep


_ids = itertools.count()


async def under_load(
    client: Any,
    callers: int,
    change: Callable[[], Awaitable[Any]],
    *,
    delay: float = 0.02,
    before_s: float = 1.0,
    after_s: float = 1.0,
    op: RemoteOperator | None = None,
) -> dict[str, Any]:
    """Run ``callers`` request loops; ``change()`` after ``before_s``; go on ``after_s`` more."""
    op = op or RemoteOperator("sleeper", client=client)
    answers = Answers().install(client)
    # Requests a worker refused (it was leaving) and the caller sent elsewhere: a drained
    # worker refuses none.
    plane = _ClientEndpoint.of(client).plane
    resends: list[str] = []
    original = plane._resend

    async def resend(request: Any, **kwargs: Any) -> Any:
        resends.append(request["id"])
        return await original(request, **kwargs)

    plane._resend = resend
    ids: list[str] = []
    errors: list[str] = []
    served: list[tuple[float, str, str]] = []  # (time answered, worker, operator key)
    stop = asyncio.Event()

    async def loop(k: int) -> None:
        while not stop.is_set():
            request_id = f"load-{next(_ids)}"
            ids.append(request_id)
            inputs = {"a": np.full(4, float(k)), "b": np.ones(4)}
            try:
                response = await answers.call(op, request_id, inputs=inputs, parameters={"delay": delay}, timeout=120)
            except Exception as exc:
                errors.append(f"{request_id}: {type(exc).__name__}: {exc}")
                continue
            assert np.array_equal(response.outputs["out"], np.full(4, float(k) + 1))
            served.append((time.monotonic(), str(response.worker), str(response.operator)))

    async def driver() -> Any:
        await asyncio.sleep(before_s)
        began = time.monotonic()
        result = await change()
        ended = time.monotonic()
        await asyncio.sleep(after_s)
        stop.set()
        return began, ended, result

    tasks = [asyncio.create_task(loop(k)) for k in range(callers)]
    try:
        began, ended, result = await driver()
        await asyncio.gather(*tasks)
    finally:
        plane._resend = original
    return {
        "ids": ids,
        "errors": errors,
        "answers": answers,
        "served": served,
        "began": began,
        "ended": ended,
        "result": result,
        "resends": resends,
    }


def assert_nothing_lost(run: dict[str, Any], ledger_dir: Any) -> None:
    assert not run["errors"], run["errors"][:5]
    ids = set(run["ids"])  # the module's ledger holds every test's executions: this run's only
    ledger = Ledger([e for e in Ledger.read(ledger_dir).events if e.request_id in ids])
    problems, figures = check(run["ids"], run["answers"], ledger, killed=set(), max_retries=0)
    assert not problems, (problems, figures)


def test_scale_up_then_down_under_load_loses_nothing_and_splits_the_load(deployment, ledger_dir):
    """1 -> 3 -> 1 workers while 4 callers send requests: each answered once, executed once;
    while 3 workers run, all 3 serve."""

    async def go(client):
        async def grow():
            return await asyncio.to_thread(deployment.scale, "sleeper", 3)

        up = await under_load(client, 4, grow, after_s=2.0)

        async def shrink():
            return await asyncio.to_thread(deployment.scale, "sleeper", 1)

        down = await under_load(client, 4, shrink)
        return up, down

    up, down = run_async(deployment.scheduler_address, go, timeout=300)
    assert up["result"] == ["sleeper.0", "sleeper.1", "sleeper.2"]
    assert down["result"] == ["sleeper.0"]
    for run in (up, down):
        assert_nothing_lost(run, ledger_dir)
    after_up = Counter(worker for t, worker, _ in up["served"] if t > up["ended"])
    assert len(after_up) == 3, f"the load did not split over the 3 workers: {after_up}"
    assert len(down["served"]) > 20  # it kept serving while 2 workers drained
    assert down["resends"] == [], "the workers that left refused requests: they were not drained"
    assert set(deployment.worker_addresses()) == {"sleeper.0"}


def test_rolling_update_to_a_new_version_under_load(deployment, ledger_dir):
    """update(version=2) while callers that name no version send: none fails, all move to
    version 2; a caller pinning version 1 is then refused at once, one pinning 2 is served."""
    before = deployment.operator_workers("sleeper")

    async def go(client):
        async def roll():
            return await asyncio.to_thread(deployment.update, "sleeper", {"version": 2})

        run = await under_load(client, 3, roll, after_s=1.5)
        began = time.monotonic()
        with pytest.raises(OperatorUnavailableError, match="taken off every worker"):
            await RemoteOperator("sleeper", version=1, client=client).infer(
                {"a": np.ones(1), "b": np.ones(1)}, timeout=60
            )
        refused_in = time.monotonic() - began
        pinned = await RemoteOperator("sleeper", version=2, client=client).infer({"a": np.ones(1), "b": np.ones(1)})
        return run, refused_in, pinned

    run, refused_in, pinned = run_async(deployment.scheduler_address, go, timeout=300)
    assert_nothing_lost(run, ledger_dir)
    new = run["result"]
    assert new and all(".v2." in name for name in new) and not set(new) & set(before)
    assert deployment.operator_workers("sleeper") == new
    addresses = deployment.worker_addresses()
    new_hosts = {addresses[name] for name in new}
    after = Counter(worker for t, worker, _ in run["served"] if t > run["ended"])
    assert after and set(after) <= new_hosts, (after, new_hosts)
    assert refused_in < 10, f"a pinned, removed version took {refused_in:.1f}s to be refused"
    assert pinned.worker in new_hosts


def test_adapt_grows_under_load_and_shrinks_after(deployment, ledger_dir):
    """Autoscaling: 6 callers (2 in flight per worker wanted) grow the operator to its maximum
    of 3; once they stop, it shrinks back to its minimum, 0; nothing lost meanwhile; a request
    then waits (it is not refused) while the operator grows from zero, and is answered."""
    adaptive = deployment.adapt(
        "sleeper", minimum=0, maximum=3, target_inflight_per_worker=2, up_delay=0.5, down_delay=2.0, interval=0.5
    )
    try:

        async def go(client):
            async def grown():
                while len(deployment.operator_workers("sleeper")) < 3:
                    await asyncio.sleep(0.2)
                    if time.monotonic() > deadline:
                        raise AssertionError(f"not grown within 120 s: {adaptive.describe()}")
                return deployment.operator_workers("sleeper")

            deadline = time.monotonic() + 120
            return await under_load(client, 6, grown, delay=0.1, before_s=0.0, after_s=1.0)

        run = run_async(deployment.scheduler_address, go, timeout=300)
        assert_nothing_lost(run, ledger_dir)
        assert len(run["result"]) == 3
        wait_for(
            lambda: len(deployment.operator_workers("sleeper")) == 0,
            timeout=120,
            message=lambda: f"did not shrink back: {adaptive.describe()}",
        )
        assert len(adaptive.log) >= 2  # Dask's own record of its recommendations: up, then down
        time.sleep(3)  # idle at its minimum: no more changes
        assert deployment.operator_workers("sleeper") == []
        answer = RemoteOperator("sleeper", client=deployment.client).infer({"a": np.ones(1), "b": np.ones(1)})
        assert answer.outputs["out"].tolist() == [2.0]
        assert len(deployment.operator_workers("sleeper")) == 1
    finally:
        adaptive.stop()
    deployment.scale("sleeper", 1)


def test_scale_through_the_cli_and_a_hand_started_cluster_says_so(deployment):
    """`tdask scale` reaches the deployment through its scheduler; against a scheduler nobody
    manages it says so in one line (exit 1)."""
    address = deployment.scheduler_address
    out = subprocess.run(
        [sys.executable, "-m", "tdask.cli", "scale", "sleeper", "2", "--scheduler", address],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("sleeper: 2 workers: sleeper.v2.")
    assert len(deployment.operator_workers("sleeper")) == 2

    async def hand_started() -> tuple[str, int, str]:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as scheduler:
            with pytest.raises(NoClusterManagerError, match="no tdask deployment manages") as info:
                await deployment_command(scheduler.address, "scale", operator="x", n=2)
            cli = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "tdask.cli", "scale", "x", "2", "--scheduler", scheduler.address],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(cli.communicate(), 120)
            return info.value.message, cli.returncode or 0, err.decode()

    message, returncode, err = asyncio.run(hand_started())
    assert "\n" not in message
    assert returncode == 1
    assert err.strip().splitlines() == [f"error: {message}"]


def test_a_retired_worker_finishes_what_it_holds_and_is_given_nothing_more(deployment, ledger_dir):
    """What a scale-down does before closing a worker (``tdask_retire``): under load, the worker
    leaves the registry at once, finishes what it held (nothing left, nothing handed back), and
    once its callers' caches turned over no request reaches it; the other worker serves on."""
    names = deployment.scale("sleeper", 2)
    leaving, staying = names[-1], names[0]
    addresses = deployment.worker_addresses()

    async def go(client):
        key = f"sleeper/{deployment._operator_config('sleeper').version}"

        async def retire():
            result = await client.rpc(addresses[leaving]).tdask_retire(timeout=60)
            hosts = await client.scheduler.tdask_hosts(operator=key)
            return result, hosts, time.monotonic()

        run = await under_load(client, 4, retire, delay=0.05, after_s=1.5)
        stats = await client.run(
            lambda dask_worker: dask_worker.handlers["tdask_host_stats"](), workers=[addresses[leaving]]
        )
        return run, stats[addresses[leaving]][key]

    run, stats = run_async(deployment.scheduler_address, go, timeout=300)
    assert_nothing_lost(run, ledger_dir)
    result, hosts, retired_at = run["result"]
    assert result["left"] == 0, result
    assert list(hosts) == [addresses[staying]]
    assert stats["inflight"] == 0 and stats["waiting"] == 0, stats
    assert set(stats["outcomes"]) == {"ok"}, stats["outcomes"]  # all it took, it answered
    after = Counter(worker for t, worker, _ in run["served"] if t > retired_at)
    assert after and set(after) == {addresses[staying]}, after
    assert deployment.scale("sleeper", 1) == [staying]


def test_tdask_update_with_a_deployment_file(tmp_path):
    """`tdask update FILE.yaml` against a deployment made from that file: the operator whose
    config changed is replaced (new workers, old ones gone), its worker count follows the file;
    a broken file is refused before anything changes."""
    path = tmp_path / "deployment.yaml"

    def write(max_inflight: int, workers: int) -> None:
        path.write_text(
            "operators:\n"
            "  - name: adder\n"
            "    implementation: tests.operators:Add\n"
            f"    max_inflight_requests: {max_inflight}\n"
            f"    workers: {workers}\n"
        )

    write(1, 1)
    with Deployment.from_file(path, dashboard_address=None) as dep:
        assert dep.operator_workers("adder") == ["adder.0"]

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "tdask.cli", "update", *args, "--scheduler", dep.scheduler_address]
            return subprocess.run(command, capture_output=True, text=True, timeout=180)

        write(3, 2)
        out = cli(str(path))
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "adder: 2 workers: adder.1, adder.2"
        assert {c.max_inflight_requests for c in dep.workers_spec.values()} == {3}
        assert set(dep.worker_addresses()) == {"adder.1", "adder.2"}
        answer = RemoteOperator("adder", client=dep.client).infer({"a": np.ones(1), "b": np.ones(1)})
        assert answer.outputs["out"].tolist() == [2.0]

        path.write_text("operators:\n  - name: adder\n    implementation: tests.operators:Add\n    workerz: 2\n")
        refused = cli(str(path))
        assert refused.returncode == 2
        assert "workerz" in refused.stderr and "deployment.yaml:4" in refused.stderr, refused.stderr
        assert set(dep.worker_addresses()) == {"adder.1", "adder.2"}
