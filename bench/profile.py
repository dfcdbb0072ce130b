"""``--profile DIR``: where the tdask pipeline spends its CPU, per process and per function.

Extra closed-loop runs of the pipeline (not the timed ones), one per concurrency, under two
profilers (``--profiler``):

- ``cprofile`` (default): ``cProfile`` with a **per-thread CPU clock** (``time.thread_time``)
  switched on inside the event-loop thread of every worker, of the scheduler and of the client
  (through ``client.run`` / ``run_on_scheduler``). It attributes CPU time, not wall time, so
  time a process spends waiting for a core (2 cores, ~9 busy processes) is not blamed on
  whatever function it was preempted in. Call counts per request come with it. cProfile's own
  overhead inflates functions called very often; compare within a process, not absolute
  numbers with the unprofiled runs. ``.prof`` files land in ``DIR/c<n>/`` (``python -m pstats``,
  snakeviz).
- ``pyspy``: ``py-spy record --nonblocking --format raw`` on every Python process (collapsed
  stacks in ``DIR/c<n>/*.txt`` for speedscope / flamegraph.pl). Wall-clock sampling: on an
  oversubscribed machine it also counts time spent runnable-but-preempted.

Triton's server processes are C++; their CPU appears in the per-process CPU meter only.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, closed_loop, table

RATE_HZ = 200
TOP = 15

# Self time (cProfile) and innermost frames (py-spy) are put into coarse buckets by the first
# pattern that matches the function's description "name (file:line)".
BUCKETS: list[tuple[str, re.Pattern[str]]] = [
    ("socket syscalls (send/recv)", re.compile(r"of '_socket\.socket'|write_to_fd|read_from_fd|socket\.py")),
    ("epoll / selector", re.compile(r"selectors\.py|of 'select\.epoll'")),
    ("msgpack / pickle / dask serialization", re.compile(r"msgpack|pickle|distributed/protocol/|serialize|_pickle")),
    ("tornado iostream + distributed comm", re.compile(r"tornado/iostream|distributed/comm/")),
    ("distributed rpc core / metrics", re.compile(r"distributed/core\.py|distributed/metrics\.py|distributed/utils")),
    ("grpc / tritonclient", re.compile(r"grpc|tritonclient")),
    ("tdask", re.compile(r"/tdask/|tdask\.")),
    ("numpy", re.compile(r"numpy")),
    ("asyncio / tornado loop", re.compile(r"asyncio/|tornado/|'_asyncio|of '_contextvars")),
]


def _bucket(description: str) -> str:
    for name, pattern in BUCKETS:
        if pattern.search(description):
            return name
    return "other"


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else path


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


# -- cProfile inside the processes ----------------------------------------------------------------

_PROFILER: dict[str, cProfile.Profile] = {}


async def _cprofile_start(dask_worker: Any = None, dask_scheduler: Any = None) -> int:
    """Runs on the target's event loop: profile that thread's CPU time from now on."""
    profiler = cProfile.Profile(time.thread_time)
    _PROFILER["current"] = profiler
    profiler.enable()
    return os.getpid()


async def _cprofile_stop(
    path: str, requests: int, dask_worker: Any = None, dask_scheduler: Any = None
) -> dict[str, Any]:
    profiler = _PROFILER.pop("current")
    profiler.disable()
    profiler.dump_stats(path)
    return summarize_pstats(pstats.Stats(profiler), requests)


def summarize_pstats(stats: pstats.Stats, requests: int) -> dict[str, Any]:
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        desc = f"{func} ({_short(filename)}:{line})" if filename != "~" else func
        rows.append((desc, ncalls, tottime, cumtime))
    total = sum(r[2] for r in rows)
    per = 1e3 / max(requests, 1)
    buckets: Counter[str] = Counter()
    for desc, _, tottime, _ in rows:
        buckets[_bucket(desc)] += tottime
    return {
        "thread_cpu_ms_per_request": round(total * per, 3),
        "buckets_pct": {k: round(100 * v / total, 1) for k, v in buckets.most_common()} if total else {},
        "top_self": [
            {
                "fn": d,
                "calls_per_req": round(n / max(requests, 1), 2),
                "self_ms_per_req": round(t * per, 4),
                "self_pct": round(100 * t / total, 1),
            }
            for d, n, t, _ in sorted(rows, key=lambda r: -r[2])[:TOP]
        ],
        "top_cumulative": [
            {
                "fn": d,
                "calls_per_req": round(n / max(requests, 1), 2),
                "cum_ms_per_req": round(c * per, 4),
                "cum_pct": round(100 * c / total, 1),
            }
            for d, n, _, c in sorted(rows, key=lambda r: -r[3])
            if not re.search(
                r"runners\.py|base_events\.py|events\.py|<module>|spawn\.py|process\.py|nanny\.py|"
                r"compatibility\.py|threading\.py|utils\.py:\d+\(run_loop|wrapper",
                d,
            )
        ][: TOP * 2],
    }


async def _cprofile_run(out_dir: Path, cluster: Any, call: Any, requests: int, conc: int) -> dict[str, Any]:
    client = cluster.client
    out_dir.mkdir(parents=True, exist_ok=True)
    await client.run(_cprofile_start)
    embedded = cluster.scheduler_pid == os.getpid()
    await client.run_on_scheduler(_cprofile_start)
    local = cProfile.Profile(time.thread_time)
    meter = CpuMeter(cluster.process_groups())
    meter.start()
    local.enable()
    result = await closed_loop(call, requests=requests, concurrency=conc)
    local.disable()
    cpu = meter.stop()
    n = max(result.ok, 1)
    by_address = {a: name for name, a in cluster.worker_addresses.items()}
    threads: dict[str, Any] = {}
    sched = await client.run_on_scheduler(_cprofile_stop, path=str(out_dir / "scheduler.prof"), requests=n)
    threads["scheduler (event-loop thread)"] = sched
    workers = {}
    for address, name in by_address.items():
        workers[address] = await client.run(
            _cprofile_stop, path=str(out_dir / f"{_safe(name)}.prof"), requests=n, workers=[address]
        )
    for address, reply in workers.items():
        threads[f"worker {by_address[address]} (event-loop thread)"] = reply[address]
    local.dump_stats(str(out_dir / "client.prof"))
    threads["client (bench main thread)"] = summarize_pstats(pstats.Stats(local), n)
    return {
        "profiler": "cprofile",
        "concurrency": conc,
        "scheduler_embedded": embedded,
        **_run_figures(result, cpu, n),
        "threads": threads,
    }


def _run_figures(result: Any, cpu: dict[str, float], n: int) -> dict[str, Any]:
    """What every profiled run reports: its speed under the profiler and CPU per request."""
    summary = result.summary()
    return {
        "req_per_s_under_profiler": summary["req_per_s"],
        "p50_ms_under_profiler": summary["p50_ms"],
        "errors": summary["errors"],
        "process_cpu_ms_per_request": {k: round(v * 1e3 / n, 3) for k, v in cpu.items()},
        "process_cpu_total_ms_per_request": round(sum(cpu.values()) * 1e3 / n, 3),
    }


# -- py-spy from outside --------------------------------------------------------------------------

# py-spy's idle detection misses some blocking waits here; samples whose innermost frame is one of
# these are a thread waiting (epoll, a lock, a queue, a pipe, a child process), not working.
IDLE_LEAF = re.compile(
    r"^(\S*select|Condition\.wait|Event\.wait|_worker|Popen\.poll|Popen\.wait|Connection\._recv\S*|"
    r"Thread\._wait_for_tstate_lock|_watch|sleep|Queue\.get|SimpleQueue\.get) "
    r"\((selectors\.py|threading\.py|futures/thread\.py|multiprocessing/\S+|distributed/profile\.py|queue\.py|"
    r"asyncio/\S+|time)"
)


def _pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise FileNotFoundError("py-spy not found; install it: pip install py-spy")
    return found


async def _pyspy_run(out_dir: Path, cluster: Any, call: Any, requests: int, conc: int) -> dict[str, Any]:
    pyspy = _pyspy()
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = cluster.process_groups()
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for label, pids in groups.items():
        if label.startswith("tritonserver"):
            continue
        path = out_dir / f"{_safe(label)}.txt"
        with open(out_dir / f"{_safe(label)}.pyspy.log", "wb") as err:
            procs[label] = (
                subprocess.Popen(
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(pids[0]),
                        "--rate",
                        str(RATE_HZ),
                        "--nonblocking",
                        "--format",
                        "raw",
                        "--output",
                        str(path),
                    ],
                    stdout=err,
                    stderr=subprocess.STDOUT,
                ),
                path,
            )
    await asyncio.sleep(1.0)  # py-spy attaches
    meter = CpuMeter(groups)
    meter.start()
    result = await closed_loop(call, requests=requests, concurrency=conc)
    cpu = meter.stop()
    for proc, _ in procs.values():
        proc.send_signal(signal.SIGINT)
    for proc, _ in procs.values():
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
    n = max(result.ok, 1)
    return {
        "profiler": "pyspy",
        "concurrency": conc,
        "rate_hz": RATE_HZ,
        **_run_figures(result, cpu, n),
        "processes": {label: summarize_raw(path, n) for label, (_, path) in procs.items()},
    }


def _frame_key(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (dir/file.py)``."""
    m = re.match(r"(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({_short(m.group(2))})"


def summarize_raw(path: Path, requests: int) -> dict[str, Any]:
    """Self and inclusive sample shares per function of a py-spy raw (collapsed) file."""
    if not path.exists():
        return {"error": "no profile written (py-spy failed; see the .pyspy.log next to it)"}
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        keys = [_frame_key(f) for f in stack.split(";") if f]
        if not keys:
            continue
        if IDLE_LEAF.match(keys[-1]):
            idle += count
            continue
        total += count
        self_counts[keys[-1]] += count
        for key in set(keys):
            incl_counts[key] += count
        buckets[_bucket(keys[-1])] += count
    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "active_ms_per_request": round(total * 1e3 / RATE_HZ / max(requests, 1), 3),
        "buckets_pct": {k: round(100 * v / total, 1) for k, v in buckets.most_common()} if total else {},
        "top_self_pct": [[k, round(100 * v / total, 1)] for k, v in self_counts.most_common(TOP)] if total else [],
        "top_inclusive_pct": [[k, round(100 * v / total, 1)] for k, v in incl_counts.most_common(TOP * 2)]
        if total
        else [],
    }


