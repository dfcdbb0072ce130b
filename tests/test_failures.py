"""Failures on real processes: workers that die mid-request, setup that fails, hand-started workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import dask
import numpy as np
import pytest
from distributed import Client

from tdask import (
    Deployment,
    OperatorConfig,
    OperatorUnavailableError,
    RemoteOperator,
    WorkerLostError,
)
from tests.conftest import ROOT, assert_no_children, child_pids
from tests.operators import Add, Broken, DiesOnce, Identity

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


@pytest.fixture(scope="module", params=["queue", "direct"])
def deployment(request):
    operators = [
        (OperatorConfig(name="dies", implementation=DiesOnce, max_inflight_requests=1), 2),
        (OperatorConfig(name="identity", implementation=Identity), 1),
        (OperatorConfig(name="slow", implementation=Add, max_inflight_requests=2), 2),
    ]
    with dask.config.set({"tdask.request.plane": request.param}):
        with Deployment(operators, dashboard_address=None) as dep:
            yield dep
    assert_no_children()


def test_worker_death_mid_request_is_re_served(deployment, tmp_path):
    op = RemoteOperator("dies", client=deployment.client)
    response = op.infer(parameters={"marker": str(tmp_path / "died")}, timeout=60, request_id="survivor")
    died_pid = int((tmp_path / "died").read_text())
    assert int(response.outputs["pid"][0]) != died_pid, "answered by another worker process"
    assert response.request_id == "survivor"


def test_sigkill_with_requests_in_flight_loses_nothing(deployment):
    """SIGKILL a worker holding requests: each still gets exactly one correct final answer."""
    import asyncio
    import signal

    from tests.conftest import async_wait_for, run_async

    async def go(c):
        async def both_full() -> bool:
            stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
            return [s["slow/1"]["inflight"] for s in stats.values() if "slow/1" in s] == [2, 2]

        op = RemoteOperator("slow", client=c)
        info = await c.scheduler.identity(n_workers=-1)
        victim = next(a for a, w in info["workers"].items() if str(w["name"]) == "slow.0")
        pid = (await c.run(os.getpid, workers=[victim]))[victim]
        tasks = [
            asyncio.create_task(
                op.infer(inputs={"a": np.array([i]), "b": np.array([1])}, parameters={"delay": 1.0}, timeout=60)
            )
            for i in range(8)
        ]
        await async_wait_for(both_full, message="the two slow workers never ran two requests each")
        before = (await c.scheduler.tdask_operators())["counts"]
        os.kill(pid, signal.SIGKILL)
        responses = await asyncio.gather(*tasks)
        after = (await c.scheduler.tdask_operators())["counts"]
        return victim, responses, after.get("retried", 0) - before.get("retried", 0)

    victim, responses, retried = run_async(deployment.scheduler_address, go)
    assert [int(r.outputs["out"][0]) for r in responses] == [i + 1 for i in range(8)]
    assert len({r.request_id for r in responses}) == 8
    if dask.config.get("tdask.request.plane") == "queue":  # the direct plane retries in the caller
        assert retried == 2, "the two requests the killed worker held were served again"
    assert all(r.worker != victim for r in responses)


def test_a_tensor_whose_owner_was_killed_fails_its_fetch_at_once(deployment):
    """SIGKILL the worker holding a tensor: its fetch fails with a DataPlaneError naming the
    owner and the tensor within seconds (on the direct plane the wire session to it dies and the
    fetch falls back to Dask's comm, which finds the owner gone); then the operator is back."""
    import asyncio
    import signal

    from tdask import DataPlaneError, RemoteTensor
    from tests.conftest import run_async

    async def go(c):
        op = RemoteOperator("identity", client=c)
        big = np.arange(50_000, dtype=np.int64)  # 400 KB: placed in identity's store
        lazy = await op.infer(inputs={"x": big}, fetch=False)
        tensor = lazy.outputs["x"]
        assert isinstance(tensor, RemoteTensor)
        pid = (await c.run(os.getpid, workers=[tensor.owner]))[tensor.owner]
        os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(DataPlaneError) as info:
            await asyncio.wait_for(lazy.fetch(), 30)
        took = time.monotonic() - began
        assert info.value.owner == tensor.owner and info.value.tensor_id == tensor.tensor_id
        again = await op.infer(inputs={"x": np.arange(3)}, timeout=60)  # re-hosted by the Nanny
        assert tensor.tensor_id in str(info.value) and tensor.owner in str(info.value)
        return took, again, pid

    took, again, pid = run_async(deployment.scheduler_address, go)
    assert took < 10, f"the fetch took {took:.1f}s to fail"
    np.testing.assert_array_equal(again.outputs["x"], np.arange(3))
    assert again.parameters["pid"] != pid, "answered by the restarted worker"


def test_queued_request_cancelled_is_never_served(deployment):
    """A request that times out while queued behind busy workers is never run."""
    import asyncio

    from tdask import RequestTimeoutError
    from tdask.scheduler.broker import BROKER_NAME
    from tests.conftest import async_wait_for, run_async

    async def go(c):
        async def slots(key: str) -> list[int]:
            stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
            return [s["slow/1"][key] for s in stats.values() if "slow/1" in s]

        async def started() -> int:
            return sum(await slots("started"))

        async def all_busy() -> bool:
            return await slots("inflight") == [2, 2]

        def credits(dask_scheduler) -> list[int]:
            return sorted(dask_scheduler.plugins[BROKER_NAME].credits["slow/1"].values())

        async def settled() -> bool:
            # Both workers idle with nothing waiting, and every credit back with the broker: a
            # request still queued anywhere would have been started by now.
            idle = await slots("inflight") + await slots("waiting") == [0, 0, 0, 0]
            return idle and await c.run_on_scheduler(credits) == [2, 2]

        op = RemoteOperator("slow", client=c)
        busy = [
            asyncio.create_task(op.infer(inputs={"a": np.ones(1), "b": np.ones(1)}, parameters={"delay": 1.5}))
            for _ in range(4)
        ]
        await async_wait_for(all_busy, message="the four busy requests never all ran")
        before = await started()
        with pytest.raises(RequestTimeoutError):
            await op.infer(inputs={"a": np.ones(1), "b": np.ones(1)}, timeout=0.3, request_id="never")
        await asyncio.gather(*busy)
        await async_wait_for(settled, message="the slow workers and the broker never settled")
        return before, await started(), await c.scheduler.tdask_operators()

    before, after, broker = run_async(deployment.scheduler_address, go)
    assert after == before, "the cancelled request never ran (it waited behind busy workers)"
    assert not broker["queued"] and broker["leased"] == 0


def test_poison_request_exhausts_retries(deployment):
    from tests.conftest import wait_for

    op = RemoteOperator("dies", client=deployment.client)
    with dask.config.set({"tdask.request.max-retries": 1}):
        with pytest.raises(WorkerLostError, match="died and 1 retries were used") as info:
            op.infer(parameters={"always": True}, timeout=120, request_id="poison")
    assert info.value.operator == "dies" and info.value.request_id == "poison"
    assert info.value.worker.startswith("tcp://127.0.0.1:")
    # The nannies restarted the workers, which serve again.
    assert RemoteOperator("identity", client=deployment.client).infer(inputs={"x": np.ones(2)}).final
    errors: list[Exception] = []

    def serves() -> bool:
        try:
            return op.infer(parameters={}, timeout=5).final
        except Exception as exc:
            errors.append(exc)
            return False

    wait_for(serves, timeout=60, interval=0.2, message=lambda: f"'dies' never served again: {errors[-1:]}")


def test_setup_failure_fails_the_deployment():
    before = child_pids()
    with pytest.raises(RuntimeError, match="broken on purpose: model file missing"):
        with Deployment([OperatorConfig(name="broken", implementation=Broken)], dashboard_address=None):
            pass
    assert_no_children(ignore=before)


def _popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_hand_started_scheduler_and_preloaded_workers(tmp_path):
    """`dask scheduler` + `dask worker --preload tdask.worker` serve requests; a broken preload is reported."""
    from tests.conftest import wait_for

    dask_bin = os.path.join(os.path.dirname(sys.executable), "dask")
    scheduler_file = tmp_path / "scheduler.json"
    procs = [
        _popen(
            [
                dask_bin,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ]
        )
    ]

    def scheduler_up() -> bool:
        assert procs[0].poll() is None, procs[0].stdout.read()
        return scheduler_file.exists()

    try:
        wait_for(scheduler_up, timeout=60, interval=0.1, message="scheduler did not start")
        address = json.loads(scheduler_file.read_text())["address"]
        identity = json.dumps(
            {"name": "identity", "implementation": "tests.operators:Identity", "max_inflight_requests": 2}
        )
        broken = json.dumps({"name": "broken", "implementation": "tests.operators:Broken"})
        for name, spec in [("identity.0", identity), ("broken.0", broken)]:
            procs.append(
                _popen(
                    [
                        dask_bin,
                        "worker",
                        address,
                        "--host",
                        "127.0.0.1",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--name",
                        name,
                        "--no-nanny",
                        "--preload",
                        "tdask.worker",
                        "--tdask-operator",
                        spec,
                    ]
                )
            )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            op = RemoteOperator("identity", client=client)
            deadline = time.monotonic() + 60
            while True:
                try:
                    with dask.config.set({"tdask.request.unavailable-timeout": "1s"}):
                        response = op.infer(inputs={"x": np.arange(100_000)}, timeout=10)
                    break
                except OperatorUnavailableError:
                    assert time.monotonic() < deadline
            np.testing.assert_array_equal(response.outputs["x"], np.arange(100_000))
            start = time.monotonic()
            with pytest.raises(OperatorUnavailableError, match="broken on purpose: model file missing"):
                RemoteOperator("broken", client=client).infer(timeout=30)
            assert time.monotonic() - start < 5, "a recorded setup failure answers at once"
    finally:
        _stop(procs)
    for proc in procs:
        assert proc.returncode is not None


def test_attach_to_running_scheduler():
    from distributed import Scheduler

    from tests.conftest import async_wait_for

    before = child_pids()

    import asyncio

    async def main():
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0", dashboard=False) as scheduler:
            async with Deployment(
                [OperatorConfig(name="identity", implementation=Identity)],
                scheduler_address=scheduler.address,
                asynchronous=True,
            ) as dep:
                response = await RemoteOperator("identity", client=dep.client).infer(inputs={"x": np.ones(3)})
                assert response.outputs["x"].sum() == 3
            # The deployment stopped its own workers and left the scheduler running.
            assert scheduler.status.name == "running"
            await async_wait_for(
                lambda: not scheduler.workers, message=lambda: f"workers still registered: {list(scheduler.workers)}"
            )

    asyncio.run(main())
    assert_no_children(ignore=before)


def test_unknown_operator_waits_while_the_cluster_starts():
    """A name nobody hosts yet waits while the cluster has no (started) worker, and is served once
    a worker hosting it arrives; once every worker has started, a name nobody ever hosted fails
    at once."""
    import asyncio

    from distributed import Scheduler

    from tests.conftest import async_wait_for

    before = child_pids()

    async def main():
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0", dashboard=False) as scheduler:
            async with Client(scheduler.address, asynchronous=True) as client:
                began = time.monotonic()
                with dask.config.set({"tdask.request.unavailable-timeout": "1s"}):
                    with pytest.raises(OperatorUnavailableError, match=r"waited \d"):
                        await RemoteOperator("nope", client=client).infer(timeout=30)
                waited = time.monotonic() - began
                with dask.config.set({"tdask.request.unavailable-timeout": "120s"}):
                    pending = asyncio.create_task(
                        RemoteOperator("identity", client=client).infer(inputs={"x": np.ones(2)}, timeout=150)
                    )
                    await asyncio.sleep(0)
                    async with Deployment(
                        [OperatorConfig(name="identity", implementation=Identity)],
                        scheduler_address=scheduler.address,
                        asynchronous=True,
                    ):
                        response = await asyncio.wait_for(pending, 120)
                        began = time.monotonic()
                        with pytest.raises(OperatorUnavailableError, match="none ever did"):
                            await RemoteOperator("nope", client=client).infer(timeout=30)
                        at_once = time.monotonic() - began
                await async_wait_for(lambda: not scheduler.workers, message="workers still registered")
                return waited, response, at_once

    waited, response, at_once = asyncio.run(main())
    assert waited >= 0.9, "no worker yet: the request waited for its bound"
    assert response.outputs["x"].tolist() == [1.0, 1.0]
    assert at_once < 10, "every worker started: answered at once, not after the 120 s wait"
    assert_no_children(ignore=before)


def test_a_leaving_worker_spends_no_retry(deployment):
    """A worker that closes gracefully with requests running and waiting: with no retry allowed
    (max-retries 0), every request is still answered right, by whichever worker, since a leaving
    worker hands back (direct plane) or releases (queue plane) what it will not answer."""
    import asyncio

    from tests.conftest import async_wait_for, run_async

    async def go(c):
        async def slots(key: str) -> dict[str, int]:
            stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
            return {w: s["slow/1"][key] for w, s in stats.items() if "slow/1" in s}

        op = RemoteOperator("slow", client=c)
        info = await c.scheduler.identity(n_workers=-1)
        victim = next(a for a, w in info["workers"].items() if str(w["name"]) == "slow.0")
        tasks = [
            asyncio.create_task(
                op.infer(inputs={"a": np.array([i]), "b": np.array([1])}, parameters={"delay": 0.5}, timeout=60)
            )
            for i in range(12)
        ]
        await async_wait_for(lambda: slots("inflight"), message="nothing ran")

        async def victim_busy() -> bool:
            return (await slots("inflight")).get(victim) == 2

        await async_wait_for(victim_busy, message="slow.0 never ran two requests")

        def leave(dask_worker):
            dask_worker.loop.add_callback(dask_worker.close, nanny=False, reason="tdask-test-leaving")

        await c.run(leave, workers=[victim])
        responses = await asyncio.gather(*tasks)

        async def replaced() -> bool:  # its Nanny's fresh worker serves (and no start is pending)
            hosts = (await c.scheduler.tdask_operators())["hosts"].get("slow/1", [])
            return len(hosts) == 2 and victim not in hosts

        await async_wait_for(replaced, timeout=60, message="slow.0 was not replaced")
        return responses

    with dask.config.set({"tdask.request.max-retries": 0}):  # read when each request starts
        responses = run_async(deployment.scheduler_address, go)
    assert [int(r.outputs["out"][0]) for r in responses] == [i + 1 for i in range(12)]


def test_a_worker_slow_to_restart_is_not_given_up(tmp_path):
    """SpecCluster gives up on a worker whose name is not back within lost-worker-timeout; a worker
    that restarts itself (its Triton died) and takes longer than that to start again, while its
    Nanny is starting it, must come back all the same (the soak lost two of six workers so)."""
    from tests.conftest import wait_for
    from tests.operators import SlowStart

    before = child_pids()
    config = OperatorConfig(name="slowstart", implementation=SlowStart, parameters={"setup_s": 3})
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        with Deployment([config], dashboard_address=None) as dep:
            op = RemoteOperator("slowstart", client=dep.client)
            first = int(op.infer(timeout=30).outputs["pid"][0])
            # Restarts the worker; the request is served again by the fresh one (3 s to start).
            response = op.infer(parameters={"marker": str(tmp_path / "restarted")}, timeout=60)
            second = int(response.outputs["pid"][0])
            assert second != first and (tmp_path / "restarted").exists()

            def serving() -> bool:  # and it stays: SpecCluster did not close its Nanny meanwhile
                return dep.worker_addresses() != {} and int(op.infer(timeout=10).outputs["pid"][0]) == second

            wait_for(serving, timeout=30, message="the restarted worker did not stay")
            assert int(op.infer(timeout=10).outputs["pid"][0]) == second
    assert_no_children(ignore=before)
