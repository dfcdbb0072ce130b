"""A bounded soak: many requests in flight while workers are SIGKILLed and restarted.

Default size keeps CI fast; ``TDASK_SOAK_REQUESTS=20000`` runs the full soak of issue 6.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import dask
import numpy as np
import pytest

from tdask import Deployment, OperatorConfig, RemoteOperator, TdaskError
from tests.conftest import assert_no_children, child_pids, run_async
from tests.operators import Add

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

REQUESTS = int(os.environ.get("TDASK_SOAK_REQUESTS", "3000"))
IN_FLIGHT = 64
KILLS = max(2, REQUESTS // 5000)


@pytest.mark.parametrize("plane", ["queue", "direct"])
def test_soak_with_worker_kills(record_property, plane):
    from tests.conftest import async_wait_for

    before = child_pids()
    operators = [(OperatorConfig(name="add", implementation=Add, max_inflight_requests=8), 3)]
    with dask.config.set({"tdask.request.plane": plane}), Deployment(operators, dashboard_address=None) as dep:

        def rss(dask_worker):
            import psutil

            return psutil.Process().memory_info().rss

        rss_before = dep.client.run(rss)

        async def go(c):
            op = RemoteOperator("add", client=c)
            slots = asyncio.Semaphore(IN_FLIGHT)
            answers: dict[int, int] = {}
            errors: list[str] = []
            done = 0

            async def one(i: int) -> None:
                nonlocal done
                async with slots:
                    big = i % 50 == 0  # some requests carry tensors through the data plane
                    a = np.full(20_000 if big else 8, i, dtype=np.int64)
                    try:
                        r = await op.infer(inputs={"a": a, "b": np.ones_like(a)}, timeout=120)
                        assert np.array_equal(r.outputs["out"], a + 1)
                        answers[i] = answers.get(i, 0) + 1
                    except TdaskError as exc:
                        errors.append(f"{i}: {exc!r}")
                    done += 1

            async def killer() -> int:
                kills = 0
                rng = random.Random(0)
                for k in range(KILLS):
                    target = (k + 1) * REQUESTS // (KILLS + 1)
                    await async_wait_for(lambda t=target: done >= t, timeout=600, message=f"kill {k}: requests stalled")
                    info = await c.scheduler.identity(n_workers=-1)
                    victim = rng.choice(sorted(info["workers"]))
                    pid = (await c.run(os.getpid, workers=[victim]))[victim]
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                return kills

            kill_task = asyncio.create_task(killer())
            await asyncio.gather(*(one(i) for i in range(REQUESTS)))
            kills = await kill_task
            counts = (await c.scheduler.tdask_operators())["counts"]
            return answers, errors, kills, counts

        answers, errors, kills, counts = run_async(dep.scheduler_address, go, timeout=800)
        # Let restarted workers come back before reading their stores.
        dep.client.wait_for_workers(3, timeout=60)
        stats = dep.client.run(lambda dask_worker: dask_worker.handlers["tdask_store_stats"]())
        rss_after = dep.client.run(rss)
    lost = REQUESTS - len(answers) - len(errors)
    duplicated = sum(n - 1 for n in answers.values() if n > 1)
    record_property(
        "figures",
        f"soak ({plane} plane): requests={REQUESTS} in_flight={IN_FLIGHT} kills={kills} answered={len(answers)} "
        f"errors={len(errors)} lost={lost} duplicated={duplicated} retried={counts.get('retried', 0)} "
        f"dropped_stale={counts.get('dropped', 0)} "
        f"rss_before_MB={[round(v / 2**20) for v in rss_before.values()]} "
        f"rss_after_MB={[round(v / 2**20) for v in rss_after.values()]}",
    )
    assert kills == KILLS
    assert errors == [], errors[:5]
    assert lost == 0 and duplicated == 0
    assert all(s["tensors"] == 0 for s in stats.values()), stats
    assert_no_children(ignore=before)