# -- driver and rendering -------------------------------------------------------------------------


async def profile_run(
    out_dir: Path,
    cluster: Any,
    call: Any,
    *,
    requests: int,
    concurrencies: list[int],
    warmup: int,
    profilers: list[str],
) -> dict[str, Any]:
    results: dict[str, Any] = {"dir": str(out_dir.resolve()), "requests": requests, "runs": []}
    for profiler in profilers:
        for conc in concurrencies:
            await closed_loop(call, requests=warmup, concurrency=conc)
            run_dir = out_dir / profiler / f"c{conc}"
            if profiler == "cprofile":
                results["runs"].append(await _cprofile_run(run_dir, cluster, call, requests, conc))
            elif profiler == "pyspy":
                results["runs"].append(await _pyspy_run(run_dir, cluster, call, requests, conc))
            else:
                raise ValueError(f"unknown profiler {profiler!r}")
            print(f"[profile] {profiler} @{conc} done", file=sys.stderr, flush=True)  # noqa: T201
    return results


def render_profile(profile: dict[str, Any]) -> str:
    parts = [f"profile: {profile['requests']} requests per run; files in {profile['dir']}"]
    for run in profile["runs"]:
        rows = [[label, ms] for label, ms in run["process_cpu_ms_per_request"].items()]
        rows.append(["TOTAL", run["process_cpu_total_ms_per_request"]])
        parts.append(
            table(
                f"profile ({run['profiler']}) @{run['concurrency']} in flight: "
                f"{run['req_per_s_under_profiler']} req/s, "
                f"p50 {run['p50_ms_under_profiler']} ms under the profiler; process CPU ms per request",
                ["process", "cpu ms/req"],
                rows,
            )
        )
        if run["profiler"] == "cprofile":
            for label, s in run["threads"].items():
                lines = [f"-- {label}: {s['thread_cpu_ms_per_request']} ms thread CPU per request (profiled)"]
                lines.append("   self time by kind: " + ", ".join(f"{k} {v}%" for k, v in s["buckets_pct"].items()))
                lines.append(
                    "   top self: "
                    + "; ".join(f"{r['fn']} {r['self_pct']}% ({r['calls_per_req']}/req)" for r in s["top_self"][:8])
                )
                lines.append(
                    "   top cumulative: "
                    + "; ".join(
                        f"{r['fn']} {r['cum_pct']}% ({r['calls_per_req']}/req)" for r in s["top_cumulative"][:10]
                    )
                )
                parts.append("\n".join(lines))
        else:
            for label, s in run["processes"].items():
                if "error" in s:
                    parts.append(f"-- {label}: {s['error']}")
                    continue
                lines = [
                    f"-- {label}: {s['samples']} samples, {s['active_ms_per_request']} ms sampled-active per request"
                ]
                kinds = ", ".join(f"{k} {v}%" for k, v in s["buckets_pct"].items())
                lines.append(f"   innermost frame by kind: {kinds}")
                lines.append("   top self: " + "; ".join(f"{k} {v}%" for k, v in s["top_self_pct"][:8]))
                parts.append("\n".join(lines))
    return "\n".join(parts)


if __name__ == "__main__":  # python -m bench.profile FILE.prof|FILE.txt [REQUESTS]: summarize a saved profile
    import json

    target = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    summary = summarize_pstats(pstats.Stats(str(target)), n) if target.suffix == ".prof" else summarize_raw(target, n)
    print(json.dumps(summary, indent=1))  # noqa: T201
