"""Many clients: ``--clients`` client processes against one deployment (``python -m bench --only clients``).

The hello world with ``--clients-workers`` workers per operator (encoder, decoder and
encoder_decoder); each client is a process of its own (``python -m bench.clients`` in child
mode) with its own Dask client and ``--clients-inflight`` requests in flight, started together.
The table gives the aggregate throughput, the latency over every request of every client, and
the CPU of each process group per request, the scheduler's above all: on the direct plane the
scheduler only answers "who hosts this operator" once per caller, so its CPU per request should
be near zero; on the queue plane (``DASK_TDASK__REQUEST__PLANE=queue``) every request passes
through it. Both planes run, each on a fresh deployment.

In the embedded placement the scheduler lives in the benchmark process, which does nothing else
while the clients run (the clients are other processes): its CPU is the scheduler's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CpuMeter, closed_loop, payloads

PLANES = ("direct", "queue")


async def clients(args: argparse.Namespace, log_dir: Path, out: dict[str, Any]) -> None:
    """Run the section: one fresh deployment per request plane, ``args.clients`` processes each."""
    import dask.config

    from bench.run import _progress, hello_world
    from bench.tdask_side import deployment

    section: dict[str, Any] = {"runs": []}
    out["sections"]["clients"] = section
    n = args.clients_workers
    for plane in PLANES:
        with dask.config.set({"tdask.request.plane": plane}):
            ops = hello_world(n, n, args.max_inflight)
            ops = [(config, n) if not isinstance(config, tuple) else (config[0], n) for config in ops]
            async with deployment(
                ops, scheduler=args.scheduler, log_dir=log_dir / f"clients-{plane}", protocol=args.protocol
            ) as cluster:
                row = await _run_clients(args, cluster, plane)
        section["runs"].append(row)
        _progress("clients", row)


async def _run_clients(args: argparse.Namespace, cluster: Any, plane: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tdask-bench-clients-") as tmp:
        go = Path(tmp) / "go"
        env = {**os.environ, "DASK_TDASK__REQUEST__PLANE": plane}
        procs = []
        for i in range(args.clients):
            result = Path(tmp) / f"client{i}.json"
            command = [
                sys.executable,
                "-m",
                "bench.clients",
                "--scheduler-address",
                cluster.scheduler_address,
                "--requests",
                str(args.clients_requests),
                "--inflight",
                str(args.clients_inflight),
                "--size",
                str(args.clients_size),
                "--warmup",
                str(args.warmup),
                "--seed",
                str(i),
                "--go",
                str(go),
                "--result",
                str(result),
            ]
            procs.append((subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL), result))
        try:
            ready = [Path(str(r) + ".ready") for _, r in procs]
            deadline = time.monotonic() + 120
            while not all(p.exists() for p in ready):
                if any(proc.poll() is not None for proc, _ in procs) or time.monotonic() > deadline:
                    raise RuntimeError("a client process died or never got ready")
                await asyncio.sleep(0.05)
            groups = cluster.process_groups()
            groups["clients"] = [proc.pid for proc, _ in procs]
            # The same groups idle (clients connected, warm, waiting): what they cost with no load.
            idle = CpuMeter(groups)
            idle.start()
            idle_began = time.monotonic()
            await asyncio.sleep(args.clients_idle_s)
            idle_cpu, idle_s = idle.stop(), time.monotonic() - idle_began
            meter = CpuMeter(groups)
            meter.start()
            go.touch()
            for proc, _ in procs:
                await asyncio.to_thread(proc.wait, 600)
            cpu = meter.stop()
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        reports = [json.loads(result.read_text()) for _, result in procs]
    latencies = np.concatenate([np.asarray(r["latencies_s"]) for r in reports]) * 1e3
    ok = int(latencies.size)
    errors = sum(r["errors"] for r in reports)
    elapsed = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    scheduler_label = next(label for label in cpu if "scheduler" in label)
    # Net of idle: the scheduler's CPU over the run minus what it spends idle in as long a time.
    scheduler_net = cpu[scheduler_label] - idle_cpu.get(scheduler_label, 0.0) * elapsed / idle_s
    return {
        "plane": plane,
        "clients": args.clients,
        "inflight_per_client": args.clients_inflight,
        "workers_per_operator": args.clients_workers,
        "size": args.clients_size,
        "requests": args.clients * args.clients_requests,
        "ok": ok,
        "errors": errors,
        "first_error": next((r["first_error"] for r in reports if r["first_error"]), None),
        "elapsed_s": round(elapsed, 3),
        "req_per_s": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)), 3) if ok else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 3) if ok else None,
        "scheduler_cpu_ms_per_request": round(cpu[scheduler_label] * 1e3 / max(ok, 1), 4),
        "scheduler_cpu_ms_per_request_net_of_idle": round(scheduler_net * 1e3 / max(ok, 1), 4),
        "scheduler_idle_cpu_share": round(idle_cpu.get(scheduler_label, 0.0) / idle_s, 4),
        "cpu_ms_per_request": {label: round(s * 1e3 / max(ok, 1), 3) for label, s in cpu.items()},
    }


def render(section: dict[str, Any]) -> list[str]:
    """The section's table lines (bench/run.py's render calls this)."""
    lines = [
        "clients: client processes against one deployment (hello world, workers per operator as shown)",
        f"{'plane':<7} {'clients':>7} {'in flight':>9} {'workers/op':>10} {'requests':>8} {'errors':>6} "
        f"{'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'sched CPU ms/req':>16} {'net of idle':>11} {'idle':>6}",
    ]
    for r in section["runs"]:
        lines.append(
            f"{r['plane']:<7} {r['clients']:>7} {r['inflight_per_client']:>9} {r['workers_per_operator']:>10} "
            f"{r['requests']:>8} {r['errors']:>6} {r['req_per_s']:>8} {r['p50_ms']!s:>8} {r['p99_ms']!s:>8} "
            f"{r['scheduler_cpu_ms_per_request']:>16} {r['scheduler_cpu_ms_per_request_net_of_idle']:>11} "
            f"{r['scheduler_idle_cpu_share']:>6.1%}"
        )
    lines.append(
        "sched CPU: the scheduler's process (embedded: the bench process, which does nothing else while the "
        "client processes run) per request; net of idle: minus its CPU over as long a time with the clients "
        "connected and idle; idle: its share of a core then"
    )
    return lines


# -- child mode: one client process ----------------------------------------------------------------


async def _client_main(ns: argparse.Namespace) -> dict[str, Any]:
    from distributed import Client

    from tdask import RemoteOperator

    data = payloads(ns.size, seed=ns.seed)
    async with Client(ns.scheduler_address, asynchronous=True) as client:
        op = RemoteOperator("encoder_decoder", client=client)

        async def call(i: int) -> bool:
            x = data[i % len(data)]
            response = await op.infer(inputs={"input": x})
            return bool(np.array_equal(response.outputs["output"], x))

        await closed_loop(call, requests=max(ns.warmup, 1), concurrency=ns.inflight)
        Path(ns.result + ".ready").touch()
        while not Path(ns.go).exists():
            await asyncio.sleep(0.005)
        began = time.time()
        result = await closed_loop(call, requests=ns.requests, concurrency=ns.inflight)
        ended = time.time()
    return {
        "began": began,
        "ended": ended,
        "latencies_s": result.latencies_s,
        "errors": len(result.errors),
        "first_error": result.errors[0] if result.errors else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Child mode: run one client's load and write its latencies as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.clients", description="one client of the clients section")
    p.add_argument("--scheduler-address", required=True)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--inflight", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--go", required=True, help="start the counted run when this file exists")
    p.add_argument("--result", required=True, help="write the JSON result here")
    ns = p.parse_args(argv)
    report = asyncio.run(_client_main(ns))
    Path(ns.result).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
