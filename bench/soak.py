"""``python -m bench.soak``: hello-world traffic while workers, Triton servers and stubs are SIGKILLed.

    python -m bench.soak --requests 20000 --kill-every 3s

Deploys the hello world (2 encoder, 2 decoder and 2 encoder_decoder workers by default, the
scheduler embedded in this process as in ``python -m tdask.hello_world``), keeps ``--in-flight``
requests of random int64 arrays in flight, checks every answer, and every ``--kill-every``
SIGKILLs one process picked at random: a worker, a worker's ``tritonserver`` (``--triton-mode
subprocess`` only: in process, Triton is the worker itself), or one of its python-backend stubs.
Prints a table per section and one JSON line (as ``python -m bench``):

- what happened to the requests: answered right, wrong, lost (no answer at all), duplicated,
  and the errors by type (every one a typed tdask error, or counted as untyped), p50 and p99;
- RSS per process over time (this process, each worker, each worker's Triton), sampled every
  ``--sample-every``;
- what is left at the end, once every worker is back: tensors in the stores, shared-memory
  regions of servers that are gone, and Triton processes that outlived their worker.

The exit status is 1 when anything was lost, wrong, duplicated, untyped or left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/soak.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import psutil

from bench.common import machine, table, versions

_PREFIX = re.compile(r"(?:shm-region-prefix-name=|\s)(tdask\d+-[0-9a-f]+_)")  # server or stub command line
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dask.utils import parse_timedelta

    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000, help="requests in all")
    p.add_argument("--kill-every", default="3s", help="SIGKILL one process this often (e.g. 3s, 500ms)")
    p.add_argument(
        "--kill",
        default=None,
        help="kinds of process to kill (default: worker,stub, and tritonserver in subprocess mode)",
    )
    p.add_argument(
        "--triton-mode",
        choices=("subprocess", "in-process"),
        default=None,
        help="tdask.triton.mode of the workers (default: the configured one)",
    )
    p.add_argument("--in-flight", type=int, default=32, help="requests kept in flight")
    p.add_argument("--size", type=int, default=1000, help="int64 elements per request")
    p.add_argument("--workers", type=int, default=2, help="workers per operator (encoder, decoder, encoder_decoder)")
    p.add_argument("--timeout", default="120s", help="deadline of each request")
    p.add_argument("--sample-every", default="2s", help="how often RSS is sampled")
    p.add_argument("--plane", choices=("direct", "queue"), default="direct", help="tdask.request.plane")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="keep worker and Triton logs here")
    args = p.parse_args(argv)
    args.kill_every_s = parse_timedelta(args.kill_every, default="seconds")
    args.timeout_s = parse_timedelta(args.timeout, default="seconds")
    args.sample_every_s = parse_timedelta(args.sample_every, default="seconds")
    import dask.config

    import tdask.config  # noqa: F401  (tdask's defaults: tdask.triton.mode)

    args.triton_mode = args.triton_mode or dask.config.get("tdask.triton.mode")
    kinds = {"worker", "tritonserver", "stub"} if args.triton_mode == "subprocess" else {"worker", "stub"}
    args.kill = args.kill or ",".join(k for k in ("worker", "tritonserver", "stub") if k in kinds)
    args.kinds = [k.strip() for k in args.kill.split(",") if k.strip()]
    unknown = set(args.kinds) - kinds
    if unknown:
        p.error(
            f"--kill: unknown kinds {sorted(unknown)} in tdask.triton.mode {args.triton_mode!r} "
            "(in process there is no tritonserver: Triton is the worker)"
        )
    return args


@dataclass
class Outcome:
    """What happened to the requests."""

    answers: dict[int, int] = field(default_factory=dict)  # request -> right answers
    wrong: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # typed tdask errors by type
    untyped: list[str] = field(default_factory=list)  # anything else
    latencies_s: list[float] = field(default_factory=list)
    done: int = 0


@dataclass
class Watch:
    """What the soak saw of its processes."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # role -> [(t, MB)]
    triton_pids: set[int] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)


