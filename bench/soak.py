"""``python -m bench.soak``: hello-world traffic while workers, Triton servers and stubs are SIGKILLed.

    python -m bench.soak --requests 20000 --kill-every 3s

Deploys the hello world (2 encoder, 2 decoder and 2 encoder_decoder workers by default, the
scheduler embedded in this process as in ``python -m tdask.hello_world``; with ``--colocate``,
2 workers each hosting all three, the orchestrator's calls in process), keeps ``--in-flight``
requests of random int64 arrays in flight, checks every answer, and every ``--kill-every``
SIGKILLs one process picked at random: a worker, a worker's ``tritonserver`` (``--triton-mode
subprocess`` only: in process, Triton is the worker itself), or one of its python-backend stubs.
Prints a table per section and one JSON line (as ``python -m bench``):

- what happened to the requests: answered right, wrong, lost, duplicated, and the errors by
  type (every one a typed tdask error, or counted as untyped), p50 and p99. Each request has an
  id (``soak-<i>``), counted where losses and duplicates can happen: the client counts every
  response its request plane receives per id, answers that reach it when nobody waits for them
  any more included (``duplicated``: an id with more than one; ``lost``: an id with neither an
  answer nor an error); ``encoder_decoder`` (:class:`bench.operators.RecordingEncoderDecoder`)
  appends each execution it starts and each it answers to a file per worker process, which
  outlives a SIGKILLed worker (``over-executed``: an id started more than 1 +
  ``tdask.request.max-retries`` times; ``re-executed``: one answered twice by workers that
  were not killed; ``never executed``: one answered without an execution on record);
- RSS per process over time (this process, each worker, each worker's Triton), sampled every
  ``--sample-every``, and its growth from 25% of the run to the end;
- what is left at the end, once every worker is back: tensors in the stores, shared-memory
  regions of servers that are gone, and Triton processes that outlived their worker.

The exit status is 1 when anything was lost, wrong, duplicated, over- or re-executed, untyped or
left behind, or an RSS row grew more than ``--max-rss-growth-mb``.
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
from collections import Counter
from dataclasses import dataclass, field, replace
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
    p.add_argument(
        "--colocate",
        action="store_true",
        help="decoder and encoder_decoder on the encoder's workers (Deployment colocate): --workers workers in all, "
        "each hosting the whole pipeline, its nested calls in process",
    )
    p.add_argument("--timeout", default="120s", help="deadline of each request")
    p.add_argument("--sample-every", default="2s", help="how often RSS is sampled")
    p.add_argument("--plane", choices=("direct", "queue"), default="direct", help="tdask.request.plane")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=32.0,
        help="fail when an RSS row grows more than this from 25%% of the run to its end",
    )
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
    responses: Counter[str] = field(default_factory=Counter)  # request id -> responses received
    orphans: Counter[str] = field(default_factory=Counter)  # request id -> replies nobody waited for
    failed: dict[int, str] = field(default_factory=dict)  # request -> its error
    wrong: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # typed tdask errors by type
    untyped: list[str] = field(default_factory=list)  # anything else
    latencies_s: list[float] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered), time.monotonic()
    done: int = 0


@dataclass
class Watch:
    """What the soak saw of its processes."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # role -> [(t, MB)]
    triton_pids: set[int] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    # role -> the pids behind its row when first sampled; rows whose processes changed during
    # the run (killed and restarted) have no growth figure to judge: it would compare two processes.
    identity: dict[str, frozenset[int]] = field(default_factory=dict)
    restarted: set[str] = field(default_factory=set)


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
    pids: dict[str, frozenset[int]] = {}
    for name, (worker, triton) in _tree(cluster, cluster.names).items():
        try:
            roles[f"worker {name}"] = worker.memory_info().rss
        except psutil.Error:
            continue
        pids[f"worker {name}"] = frozenset([worker.pid])
        pids[f"triton of {name} (server, stubs, reaper)"] = frozenset(p.pid for p in triton)
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
        if role in pids and watch.identity.setdefault(role, pids[role]) != pids[role]:
            watch.restarted.add(role)  # its growth compares two different processes


def _growth(watch: Watch) -> dict[str, float | None]:
    """RSS growth per row from 25% of the run to its end; None for rows whose processes restarted."""
    return {
        role: None if role in watch.restarted else round(_at(s, 1) - _at(s, 0.25), 1) for role, s in watch.rss.items()
    }


