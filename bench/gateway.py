"""The gateway's cost: ``python -m bench.gateway [--requests N] [--concurrency 1,8] [--sizes 1000]``.

The hello world's ``encoder_decoder`` (one encoder, one decoder, one orchestrator worker) called
three ways on 127.0.0.1: tdask directly (``RemoteOperator`` from an asynchronous client), and
through ``python -m tdask.gateway`` (its own process) with tritonclient.http.aio (binary tensors)
and tritonclient.grpc.aio. Each of ``--rounds`` is a fresh deployment and a fresh gateway, the
three paths measured in turn; a round's gateway rows are compared with its own direct row, and
issue 24's targets (at most +1 ms on the p50 at 1 in flight, at least 0.8 of the throughput at
8) are judged on the median over rounds, with how many rounds met each. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench.common import CpuMeter, closed_loop, machine, payloads, table, versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_gateway(
    address: str, log: str, *flags: str, env: dict[str, str] | None = None, **popen: Any
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``python -m tdask.gateway`` for the scheduler at ``address`` on free ports, logging to ``log``.

    ``flags`` are more of the command's flags, ``env`` more environment variables, ``popen``
    more arguments of :class:`subprocess.Popen`. Returns the process and its HTTP and gRPC
    addresses, once it said where it listens; raises ``RuntimeError`` with its output if it exits
    or stays silent for 60 s. (Also the tests'.)
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tdask.gateway",
                "--scheduler-address",
                address,
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
            **popen,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"HTTP 127\.0\.0\.1:(\d+), gRPC 127\.0\.0\.1:(\d+)", open(log).read())
        if match:
            return proc, f"127.0.0.1:{match[1]}", f"127.0.0.1:{match[2]}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the gateway did not start: {open(log).read()}")


def start_floor(event_loop: str) -> tuple[subprocess.Popen[str], str, str]:
    """``python -m bench.protocol_floor`` (the protocols with nothing behind them); its HTTP and
    gRPC addresses. Stopped by closing its standard input."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.protocol_floor", "--event-loop", event_loop],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"HTTP (127\.0\.0\.1:\d+), gRPC (127\.0\.0\.1:\d+)", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"the protocol floor did not start: {line!r}")
    return proc, match[1], match[2]


async def measure(
    args: argparse.Namespace, address: str, http: str, grpc: str, gateway_pid: int, floor: tuple[int, str, str]
) -> list[dict[str, Any]]:
    import psutil
    import tritonclient.grpc.aio as grpcaio
    import tritonclient.http.aio as httpaio
    from distributed import Client

    from tdask import RemoteOperator

    rows = []
    async with Client(address, asynchronous=True) as client:
        op = RemoteOperator("encoder_decoder", client=client)
        workers = list((await client.run(os.getpid)).values())
        workers += [c.pid for w in workers for c in psutil.Process(w).children(recursive=True)]
        # CPU per request by process: where the gateway's cost lands (its own process, and the
        # client library in the bench process, which also holds the embedded scheduler).
        groups = {"bench": [os.getpid()], "gateway": [gateway_pid], "workers": workers}
        # The floor's rows count its server in the gateway column: it stands where the gateway does.
        floor_groups = {"bench": [os.getpid()], "gateway": [floor[0]], "workers": workers}
        http_client = httpaio.InferenceServerClient(http, conn_limit=64)
        grpc_client = grpcaio.InferenceServerClient(grpc)
        floor_http = httpaio.InferenceServerClient(floor[1], conn_limit=64)
        floor_grpc = grpcaio.InferenceServerClient(floor[2])
        try:
            for size in args.sizes:
                data = payloads(size)

                async def direct(i: int, data: list[np.ndarray] = data) -> bool:
                    x = data[i % len(data)]
                    r = await op.infer(inputs={"input": x})
                    return bool(np.array_equal(r.outputs["output"], x))

                def via_http(client: Any, data: list[np.ndarray] = data) -> Callable[[int], Awaitable[bool]]:
                    async def one(i: int) -> bool:
                        x = data[i % len(data)]
                        inp = httpaio.InferInput("input", [x.size], "INT64")
                        inp.set_data_from_numpy(x, binary_data=True)
                        r = await client.infer("encoder_decoder", [inp])
                        return bool(np.array_equal(r.as_numpy("output"), x))

                    return one

                def via_grpc(client: Any, data: list[np.ndarray] = data) -> Callable[[int], Awaitable[bool]]:
                    async def one(i: int) -> bool:
                        x = data[i % len(data)]
                        inp = grpcaio.InferInput("input", [x.size], "INT64")
                        inp.set_data_from_numpy(x)
                        r = await client.infer("encoder_decoder", [inp])
                        return bool(np.array_equal(r.as_numpy("output"), x))

                    return one

                paths = (
                    ("direct", direct),
                    ("gateway-http", via_http(http_client)),
                    ("gateway-grpc", via_grpc(grpc_client)),
                    ("floor-http", via_http(floor_http)),
                    ("floor-grpc", via_grpc(floor_grpc)),
                )
                for concurrency in args.concurrency:
                    for path, call in paths:
                        meter = CpuMeter(floor_groups if path.startswith("floor") else groups)
                        meter.start()
                        result = await closed_loop(
                            call, requests=args.requests, concurrency=concurrency, warmup=args.warmup
                        )
                        cpu = meter.stop()
                        summary = result.summary()
                        summary["cpu_ms_per_request"] = {
                            k: round(v * 1e3 / max(result.ok, 1), 3) for k, v in cpu.items()
                        }
                        rows.append({"path": path, "size": size, "round": args.round, **summary})
                        print(  # noqa: T201
                            f"  round {args.round} {path} size={size} c={concurrency}: "
                            f"{summary['req_per_s']} req/s, {summary['p50_ms']} ms p50",
                            file=sys.stderr,
                        )
        finally:
            for closing in (http_client, grpc_client, floor_http, floor_grpc):
                await closing.close()
    return rows