def _tree(cluster: Any, names: dict[str, str]) -> dict[str, tuple[psutil.Process, list[psutil.Process]]]:
    """Worker name -> (worker process, its Triton processes)."""
    out = {}
    for address, pid in cluster.pids.items():
        try:
            proc = psutil.Process(pid)
            out[names.get(address, address)] = (proc, proc.children(recursive=True))
        except psutil.Error:
            continue
    return out


class _Cluster:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.pids: dict[str, int] = {}
        self.names: dict[str, str] = {}

    async def refresh(self) -> None:
        try:
            self.pids = await asyncio.wait_for(self.client.run(os.getpid, on_error="ignore"), 10)
            info = await asyncio.wait_for(self.client.scheduler.identity(n_workers=-1), 10)
            self.names = {a: str(w["name"]) for a, w in info["workers"].items()}
        except Exception:  # noqa: BLE001 - a worker dying mid-call: keep the last view
            pass


def _sample(cluster: _Cluster, watch: Watch, began: float) -> None:
    now = time.monotonic() - began
    roles = {"bench process (client, scheduler, nannies)": psutil.Process().memory_info().rss}
    for name, (worker, triton) in _tree(cluster, cluster.names).items():
        try:
            roles[f"worker {name}"] = worker.memory_info().rss
        except psutil.Error:
            continue
        total = 0
        for proc in triton:
            try:
                total += proc.memory_info().rss
                watch.triton_pids.add(proc.pid)
                match = _PREFIX.search(" ".join(proc.cmdline()))
                if match:
                    watch.prefixes.add(match.group(1))
            except psutil.Error:
                continue
        if triton:
            roles[f"triton of {name} (server, stubs, reaper)"] = total
    for role, rss in roles.items():
        watch.rss.setdefault(role, []).append((round(now, 1), round(rss / MB, 1)))


async def _traffic(op: Any, args: argparse.Namespace, outcome: Outcome) -> None:
    from tdask.exceptions import TdaskError

    rng = np.random.default_rng(args.seed)
    payloads = [rng.integers(-(2**62), 2**62, args.size, dtype=np.int64) for _ in range(64)]
    counter = iter(range(args.requests))

    async def lane() -> None:
        for i in counter:
            data = payloads[i % len(payloads)]
            began = time.perf_counter()
            try:
                response = await op.infer(inputs={"input": data}, request_id=f"soak-{i}", timeout=args.timeout_s)
            except TdaskError as exc:
                outcome.errors[type(exc).__name__] = outcome.errors.get(type(exc).__name__, 0) + 1
            except Exception as exc:  # noqa: BLE001 - counted: the soak's point is that there are none
                outcome.untyped.append(f"{i}: {type(exc).__name__}: {exc}"[:300])
            else:
                got = response.outputs.get("output")
                if got is not None and np.array_equal(got, data):
                    outcome.answers[i] = outcome.answers.get(i, 0) + 1
                    outcome.latencies_s.append(time.perf_counter() - began)
                else:
                    outcome.wrong.append(i)
            outcome.done += 1

    await asyncio.gather(*(lane() for _ in range(args.in_flight)))


async def _killer(cluster: _Cluster, args: argparse.Namespace, watch: Watch, began: float, stop: asyncio.Event) -> None:
    rng = random.Random(args.seed)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), args.kill_every_s)
            return
        except TimeoutError:
            pass
        await cluster.refresh()
        candidates: dict[str, list[tuple[str, psutil.Process]]] = {k: [] for k in args.kinds}
        for name, (worker, triton) in _tree(cluster, cluster.names).items():
            candidates.setdefault("worker", []).append((name, worker))
            for proc in triton:
                try:
                    kind = {"tritonserver": "tritonserver", "triton_python_backend_stub": "stub"}.get(proc.name(), "")
                    if not kind:
                        continue  # the server's reaper (a python process): not a Triton process
                    match = _PREFIX.search(" ".join(proc.cmdline()))
                    if match:
                        watch.prefixes.add(match.group(1))
                except psutil.Error:
                    continue
                watch.triton_pids.add(proc.pid)
                candidates.setdefault(kind, []).append((name, proc))
        kinds = [k for k in args.kinds if candidates.get(k)]
        if not kinds:
            continue
        kind = rng.choice(kinds)
        name, victim = rng.choice(candidates[kind])
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
        watch.kills.append({"t": round(time.monotonic() - began, 2), "kind": kind, "of": name, "pid": victim.pid})
        print(f"[soak] t={watch.kills[-1]['t']}s SIGKILL {kind} of {name} (pid {victim.pid})", file=sys.stderr)  # noqa: T201