async def _traffic(op: Any, args: argparse.Namespace, outcome: Outcome) -> None:
    from tdask.exceptions import TdaskError

    rng = np.random.default_rng(args.seed)
    payloads = [rng.integers(-(2**62), 2**62, args.size, dtype=np.int64) for _ in range(64)]
    counter = iter(range(args.requests))

    async def infer(request_id: str, data: np.ndarray) -> Any:
        """``op.infer``, counting every response received (``RemoteOperator.stream``)."""
        best = None
        async with op.stream(inputs={"input": data}, request_id=request_id, timeout=args.timeout_s) as call:
            async for response in call:
                outcome.responses[request_id] += 1
                if response.outputs or best is None or not response.final:
                    best = response
        return best

    async def lane() -> None:
        for i in counter:
            data = payloads[i % len(payloads)]
            began = time.perf_counter()
            sent = time.monotonic()
            try:
                response = await infer(f"soak-{i}", data)
            except TdaskError as exc:
                outcome.errors[type(exc).__name__] = outcome.errors.get(type(exc).__name__, 0) + 1
                outcome.failed[i] = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - counted: the soak's point is that there are none
                outcome.untyped.append(f"{i}: {type(exc).__name__}: {exc}"[:300])
                outcome.failed[i] = type(exc).__name__
            else:
                got = response.outputs.get("output")
                if got is not None and np.array_equal(got, data):
                    outcome.answers[i] = outcome.answers.get(i, 0) + 1
                    outcome.latencies_s.append(time.perf_counter() - began)
                else:
                    outcome.wrong.append(i)
            outcome.spans.append((sent, time.monotonic()))
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

    hello = hello_world_operators(
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
        records = Path(tmp) / "executions"  # one file per encoder_decoder process
        records.mkdir()
        operators = [
            (
                replace(
                    config,
                    implementation="bench.operators:RecordingEncoderDecoder",
                    repository=None,
                    parameters={**config.parameters, "record_dir": str(records)},
                )
                if config.name == "encoder_decoder"
                else config,
                n,
            )
            for config, n in hello
        ]
        colocate = {"decoder": "encoder", "encoder_decoder": "encoder"} if args.colocate else None
        if colocate is not None:  # a guest takes its host's workers, no count of its own
            operators = [(config, 1 if config.name in colocate else n) for config, n in operators]
        with dask.config.set({"tdask.request.plane": args.plane, "tdask.triton.mode": args.triton_mode}):
            max_retries = int(dask.config.get("tdask.request.max-retries"))
            async with deployment(operators, scheduler="embedded", log_dir=log_dir, colocate=colocate) as cluster:
                view = _Cluster(cluster.client)
                _count_orphans(cluster.client, outcome)
                op = RemoteOperator("encoder_decoder", client=cluster.client)
                await op.infer(inputs={"input": np.arange(args.size, dtype=np.int64)}, request_id="warm")
                stop = asyncio.Event()
                began = time.monotonic()
                helpers = [
                    asyncio.create_task(_killer(view, args, watch, began, stop)),
                    asyncio.create_task(_sampler(view, args, watch, began, stop)),
                    asyncio.create_task(_progress(outcome, args, stop)),
                ]
                await _traffic(op, args, outcome)
                outcome.spans = [(a - began, b - began) for a, b in outcome.spans]
                elapsed = time.monotonic() - began
                stop.set()
                await asyncio.gather(*helpers)
                expected = args.workers if colocate is not None else 3 * args.workers
                out["leftovers"] = await _leftovers(view, watch, expected_workers=expected)
                _sample(view, watch, began)
        killed = {k["pid"] for k in watch.kills if k["kind"] == "worker"}
        out["executions"] = _executions(records, args.requests, outcome, killed, max_retries)
    answered = sum(1 for n in outcome.answers.values() if n)
    lat = np.asarray(outcome.latencies_s or [0.0]) * 1e3
    received = [outcome.responses[f"soak-{i}"] + outcome.orphans[f"soak-{i}"] for i in range(args.requests)]
    out["requests"] = {
        "requests": args.requests,
        "answered_right": answered,
        "wrong": len(outcome.wrong),
        # Per id, as received: neither an answer nor an error; more than one response.
        "lost": sum(1 for i, n in enumerate(received) if n == 0 and i not in outcome.failed),
        "duplicated": sum(1 for n in received if n > 1),
        "answers_per_id": {str(k): v for k, v in sorted(Counter(received).items())},
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
    out["after_kill"] = _after_kills(watch.kills, outcome.spans)
    out["rss_mb"] = watch.rss
    out["rss_growth_mb"] = _growth(watch)
    return out


def _after_kills(kills: list[dict[str, Any]], spans: list[tuple[float, float]]) -> dict[str, Any]:
    """Per kind of kill: from each kill to the last answer of the requests in flight at it.

    The affected requests (those the killed process held) are among them, so the figure bounds
    how long a kill cost its requests: detection, re-sending, and waiting for a host when every
    host of an operator was down at once.
    """
    by_kind: dict[str, list[float]] = {}
    for kill in kills:
        t = kill["t"]
        waits = [end - t for start, end in spans if start < t < end]
        if waits:
            by_kind.setdefault(kill["kind"], []).append(max(waits))
    return {
        kind: {
            "kills": len(w),
            "p50_ms": round(float(np.percentile(w, 50)) * 1e3, 1),
            "max_ms": round(max(w) * 1e3, 1),
            "over_3s": sum(1 for x in w if x > 3.0),
        }
        for kind, w in sorted(by_kind.items())
    }


def _count_orphans(client: Any, outcome: Outcome) -> None:
    """Count replies that reach the client's request plane when nobody waits for them (a second
    answer to a request already answered goes there, never to its caller)."""
    from tdask.remote import _ClientEndpoint

    plane = _ClientEndpoint.of(client).plane
    previous = plane.on_orphan

    def orphan(reply: dict[str, Any]) -> None:
        outcome.orphans[reply["id"]] += 1
        if previous is not None:
            previous(reply)

    plane.on_orphan = orphan


def _executions(directory: Path, requests: int, outcome: Outcome, killed: set[int], max_retries: int) -> dict[str, Any]:
    """What ``encoder_decoder`` recorded (:class:`bench.operators.RecordingEncoderDecoder`), per id."""
    starts: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    live_ends: Counter[str] = Counter()  # answered by a process the soak did not kill
    for path in directory.glob("*.log"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            kind, request_id, _ = line.split(" ", 2)
            if kind == "S":
                starts[request_id] += 1
            else:
                ends[request_id] += 1
                if pid not in killed:
                    live_ends[request_id] += 1
    ids = [f"soak-{i}" for i in range(requests)]
    over = [i for i in ids if starts[i] > 1 + max_retries]
    again = [i for i in ids if live_ends[i] > 1]
    never = [f"soak-{i}" for i in outcome.answers if ends[f"soak-{i}"] == 0]
    return {
        "max_retries": max_retries,
        "executions_per_id": {str(k): v for k, v in sorted(Counter(starts[i] for i in ids).items())},
        "answered_executions_per_id": {str(k): v for k, v in sorted(Counter(ends[i] for i in ids).items())},
        "over_executed": len(over),
        "re_executed": len(again),
        "never_executed": len(never),
        "examples": (over + again + never)[:5],
        "processes": len(list(directory.glob("*.log"))),
        "killed_processes": len(killed),
    }


def _at(series: list[tuple[float, float]], fraction: float) -> float:
    return series[min(len(series) - 1, int(round(fraction * (len(series) - 1))))][1]


def render(out: dict[str, Any]) -> str:
    r, left, ex = out["requests"], out["leftovers"], out["executions"]
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
            + f" (every {out['config']['kill_every']}, {out['config']['plane']} plane); lost and duplicated "
            + "are counted per request id from every response the client received: answers per id "
            + ", ".join(f"{k}: {v}" for k, v in r["answers_per_id"].items()),
        ),
        table(
            "soak: from each kill to the last answer of the requests in flight at it",
            ["kill", "kills", "p50 ms", "max ms", "over 3 s"],
            [[k, a["kills"], a["p50_ms"], a["max_ms"], a["over_3s"]] for k, a in out.get("after_kill", {}).items()],
            note="the requests the killed process held are among those in flight: this bounds what a kill cost "
            "them (detection, re-sending, and waiting for a host when every host of an operator was down at once)",
        ),
        table(
            "soak: executions of encoder_decoder per request id (recorded by its workers)",
            ["started 1", "started 2", "started 3+", "answered 0", "answered 1", "answered 2+", "over", "re", "never"],
            [
                [
                    ex["executions_per_id"].get("1", 0),
                    ex["executions_per_id"].get("2", 0),
                    sum(v for k, v in ex["executions_per_id"].items() if int(k) >= 3),
                    ex["answered_executions_per_id"].get("0", 0),
                    ex["answered_executions_per_id"].get("1", 0),
                    sum(v for k, v in ex["answered_executions_per_id"].items() if int(k) >= 2),
                    ex["over_executed"],
                    ex["re_executed"],
                    ex["never_executed"],
                ]
            ],
            note=f"over: started more than 1 + max-retries ({ex['max_retries']}) times; re: answered twice by "
            f"workers that were not killed; never: answered with no execution on record. "
            f"{ex['processes']} encoder_decoder processes, {ex['killed_processes']} killed"
            + (f"; e.g. {', '.join(ex['examples'])}" if ex["examples"] else ""),
        ),
        table(
            "soak: RSS per process over time (MB; at 0, 25, 50, 75, 100% of the run, and the most)",
            ["process", "samples", "0%", "25%", "50%", "75%", "100%", "max", "growth"],
            [
                [
                    role,
                    len(s),
                    _at(s, 0),
                    _at(s, 0.25),
                    _at(s, 0.5),
                    _at(s, 0.75),
                    _at(s, 1),
                    max(v for _, v in s),
                    "restarted" if out["rss_growth_mb"][role] is None else out["rss_growth_mb"][role],
                ]
                for role, s in sorted(out["rss_mb"].items())
            ],
            note="A worker's row follows its name across restarts (each restart is a fresh process). "
            f"growth: 100% less 25%, at most {out['config']['max_rss_growth_mb']:g} MB, judged on rows whose "
            "processes lived through the run (restarted: they were killed and replaced).",
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
    r, left, ex = out["requests"], out["leftovers"], out["executions"]
    return bool(
        r["wrong"]
        or r["lost"]
        or r["duplicated"]
        or ex["over_executed"]
        or ex["re_executed"]
        or ex["never_executed"]
        or max((g for g in out["rss_growth_mb"].values() if g is not None), default=0)
        > out["config"]["max_rss_growth_mb"]
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