#: Issue 24's targets: (in flight, what is compared, wanted, test), per gateway protocol.
TARGETS = {
    "added_p50_ms_at_1": (1, "added_p50_ms", "<= +1 ms", lambda x: x <= 1.0),
    "throughput_ratio_at_8": (8, "throughput_ratio", ">= 0.8", lambda x: x >= 0.8),
}


def judge(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each gateway row against the direct row of its round; the targets on the median over rounds.

    A gateway row also carries its protocol's floor of the same round (``floor_p50_ms``) and
    what the gateway added beyond it (``beyond_floor_ms``: its own work, and its tdask call's
    cost over the direct client's).
    """
    direct = {(r["round"], r["size"], r["concurrency"]): r for r in rows if r["path"] == "direct"}
    floors = {
        (r["round"], r["size"], r["concurrency"], r["path"].split("-", 1)[1]): r
        for r in rows
        if r["path"].startswith("floor-")
    }
    compared = []
    for r in rows:
        base = direct.get((r["round"], r["size"], r["concurrency"]))
        if not r["path"].startswith("gateway-") or base is None:
            continue
        floor = floors.get((r["round"], r["size"], r["concurrency"], r["path"].split("-", 1)[1]))
        added = round(r["p50_ms"] - base["p50_ms"], 3)
        compared.append(
            {
                "path": r["path"],
                "size": r["size"],
                "concurrency": r["concurrency"],
                "round": r["round"],
                "added_p50_ms": added,
                "throughput_ratio": round(r["req_per_s"] / base["req_per_s"], 3) if base["req_per_s"] else None,
                "floor_p50_ms": None if floor is None else floor["p50_ms"],
                "beyond_floor_ms": None if floor is None else round(added - floor["p50_ms"], 3),
            }
        )
    found: dict[str, Any] = {}
    for path in sorted({c["path"] for c in compared}):
        for name, (concurrency, key, text, ok) in TARGETS.items():
            values = [c[key] for c in compared if c["path"] == path and c["concurrency"] == concurrency]
            values = [v for v in values if v is not None]
            if not values:
                continue
            median = round(float(np.median(values)), 3)
            found[f"{path} {name}"] = {
                "median": median,
                "target": text,
                "met": ok(median),
                "rounds": values,
                "rounds_met": sum(1 for v in values if ok(v)),
            }
    return compared, found


def floors_table(rows: list[dict[str, Any]], compared: list[dict[str, Any]]) -> list[list[Any]]:
    """Per protocol, size and in flight, medians over rounds: the floor and what the gateway adds beyond it."""
    cells = []
    for protocol in ("http", "grpc"):
        keys = sorted({(r["size"], r["concurrency"]) for r in rows if r["path"] == f"floor-{protocol}"})
        for size, concurrency in keys:
            floor = [
                r for r in rows if (r["path"], r["size"], r["concurrency"]) == (f"floor-{protocol}", size, concurrency)
            ]
            mine = [
                c
                for c in compared
                if (c["path"], c["size"], c["concurrency"]) == (f"gateway-{protocol}", size, concurrency)
                and c["beyond_floor_ms"] is not None
            ]

            def median(values: list[float]) -> float | None:
                return round(float(np.median(values)), 3) if values else None

            cells.append(
                [
                    protocol,
                    size,
                    concurrency,
                    median([r["p50_ms"] for r in floor]),
                    median([r["req_per_s"] for r in floor]),
                    median([r["cpu_ms_per_request"].get("bench", 0.0) for r in floor]),
                    median([r["cpu_ms_per_request"].get("gateway", 0.0) for r in floor]),
                    median([c["added_p50_ms"] for c in mine]),
                    median([c["beyond_floor_ms"] for c in mine]),
                ]
            )
    return cells


def render(rows: list[dict[str, Any]], compared: list[dict[str, Any]], found: dict[str, Any]) -> str:
    """The per-round table, the medians by path and the targets."""
    by_round = {(c["path"], c["size"], c["concurrency"], c["round"]): c for c in compared}
    cells = []
    for r in sorted(rows, key=lambda r: (r["size"], r["concurrency"], r["path"], r["round"])):
        c = by_round.get((r["path"], r["size"], r["concurrency"], r["round"]), {})
        cells.append(
            [
                r["path"],
                r["round"],
                r["size"],
                r["concurrency"],
                r["req_per_s"],
                r["p50_ms"],
                r["p99_ms"],
                c.get("added_p50_ms", 0 if r["path"] == "direct" else None),
                c.get("throughput_ratio", 1.0 if r["path"] == "direct" else None),
                *(r["cpu_ms_per_request"].get(k) for k in ("bench", "gateway", "workers")),
                r["errors"],
            ]
        )
    columns = [
        "path",
        "round",
        "size",
        "in flight",
        "req/s",
        "p50 ms",
        "p99 ms",
        "+p50 vs direct",
        "tput vs direct",
        "cpu ms/req: bench",
        "gateway",
        "workers",
        "errors",
    ]
    parts = [
        table(
            "gateway: encoder_decoder through KServe v2 vs tdask direct (each round: a fresh deployment and gateway)",
            columns,
            cells,
        )
    ]
    medians = []
    for key in sorted({(r["path"], r["size"], r["concurrency"]) for r in rows}):
        mine = [r for r in rows if (r["path"], r["size"], r["concurrency"]) == key]
        cpu = {k: float(np.median([r["cpu_ms_per_request"].get(k, 0.0) for r in mine])) for k in ("bench", "gateway")}
        medians.append(
            [
                *key,
                round(float(np.median([r["req_per_s"] for r in mine])), 1),
                round(float(np.median([r["p50_ms"] for r in mine])), 3),
                round(cpu["bench"], 3),
                round(cpu["gateway"], 3),
            ]
        )
    parts.append(
        table(
            "medians over rounds",
            ["path", "size", "in flight", "req/s", "p50 ms", "cpu ms/req: bench", "gateway"],
            medians,
        )
    )
    floors = floors_table(rows, compared)
    if floors:
        parts.append(
            table(
                "protocol floors: a KServe server that only echoes (bench.protocol_floor), same client libraries, "
                "medians over rounds",
                [
                    "protocol",
                    "size",
                    "in flight",
                    "floor p50 ms",
                    "floor req/s",
                    "cpu ms/req: client",
                    "server",
                    "gateway +p50",
                    "gateway +p50 beyond floor",
                ],
                floors,
                note="floor p50: a call's whole round trip through the protocol with nothing behind it, the part of "
                "the gateway's +p50 no handler can remove; beyond floor: the gateway's +p50 minus its round's floor "
                "p50 (its own work, and its tdask call's cost over the direct client's)",
            )
        )
    if found:
        parts.append(
            table(
                "targets (issue 24, item 6): median over rounds, each round against its own direct row",
                ["target", "median", "wanted", "met", "rounds met: values"],
                [
                    [
                        name,
                        t["median"],
                        t["target"],
                        "yes" if t["met"] else "NO",
                        f"{t['rounds_met']}/{len(t['rounds'])}: " + ", ".join(str(v) for v in t["rounds"]),
                    ]
                    for name, t in found.items()
                ],
            )
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000", help="int64 elements per request")
    p.add_argument("--concurrency", default="1,8", help="requests in flight")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument(
        "--rounds", type=int, default=3, help="fresh rounds (a new deployment and gateway each); medians over them"
    )
    p.add_argument(
        "--event-loop", default="asyncio", choices=["asyncio", "uvloop"], help="the gateway's (its --event-loop)"
    )
    args = p.parse_args(argv)
    args.sizes = [int(float(v)) for v in args.sizes.split(",")]
    args.concurrency = [int(v) for v in args.concurrency.split(",")]

    from tdask import Deployment
    from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators

    group = TritonGroup(workers=1, max_inflight=8, instances=1, kind="CPU")
    operators = hello_world_operators(
        encoders=group, decoders=group, encoder_decoders=PythonGroup(workers=1, max_inflight=16)
    )
    rows: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        args.round = round_
        with (
            Deployment(operators, dashboard_address="127.0.0.1:0") as deployment,
            tempfile.TemporaryDirectory() as tmp,
        ):
            address = deployment.client.scheduler.address
            proc, http, grpc = start_gateway(address, os.path.join(tmp, "gateway.txt"), "--event-loop", args.event_loop)
            try:
                floor, floor_http, floor_grpc = start_floor(args.event_loop)
                try:
                    rows += asyncio.run(
                        measure(args, address, http, grpc, proc.pid, (floor.pid, floor_http, floor_grpc))
                    )
                finally:
                    assert floor.stdin is not None
                    floor.stdin.close()
                    floor.wait(30)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    compared, found = judge(rows)
    print(render(rows, compared, found))  # noqa: T201
    result = {
        "section": "gateway",
        "results": rows,
        "compared": compared,
        "targets": found,
        "floors": [
            dict(
                zip(
                    (
                        "protocol",
                        "size",
                        "concurrency",
                        "p50_ms",
                        "req_per_s",
                        "cpu_client",
                        "cpu_server",
                        "gateway_added_p50_ms",
                        "beyond_floor_ms",
                    ),
                    cells,
                    strict=True,
                )
            )
            for cells in floors_table(rows, compared)
        ],
    }
    print(json.dumps({**result, "machine": machine(), "versions": versions()}))  # noqa: T201
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
