"""Calls between operators of one worker go in process (tdask.transport.loopback), and that worker
is preferred among equally loaded hosts; everything else about the call is unchanged.

One deployment for the module: worker A hosts ``relay`` (which calls ``where``), ``where``,
``forward`` with its ``producer`` and ``consumer``, and ``relay_fail`` with ``fail``; worker B
hosts a second ``where``. Only A's operators call others, so every nested call may stay on A.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from distributed import Client

from tdask import Deployment, OperatorConfig, RemoteOperator, RequestTimeoutError, TdaskError
from tdask.host import PLUGIN_NAME, OperatorHost
from tests.conftest import run_async, store_stats, wait_for
from tests.operators import Consumer, Fail, Forward, Producer, Relay, Where

pytestmark = pytest.mark.cluster


def _config(name: str, cls: type, **parameters: str) -> OperatorConfig:
    return OperatorConfig(name=name, implementation=cls, max_inflight_requests=16, parameters=parameters)


@pytest.fixture(scope="module")
def deployment():
    relay = _config("relay", Relay, sink="where")
    dep = Deployment([relay, _config("where", Where)], dashboard_address=None)
    with dep:
        client = dep.client
        (a,) = RemoteOperator("relay", client=client).wait(60)
        more = OperatorHost(
            [
                OperatorConfig(name="where", implementation=Where, max_inflight_requests=2),  # 2 slots here
                _config("forward", Forward, first="producer", second="consumer"),
                _config("producer", Producer),
                _config("consumer", Consumer),
                _config("relay_fail", Relay, sink="fail"),
                _config("fail", Fail),
            ]
        )

        async def add(dask_worker):
            return await dask_worker.plugin_add(more, name="tdask-more", catch_errors=False)

        client.run(add, workers=[a])
        wait_for(
            lambda: len(RemoteOperator("where", client=client).wait(30)) == 2,
            timeout=60,
            message="where on both workers",
        )
        yield dep, a


def _pid(client: Client, address: str) -> int:
    return client.run(lambda: __import__("os").getpid(), workers=[address])[address]


def _session_kinds(client: Client, a: str) -> dict[str, str]:
    """The transports A's own caller plane holds, by peer address."""

    def kinds(dask_worker):
        plane = dask_worker.plugins[PLUGIN_NAME].plane
        return {peer: type(session).__name__ for peer, session in plane._workers.items()}

    return client.run(kinds, workers=[a])[a]


def test_a_call_to_an_operator_of_the_same_worker_stays_in_process(deployment):
    """Sequential calls: every nested call is served by A's own ``where``, over an in-process
    session (before: round robin over A and B, on the wire)."""
    dep, a = deployment
    client = dep.client
    relay = RemoteOperator("relay", client=client)
    pids = {relay.infer({"x": np.ones(2)}, timeout=30).parameters["pid"] for _ in range(12)}
    assert pids == {_pid(client, a)}
    assert _session_kinds(client, a) == {a: "LoopbackSession"}


def test_the_own_worker_takes_calls_while_it_has_free_slots(deployment):
    """A's ``where`` has 2 slots: 2 nested calls at once all stay on A; 8 at once spill over to B
    (the least loaded) once A's slots are taken."""
    dep, a = deployment
    client = dep.client

    async def burst(c, n):
        relay = RemoteOperator("relay", client=c)
        answers = await asyncio.gather(
            *(relay.infer({"x": np.ones(2)}, parameters={"delay": 0.3}, timeout=30) for _ in range(n))
        )
        return [r.parameters["pid"] for r in answers]

    pid_a = _pid(client, a)
    assert run_async(dep.scheduler_address, lambda c: burst(c, 2)) == [pid_a, pid_a]
    pids = run_async(dep.scheduler_address, lambda c: burst(c, 8))
    assert len(pids) == 8 and 2 <= pids.count(pid_a) < 8, pids  # A's slots, then B too
    kinds = _session_kinds(client, a)
    assert kinds[a] == "LoopbackSession" and set(kinds.values()) == {"LoopbackSession", "WireSession"}