async def _sampler(
    cluster: _Cluster, args: argparse.Namespace, watch: Watch, began: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        await cluster.refresh()
        _sample(cluster, watch, began)
        try:
            await asyncio.wait_for(stop.wait(), args.sample_every_s)
        except TimeoutError:
            pass


async def _progress(outcome: Outcome, args: argparse.Namespace, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 5)
        except TimeoutError:
            errors = sum(outcome.errors.values()) + len(outcome.untyped)
            print(f"[soak] {outcome.done}/{args.requests} done, {errors} errors", file=sys.stderr)  # noqa: T201


async def _leftovers(cluster: Any, watch: Watch, expected_workers: int) -> dict[str, Any]:
    """Once every worker is back and registered: stores, shared memory and Triton processes left."""
    from tdask.host import PLUGIN_NAME

    client = cluster.client
    deadline = time.monotonic() + 180
    while True:
        state = await client.scheduler.tdask_operators()
        if sum(len(h) for h in state["hosts"].values()) >= expected_workers:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers did not all come back: {state['hosts']}")
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)  # releases of the last answers
    stores = await client.run(lambda dask_worker: dask_worker.handlers["tdask_store_stats"]())

    def live_prefix(dask_worker: Any) -> str | None:
        triton = dask_worker.plugins[PLUGIN_NAME]._triton
        return triton.shm_region_prefix if triton is not None else None

    live = {p for p in (await client.run(live_prefix)).values() if p}
    await cluster.refresh()
    current = {p.pid for _, (_, triton) in _tree(cluster, cluster.names).items() for p in triton}

    def left() -> tuple[list[str], list[str]]:
        regions = [
            r.name
            for prefix in watch.prefixes - live
            for r in Path("/dev/shm").glob(f"{prefix}*")  # noqa: S108 - the python backend's regions
        ]
        orphans = []
        for pid in watch.triton_pids - current:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    orphans.append(f"{pid} {proc.name()} (parent {proc.ppid()})")
            except psutil.Error:
                continue
        return regions, orphans

    deadline = time.monotonic() + 20  # a reaper still at work gets a moment
    regions, orphans = left()
    while (regions or orphans) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        regions, orphans = left()
    return {
        "store_tensors": sum(s["tensors"] for s in stores.values()),
        "store_bytes": sum(s["bytes"] for s in stores.values()),
        "shm_regions_left": regions,
        "triton_processes_left": orphans,
        "servers_seen": len(watch.prefixes),
        "triton_processes_seen": len(watch.triton_pids),
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    import dask.config

    from bench.tdask_side import deployment
    from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators
    from tdask.remote import RemoteOperator

    operators = hello_world_operators(
        encoders=TritonGroup(workers=args.workers, max_inflight=4, instances=1, kind="CPU"),
        decoders=TritonGroup(workers=args.workers, max_inflight=4, instances=1, kind="CPU"),
        encoder_decoders=PythonGroup(workers=args.workers, max_inflight=16),
    )
    out: dict[str, Any] = {
        "bench": "tdask-soak",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "versions": versions(),
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items()},
    }
    outcome, watch = Outcome(), Watch()
    with tempfile.TemporaryDirectory(prefix="tdask-soak-logs-") as tmp:
        log_dir = Path(args.log_dir or tmp).resolve()
        with dask.config.set({"tdask.request.plane": args.plane, "tdask.triton.mode": args.triton_mode}):
            async with deployment(operators, scheduler="embedded", log_dir=log_dir) as cluster:
                view = _Cluster(cluster.client)
                op = RemoteOperator("encoder_decoder", client=cluster.client)
                await op.infer(inputs={"input": np.arange(args.size, dtype=np.int64)})  # warm
                stop = asyncio.Event()
                began = time.monotonic()
                helpers = [
                    asyncio.create_task(_killer(view, args, watch, began, stop)),
                    asyncio.create_task(_sampler(view, args, watch, began, stop)),
                    asyncio.create_task(_progress(outcome, args, stop)),
                ]
                await _traffic(op, args, outcome)
                elapsed = time.monotonic() - began
                stop.set()
                await asyncio.gather(*helpers)
                out["leftovers"] = await _leftovers(view, watch, expected_workers=3 * args.workers)
                _sample(view, watch, began)
    answered = sum(1 for n in outcome.answers.values() if n)
    errors = sum(outcome.errors.values())
    lat = np.asarray(outcome.latencies_s or [0.0]) * 1e3
    out["requests"] = {
        "requests": args.requests,
        "answered_right": answered,
        "wrong": len(outcome.wrong),
        "lost": args.requests - answered - len(outcome.wrong) - errors - len(outcome.untyped),
        "duplicated": sum(n - 1 for n in outcome.answers.values() if n > 1),
        "typed_errors": dict(sorted(outcome.errors.items())),
        "untyped_errors": len(outcome.untyped),
        "first_untyped": outcome.untyped[:3],
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 1),
        "elapsed_s": round(elapsed, 1),
        "req_per_s": round(answered / elapsed, 1) if elapsed > 0 else 0.0,
    }
    out["kills"] = watch.kills
    out["rss_mb"] = watch.rss
    return out


