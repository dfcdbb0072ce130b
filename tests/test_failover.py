"""Failover in milliseconds: the owner of in-flight tensors is SIGKILLed under load.

The relays record each execution per request id in a file per process (:mod:`tests.executions`):
the requests the killed relay had started and not finished are the ones the kill caught, and
how long each waited from the kill to its answer is the failover time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import dask
import numpy as np
import pytest

from tdask import Deployment, OperatorConfig, RemoteOperator
from tests.conftest import assert_no_children, async_wait_for, child_pids, run_async, store_stats
from tests.executions import Answers, Ledger, check
from tests.operators import Consumer, Relay

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ELEMENTS = 10 * 2**20 // 8  # 10 MiB of float64 per request
REQUESTS = 120
IN_FLIGHT = 6
FAILOVER_S = 1.0  # docs/design.md: a request caught by the kill is answered in under 1 s


@pytest.mark.parametrize("plane", ["direct", "queue"])
def test_sigkill_the_owner_of_in_flight_inputs(record_property, plane, tmp_path):
    """Two `relay` workers forward 10 MiB inputs (stored on the relay hosts) to `sink` by
    reference; SIGKILL the relay that stores inputs in flight while it executes requests. Every
    answer stays right; each request is answered once and executed at most 1 + max-retries
    times (never twice to the end by workers that lived); the stores end empty; and each
    request the killed relay was executing is answered within 1 s of the kill: the dead owner
    is known at once (refused, or removed by the scheduler), a forwarded descriptor fails the
    inner call at once, and the client places the input again and re-sends."""
    before = child_pids()
    ledger_dir = tmp_path / "executions"
    ledger_dir.mkdir()
    operators = [
        (
            OperatorConfig(
                name="relay",
                implementation=Relay,
                max_inflight_requests=4,
                parameters={"record_dir": str(ledger_dir)},
            ),
            2,
        ),
        (OperatorConfig(name="sink", implementation=Consumer, max_inflight_requests=4), 1),
    ]
    max_retries = int(dask.config.get("tdask.request.max-retries"))
    ids = [f"failover-{i}" for i in range(REQUESTS)]
    with dask.config.set({"tdask.request.plane": plane}), Deployment(operators, dashboard_address=None) as dep:
        workers = dep.worker_addresses()
        victim = workers["relay.0"]

        async def go(c):
            op = RemoteOperator("relay", client=c)
            answers = Answers().install(c)
            slots = asyncio.Semaphore(IN_FLIGHT)
            sent: dict[str, float] = {}  # time.time() when each request was first sent
            answered: dict[str, float] = {}  # and when its answer came
            kill: dict[str, float] = {}

            async def one(i: int) -> None:
                async with slots:
                    sent[ids[i]] = time.time()
                    inputs = {"data": np.full(ELEMENTS, float(i))}
                    response = await answers.call(op, ids[i], inputs=inputs, timeout=60)
                    answered[ids[i]] = time.time()
                    assert response.outputs["sum"][0] == float(i) * ELEMENTS, f"request {i}: wrong answer"

            async def stored(address: str) -> int:
                stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_store_stats"](), workers=[address])
                return stats[address]["tensors"]

            async def killer() -> None:
                pid = (await c.run(os.getpid, workers=[victim]))[victim]
                await async_wait_for(lambda: len(answered) >= REQUESTS // 4, timeout=60)

                # Kill it while it executes a request whose input is stored on the other relay (the
                # plane re-sends it) and stores inputs of requests in flight (their callers place
                # them again and re-send).
                async def ready() -> bool:
                    if not await stored(victim):
                        return False
                    return any(owner != victim for owner in Ledger.executing(ledger_dir, pid).values())

                await async_wait_for(ready, timeout=30, interval=0.002)
                kill["at"] = time.time()
                os.kill(pid, signal.SIGKILL)
                kill["pid"] = pid

            await asyncio.gather(killer(), *(one(i) for i in range(REQUESTS)))
            return sent, answered, kill, answers

        sent, answered, kill, answers = run_async(dep.scheduler_address, go)
        dep.client.wait_for_workers(3, timeout=60)

        def empty() -> bool:
            return all(s["tensors"] == 0 for s in store_stats(dep.client).values())

        from tests.conftest import wait_for

        wait_for(empty, timeout=20, message=lambda: f"stores not empty: {store_stats(dep.client)}")
    killed_at, pid = kill["at"], kill["pid"]
    ledger = Ledger.read(ledger_dir)
    problems, figures = check(ids, answers, ledger, {pid}, max_retries)
    # The requests the kill caught: started on the killed relay, not finished there (its own record).
    caught = ledger.in_flight(pid)
    waits = {i: answered[i] - killed_at for i in caught if i in answered}
    inputs_on_victim = sorted(i for i, e in caught.items() if e.detail == victim)
    # Every request in flight at the kill (sent before it, answered after), wherever it ran.
    in_flight = {i: answered[i] - killed_at for i in ids if i in answered and sent[i] < killed_at < answered[i]}
    began, ended = min(sent.values()), max(answered.values())
    record_property(
        "figures",
        f"failover ({plane} plane): {REQUESTS} requests of 10 MiB, {IN_FLIGHT} in flight; the kill caught "
        f"{len(caught)} executing on the killed relay ({len(inputs_on_victim)} with their input stored there); "
        f"their wait from the kill to the answer: "
        f"{', '.join(f'{i} {w * 1e3:.0f} ms' for i, w in sorted(waits.items(), key=lambda kv: kv[1]))}; "
        f"longest wait of the {len(in_flight)} requests in flight at the kill "
        f"{max(in_flight.values(), default=0) * 1e3:.0f} ms; executions per id {figures['executions_per_id']}, "
        f"answers per id {figures['answers_per_id']}; total {ended - began:.2f} s",
    )
    assert problems == [], problems
    assert caught, "the kill caught no request executing on the killed relay"
    assert set(waits) == set(caught), f"requests caught by the kill never answered: {set(caught) - set(waits)}"
    slow = {i: round(w, 3) for i, w in waits.items() if w >= FAILOVER_S}
    assert not slow, f"requests caught by the kill waited {slow} s for their answer (docs/design.md: under 1 s)"
    # Those whose input died with the relay while they ran on the other one are re-sent too.
    slow = {i: round(w, 3) for i, w in in_flight.items() if w >= FAILOVER_S}
    assert not slow, f"requests in flight at the kill waited {slow} s for their answer"
    assert_no_children(ignore=before)
