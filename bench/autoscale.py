"""``python -m bench.autoscale``: a load step on an autoscaled operator, and the load dropping again.

    python -m bench.autoscale [--step-callers 8] [--sleep 0.05] [--maximum 4]

Deploys one Python operator that sleeps ``--sleep`` seconds per request
(:class:`bench.autoscale.Sleeper`, ``max_inflight_requests`` 2) and autoscales it
(:meth:`tdask.Deployment.adapt`: ``--minimum`` to ``--maximum`` workers, sized for
``--target`` requests in flight per worker, ``--up-delay`` / ``--down-delay``). Then, in closed
loops (each caller sends its next request when the last is answered):

1. **before**: 1 caller for ``--before`` seconds: the p99 to get back to;
2. **step**: ``--step-callers`` callers for ``--step`` seconds: the operator grows; measured:
   the seconds from the step until the p99 of a ``--window``-second window of answers is back
   under the pre-step p99 (times ``1 + --tolerance``) and stays there for the rest of the step,
   the workers added, the requests failed;
3. **drop**: 1 caller again until the operator is back at ``--minimum`` (at most ``--after``
   seconds): the seconds it took, the requests failed.

Every request has an id; the client counts the answers per id, those that reach it when nobody
waits for them any more included (``duplicated``; ``lost``: an id that got neither an answer nor
an error). Prints a table and one JSON line. Exit status 1 when a request failed, was lost or
answered twice, or the operator did not grow or shrink back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/autoscale.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench.common import machine, table, versions
from tdask import Operator

ROOT = Path(__file__).resolve().parent.parent


class Sleeper(Operator):
    """Answers ``x + 1`` after sleeping ``parameters["sleep"]`` seconds (a stand-in for a model)."""

    async def execute(self, requests):  # type: ignore[no-untyped-def]
        await asyncio.gather(*(self._one(request) for request in requests))

    async def _one(self, request):  # type: ignore[no-untyped-def]
        await asyncio.sleep(float(self.parameters.get("sleep", 0.05)))
        inputs = await request.fetch_inputs()
        await request.response_sender().send(outputs={"y": inputs["x"] + 1})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sleep", type=float, default=0.05, help="seconds each request sleeps in the operator")
    p.add_argument("--step-callers", type=int, default=8)
    p.add_argument("--before", type=float, default=8.0, help="seconds of 1 caller before the step")
    p.add_argument("--step", type=float, default=40.0, help="seconds of --step-callers callers")
    p.add_argument("--after", type=float, default=90.0, help="at most this long for the operator to shrink back")
    p.add_argument("--minimum", type=int, default=1)
    p.add_argument("--maximum", type=int, default=4)
    p.add_argument("--target", type=float, default=2.0, help="requests in flight per worker")
    p.add_argument("--up-delay", type=float, default=1.0)
    p.add_argument("--down-delay", type=float, default=5.0)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between the autoscaler's looks")
    p.add_argument("--window", type=float, default=2.0, help="seconds of answers per p99 window")
    p.add_argument("--tolerance", type=float, default=0.0, help="back under pre-step p99 x (1 + this)")
    p.add_argument("--log-dir", default=None)
    return p.parse_args(argv)


def p99(latencies: list[float]) -> float | None:
    return float(np.percentile(latencies, 99)) if latencies else None


def recovery(answers: list[tuple[float, float]], start: float, end: float, window: float, bound: float) -> Any:
    """``(seconds from start to the end of the first window whose p99 <= bound, the share of later windows
    under it, the windows)``."""
    windows = []
    t = start
    while t + window <= end + 1e-9:
        lat = [latency for when, latency in answers if t <= when < t + window]
        windows.append((t - start, p99(lat)))
        t += window / 2  # half-overlapping windows
    for i, (offset, value) in enumerate(windows):
        if value is not None and value <= bound:
            later = [v for _, v in windows[i:]]
            return offset + window, sum(1 for v in later if v is not None and v <= bound) / len(later), windows
    return None, 0.0, windows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tdask import Deployment, OperatorConfig, RemoteOperator
    from tdask.remote import _ClientEndpoint

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    config = OperatorConfig(
        name="sleeper", implementation=Sleeper, max_inflight_requests=2, parameters={"sleep": args.sleep}
    )
    out: dict[str, Any] = {"section": "autoscale", "settings": vars(args) | {}, "machine": machine()}
    out["versions"] = versions()
    async with Deployment([config], dashboard_address=None, log_dir=args.log_dir, asynchronous=True) as dep:
        assert dep.client is not None
        client = dep.client
        adaptive = dep.adapt(
            "sleeper",
            minimum=args.minimum,
            maximum=args.maximum,
            target_inflight_per_worker=args.target,
            up_delay=args.up_delay,
            down_delay=args.down_delay,
            interval=args.interval,
        )
        op = RemoteOperator("sleeper", client=client)
        plane = _ClientEndpoint.of(client).plane
        orphans: Counter[str] = Counter()
        plane.on_orphan = lambda reply: orphans.update([reply["id"]])
        answered: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        sent: list[str] = []
        errored: set[str] = set()
        first_answer: dict[str, float] = {}  # worker -> when it first answered
        log: list[tuple[float, float, str]] = []  # (answered at, latency, phase)
        sizes: list[tuple[float, int]] = []
        phase = {"name": "before", "callers": 1}
        stop = asyncio.Event()
        counter = iter(range(10**9))

        async def caller(k: int) -> None:
            while not stop.is_set():
                if k >= phase["callers"]:
                    await asyncio.sleep(0.01)
                    continue
                request_id = f"autoscale-{next(counter)}"
                sent.append(request_id)
                began = time.perf_counter()
                try:
                    response = await op.infer({"x": np.zeros(4)}, request_id=request_id, timeout=120)
                    assert response.outputs["y"][0] == 1.0
                    answered[request_id] += 1
                    now = time.monotonic()
                    log.append((now, time.perf_counter() - began, str(phase["name"])))
                    first_answer.setdefault(str(response.worker), now)
                except Exception as exc:
                    errors[type(exc).__name__] += 1
                    errored.add(request_id)

        async def watch() -> None:
            while not stop.is_set():
                sizes.append((time.monotonic(), len(dep.operator_workers("sleeper"))))
                await asyncio.sleep(0.25)

        tasks = [asyncio.create_task(caller(k)) for k in range(args.step_callers)]
        watcher = asyncio.create_task(watch())
        t0, wall0 = time.monotonic(), time.time()
        await asyncio.sleep(args.before)
        before = [lat for _, lat, name in log if name == "before"]
        p99_before = p99(before)
        phase.update(name="step", callers=args.step_callers)
        step_start = time.monotonic()
        failed_before = sum(errors.values())
        await asyncio.sleep(args.step)
        step_end = time.monotonic()
        failed_step = sum(errors.values()) - failed_before
        phase.update(name="drop", callers=1)
        drop_start = time.monotonic()
        shrunk_after = None
        while time.monotonic() - drop_start < args.after:
            if len(dep.operator_workers("sleeper")) <= args.minimum:
                shrunk_after = time.monotonic() - drop_start
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks, watcher)
        failed_drop = sum(errors.values()) - failed_before - failed_step
        adaptive.stop()
        await asyncio.sleep(0)
        step_answers = [(when, lat) for when, lat, name in log if name == "step"]
        assert p99_before is not None
        bound = p99_before * (1 + args.tolerance)
        recovered, staying, windows = recovery(step_answers, step_start, step_end, args.window, bound)
        new_workers = [t - step_start for t in first_answer.values() if t > step_start]
        serving_after = max(new_workers) if new_workers else None
        grown = [(when - step_start, n) for when, n in sizes if step_start <= when <= step_end]
        peak = max((n for _, n in grown), default=1)
        first_added = next((t for t, n in grown if n > args.minimum), None)
        out["results"] = {
            "p99_before_ms": p99_before * 1e3,
            "p50_before_ms": float(np.percentile(before, 50)) * 1e3,
            "p99_step_first_window_ms": (windows[0][1] or 0) * 1e3 if windows else None,
            "p99_step_last_window_ms": (windows[-1][1] or 0) * 1e3 if windows else None,
            "recovered_after_s": recovered,
            "windows_under_after_recovery": staying,
            "all_added_serving_after_s": serving_after,
            "first_worker_added_after_s": first_added,
            "workers_before": args.minimum,
            "workers_peak": peak,
            "workers_added": peak - args.minimum,
            "shrunk_back_after_s": shrunk_after,
            "requests": len(sent),
            "requests_step": len(step_answers),
            "failed": dict(errors),
            "failed_step": failed_step,
            "failed_drop": failed_drop,
            "lost": sum(1 for i in sent if answered[i] + orphans[i] == 0 and i not in errored),
            "duplicated": sum(1 for i in sent if answered[i] + orphans[i] > 1),
            "windows_ms": [(round(t, 2), None if v is None else round(v * 1e3, 2)) for t, v in windows],
            "sizes": [(round(t - t0, 2), n) for t, n in sizes[:: max(1, len(sizes) // 60)]],
            # Dask's own record of the recommendations it acted on: (seconds since the start, what)
            "adaptive_log": [(round(when - wall0, 2), rec) for when, rec in adaptive.log],
        }
    return out


def failed(out: dict[str, Any]) -> list[str]:
    """What went wrong (empty: nothing)."""
    r = out["results"]
    problems = []
    if r["failed"]:
        problems.append(f"requests failed: {r['failed']}")
    if r["lost"] > 0:
        problems.append(f"{r['lost']} requests lost")
    if r["duplicated"]:
        problems.append(f"{r['duplicated']} requests answered twice")
    if r["workers_added"] < 1:
        problems.append("the operator did not grow")
    if r["shrunk_back_after_s"] is None:
        problems.append("the operator did not shrink back")
    return problems


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def render(out: dict[str, Any]) -> str:
    r, s = out["results"], out["settings"]
    rows = [
        ["p99 before the step (1 caller)", f"{r['p99_before_ms']:.1f} ms"],
        [
            f"p99, first {s['window']:g} s after the step ({s['step_callers']} callers)",
            _ms(r["p99_step_first_window_ms"]),
        ],
        [f"p99, last {s['window']:g} s of the step", _ms(r["p99_step_last_window_ms"])],
        ["step -> first worker asked for", _s(r["first_worker_added_after_s"])],
        ["step -> every added worker answering", _s(r["all_added_serving_after_s"])],
        ["step -> p99 back under the pre-step p99", _s(r["recovered_after_s"])],
        ["  later windows under it", f"{r['windows_under_after_recovery']:.0%}"],
        ["workers before / peak (added)", f"{r['workers_before']} / {r['workers_peak']} ({r['workers_added']})"],
        ["load drop -> back at the minimum", _s(r["shrunk_back_after_s"])],
        ["requests (during the step)", f"{r['requests']} ({r['requests_step']})"],
        ["failed (step / drop)", f"{sum(r['failed'].values())} ({r['failed_step']} / {r['failed_drop']})"],
        ["lost / answered twice", f"{r['lost']} / {r['duplicated']}"],
    ]
    note = (
        f"operator: sleep {s['sleep'] * 1e3:g} ms, max_inflight_requests 2; adapt(minimum={s['minimum']}, "
        f"maximum={s['maximum']}, target_inflight_per_worker={s['target']:g}, up_delay={s['up_delay']:g}, "
        f"down_delay={s['down_delay']:g}, interval={s['interval']:g}); p99 over {s['window']:g}-s windows of answers, "
        f"'back under': the first window whose p99 <= pre-step p99 x {1 + s['tolerance']:g}"
    )
    return table("autoscale: a load step, then the load drops", ["measure", "value"], rows, note=note)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = asyncio.run(run(args))
    print(render(out))  # noqa: T201
    print(json.dumps(out, sort_keys=True, default=str))  # noqa: T201
    problems = failed(out)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)  # noqa: T201
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