def _at(series: list[tuple[float, float]], fraction: float) -> float:
    return series[min(len(series) - 1, int(round(fraction * (len(series) - 1))))][1]


def render(out: dict[str, Any]) -> str:
    r, left = out["requests"], out["leftovers"]
    kills: dict[str, int] = {}
    for kill in out["kills"]:
        kills[kill["kind"]] = kills.get(kill["kind"], 0) + 1
    typed = ", ".join(f"{k} {v}" for k, v in r["typed_errors"].items()) or "none"
    parts = [
        table(
            "soak: requests",
            [
                "requests",
                "answered right",
                "wrong",
                "lost",
                "duplicated",
                "typed errors",
                "untyped",
                "p50 ms",
                "p99 ms",
                "max ms",
                "req/s",
                "s",
            ],
            [
                [
                    r["requests"],
                    r["answered_right"],
                    r["wrong"],
                    r["lost"],
                    r["duplicated"],
                    typed,
                    r["untyped_errors"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["max_ms"],
                    r["req_per_s"],
                    r["elapsed_s"],
                ]
            ],
            note="kills: "
            + (", ".join(f"{k} {v}" for k, v in sorted(kills.items())) or "none")
            + f" (every {out['config']['kill_every']}, {out['config']['plane']} plane)",
        ),
        table(
            "soak: RSS per process over time (MB; at 0, 25, 50, 75, 100% of the run, and the most)",
            ["process", "samples", "0%", "25%", "50%", "75%", "100%", "max"],
            [
                [role, len(s), _at(s, 0), _at(s, 0.25), _at(s, 0.5), _at(s, 0.75), _at(s, 1), max(v for _, v in s)]
                for role, s in sorted(out["rss_mb"].items())
            ],
            note="A worker's row follows its name across restarts (each restart is a fresh process).",
        ),
        table(
            "soak: left at the end (every worker back)",
            [
                "store tensors",
                "store bytes",
                "shm regions left",
                "Triton processes left",
                "servers seen",
                "Triton processes seen",
            ],
            [
                [
                    left["store_tensors"],
                    left["store_bytes"],
                    len(left["shm_regions_left"]),
                    len(left["triton_processes_left"]),
                    left["servers_seen"],
                    left["triton_processes_seen"],
                ]
            ],
        ),
    ]
    return "\n\n".join(parts)


def failed(out: dict[str, Any]) -> bool:
    r, left = out["requests"], out["leftovers"]
    return bool(
        r["wrong"]
        or r["lost"]
        or r["duplicated"]
        or r["untyped_errors"]
        or left["store_tensors"]
        or left["shm_regions_left"]
        or left["triton_processes_left"]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    logging.basicConfig(level=logging.ERROR)
    for name in ("tdask", "distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import dask.config

    dask.config.set({"logging.distributed": "error", "logging.tdask": "error"})
    out = asyncio.run(amain(args))
    print(render(out))  # noqa: T201
    print(json.dumps(out, default=str))  # noqa: T201
    return 1 if failed(out) else 0


if __name__ == "__main__":
    sys.exit(main())