def test_tensors_forwarded_in_process_stay_in_the_workers_store(deployment):
    """A large output forwarded by reference between operators of one worker: read from its own
    store, nothing pulled over any wire, nothing left behind."""
    dep, a = deployment
    client = dep.client
    before = store_stats(client)
    forward = RemoteOperator("forward", client=client)
    for start in range(3):
        answer = forward.infer({"start": np.array([float(start)])}, parameters={"n": 100_000}, timeout=30)
        assert answer.outputs["sum"][0] == np.arange(start, start + 100_000, dtype=np.float64).sum()
    after = store_stats(client)
    for name in after:
        assert after[name]["pulls"] == before[name]["pulls"], (name, before[name], after[name])
        assert after[name]["shortcut_calls"] == before[name]["shortcut_calls"]
    wait_for(
        lambda: all(s["tensors"] == 0 for s in store_stats(client).values()), timeout=20, message="every store empty"
    )
    assert any(after[n]["local_gets"] > before[n]["local_gets"] for n in after)


def test_errors_and_timeouts_of_in_process_calls_reach_the_caller(deployment):
    dep, a = deployment
    client = dep.client
    relay_fail = RemoteOperator("relay_fail", client=client)
    with pytest.raises(TdaskError, match="boom from Fail"):
        relay_fail.infer({"x": np.ones(1)}, timeout=30)
    began = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        relay_fail.infer({"x": np.ones(1)}, parameters={"mode": "sleep", "seconds": 60}, timeout=1.5)
    assert time.monotonic() - began < 10

    def fail_inflight() -> int:
        stats = client.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"](), workers=[a])[a]
        return stats["fail/1"]["inflight"]

    wait_for(lambda: fail_inflight() == 0, timeout=20, message="the nested call cancelled on A")


# -- a Deployment that co-locates operators (colocate=, or colocate_with in a deployment file) ----


@pytest.fixture(scope="module")
def colocated():
    ops = [
        _config("forward", Forward, first="producer", second="consumer"),
        _config("producer", Producer),
        _config("consumer", Consumer),
    ]
    with Deployment(ops, dashboard_address=None, colocate={"producer": "forward", "consumer": "forward"}) as dep:
        yield dep


def _hosts(client: Client, operator: str) -> list[str]:
    return sorted(RemoteOperator(operator, client=client).wait(30))


def test_a_deployment_runs_colocated_operators_on_their_hosts_workers(colocated):
    dep = colocated
    client = dep.client
    assert sorted(dep.workers_spec) == ["forward.0"]
    (worker,) = _hosts(client, "forward")
    assert _hosts(client, "producer") == _hosts(client, "consumer") == [worker]
    assert "operator forward/1, producer/1, consumer/1" in dep.describe()
    answer = RemoteOperator("forward", client=client).infer(
        {"start": np.array([1.0])}, parameters={"n": 100_000}, timeout=30
    )
    assert answer.outputs["sum"][0] == np.arange(1.0, 100_001.0).sum()
    assert _session_kinds(client, worker) == {worker: "LoopbackSession"}


def test_colocated_operators_scale_with_their_host_and_not_alone(colocated):
    dep = colocated
    client = dep.client
    with pytest.raises(ValueError, match="runs on the workers of 'forward'"):
        dep.scale("producer", 2)
    assert dep.scale("forward", 2) == ["forward.0", "forward.1"]
    try:
        assert len(_hosts(client, "producer")) == len(_hosts(client, "consumer")) == 2
        assert dep.operator_workers("consumer") == ["forward.0", "forward.1"]
    finally:
        assert dep.scale("forward", 1) == ["forward.0"]
    wait_for(lambda: len(_hosts(client, "producer")) == 1, timeout=30, message="the guests left with forward.1")
