"""tdask benchmarks: ``python -m bench [--only pipeline,onehop,dataplane,scaling] ...``.

Sections (all on 127.0.0.1, real Dask cluster, real Triton servers):

- ``pipeline``: the hello world's ``encoder_decoder`` through tdask vs the same two Triton models
  as a Triton ensemble in one server (tritonclient.grpc.aio), 1 and 32 requests in flight; tdask
  deployed ``spread`` (a worker per operator) and ``colocated`` (one worker hosting all three,
  the ensemble's shape), ``--topology``.
- ``onehop``: tdask ``encoder`` alone vs Triton ``encoder`` alone.
- ``dataplane``: worker-to-worker tensor fetch (1 MB, 16 MB, 256 MB) vs a numpy copy, and proof
  that the forwarding orchestrator moved zero tensor bytes.
- ``scaling``: hello world throughput with 1, 2, 4 encoder and decoder workers.

Prints a table per section, then one JSON line with every result. ``--profile DIR`` adds
CPU profiles of every tdask process during extra pipeline runs (see bench/profile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dask.config
import numpy as np

from bench.common import (
    CpuMeter,
    closed_loop,
    machine,
    payloads,
    table,
    tcp_loopback_seconds,
    versions,
    wire_loopback_seconds,
)

SECTIONS = ("pipeline", "onehop", "dataplane", "scaling", "floor", "clients")
#: The tdask systems of the pipeline section, by topology (``--topology``).
SYSTEMS = {"spread": "tdask", "colocated": "tdask_colocated"}
MB = 1_000_000


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    p.add_argument("--sizes", default="1000,100000", help="int64 elements per request (pipeline, onehop)")
    p.add_argument("--concurrency", default="1,32", help="requests in flight (pipeline, onehop)")
    p.add_argument("--requests", type=int, default=1000, help="requests per run for sizes <= 10000 elements")
    p.add_argument("--large-requests", type=int, default=150, help="requests per run for larger sizes")
    p.add_argument("--warmup", type=int, default=20, help="uncounted requests before each run")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="pipeline/onehop: repeat ensemble-then-tdask this many times, each on a fresh server and "
        "deployment; the targets use the median of the per-round ratios",
    )
    p.add_argument(
        "--topology",
        default="spread,colocated",
        help="pipeline: tdask deployments to run each round: spread (a worker per operator, system 'tdask') "
        "and/or colocated (one worker hosting all three, the ensemble's shape, system 'tdask_colocated')",
    )
    p.add_argument(
        "--max-inflight", type=int, default=32, help="max_inflight_requests of every tdask operator (per worker)"
    )
    p.add_argument(
        "--scheduler",
        choices=("embedded", "process"),
        default="embedded",
        help="dask scheduler embedded in this process (as python -m tdask.hello_world), or in its own process",
    )
    p.add_argument(
        "--protocol",
        choices=("tcp", "tls", "ucxx"),
        default="tcp",
        help="the tdask cluster's comm (the raw-TCP column of the dataplane section stays plain TCP: the floor)",
    )
    p.add_argument("--clients", type=int, default=8, help="clients section: client processes")
    p.add_argument("--clients-inflight", type=int, default=4, help="clients section: requests in flight per client")
    p.add_argument("--clients-requests", type=int, default=500, help="clients section: requests per client")
    p.add_argument("--clients-size", type=int, default=1000, help="clients section: int64 elements per request")
    p.add_argument("--clients-workers", type=int, default=2, help="clients section: workers per operator")
    p.add_argument(
        "--clients-idle-s", type=float, default=3.0, help="clients section: idle time measured before the load"
    )
    p.add_argument("--dataplane-sizes", default="1e6,16e6,256e6", help="bytes per tensor")
    p.add_argument("--dataplane-reps", default="20,10,5", help="fetches per size")
    p.add_argument("--scaling-workers", default="1,2,4", help="encoder (and decoder) worker counts")
    p.add_argument(
        "--scaling-requests", type=int, default=400, help="requests per scaling run (1e3 elements, 32 in flight)"
    )
    p.add_argument(
        "--scaling-model-inflight",
        default="32,2",
        help="max_inflight_requests of the encoder and decoder workers in the scaling runs (one deployment each)",
    )
    p.add_argument(
        "--scaling-delay",
        type=float,
        default=1e-5,
        help="second scaling run: model delay per element (s); 1e-5 = 10 ms per model call at 1e3",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="also profile every tdask process during extra pipeline runs (files go to DIR)",
    )
    p.add_argument(
        "--profiler", default="cprofile", help="comma-separated: cprofile (per-thread CPU time), pyspy (sampling)"
    )
    p.add_argument("--profile-requests", type=int, default=1000, help="requests per profiled run")
    p.add_argument("--profile-size", type=int, default=1000, help="elements per request in profiled runs")
    p.add_argument("--log-dir", default=None, help="keep worker, scheduler and Triton logs here (default: a temp dir)")
    p.add_argument(
        "--triton-mode",
        choices=("subprocess", "in-process"),
        default=None,
        help="tdask.triton.mode of the tdask workers: a tritonserver per worker, or Triton in the worker's "
        "process (default: the configured one); the ensemble baseline is a tritonserver either way",
    )
    args = p.parse_args(argv)
    args.only_list = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only_list) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.round = 1  # the pipeline/onehop round being run
    args.topology_list = [t.strip() for t in args.topology.split(",") if t.strip()]
    if not args.topology_list or set(args.topology_list) - set(SYSTEMS):
        p.error(f"--topology takes a comma-separated list of {','.join(SYSTEMS)}")
    args.size_list = _ints(args.sizes)
    args.concurrency_list = _ints(args.concurrency)
    args.dataplane_size_list = _ints(args.dataplane_sizes)
    reps = _ints(args.dataplane_reps)
    args.dataplane_rep_list = (reps + reps[-1:] * len(args.dataplane_size_list))[: len(args.dataplane_size_list)]
    args.scaling_worker_list = _ints(args.scaling_workers)
    args.scaling_model_inflight_list = _ints(args.scaling_model_inflight)
    return args


def requests_for(args: argparse.Namespace, size: int) -> int:
    return args.requests if size <= 10_000 else args.large_requests


def hello_world(encoders: int, decoders: int, max_inflight: int, model_inflight: int | None = None) -> list[Any]:
    from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators

    model_inflight = model_inflight or max_inflight
    return hello_world_operators(
        encoders=TritonGroup(workers=encoders, max_inflight=model_inflight, instances=1, kind="CPU"),
        decoders=TritonGroup(workers=decoders, max_inflight=model_inflight, instances=1, kind="CPU"),
        encoder_decoders=PythonGroup(workers=1, max_inflight=max_inflight),
    )


async def metered(groups: dict[str, list[int]], coro: Any) -> tuple[Any, dict[str, float]]:
    meter = CpuMeter(groups)
    meter.start()
    result = await coro
    return result, meter.stop()


def cpu_per_request(cpu: dict[str, float], requests: int) -> dict[str, float]:
    return {label: round(seconds * 1e3 / max(requests, 1), 3) for label, seconds in cpu.items()}


# -- pipeline and one hop -------------------------------------------------------------------------


async def triton_baseline(args: argparse.Namespace, log_dir: Path, out: dict[str, Any]) -> None:
    import psutil
    import tritonclient.grpc.aio as aio

    from bench.triton_side import CHANNEL_ARGS, ENSEMBLE, TritonCaller, ensemble_server, server_version

    began = time.perf_counter()
    async with ensemble_server(log_dir=str(log_dir)) as server:
        out["versions"]["tritonserver"] = await server_version(server.grpc_url)
        out["startup_s"]["triton_ensemble"] = round(time.perf_counter() - began, 2)
        triton_pids = [server.pid] + [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        groups = {"client (bench process)": [os.getpid()], "tritonserver (+stubs)": triton_pids}
        async with aio.InferenceServerClient(server.grpc_url, channel_args=CHANNEL_ARGS) as client:
            for size in args.size_list:
                data = payloads(size)
                n = requests_for(args, size)
                for conc in args.concurrency_list:
                    runs = []
                    if "pipeline" in args.only_list:
                        runs.append(("pipeline", "triton_ensemble", TritonCaller(client, ENSEMBLE, data).pipeline))
                    if "onehop" in args.only_list:
                        runs.append(("onehop", "triton", TritonCaller(client, "encoder", data).encoder))
                    for section, system, call in runs:
                        result, cpu = await metered(
                            groups, closed_loop(call, requests=n, concurrency=conc, warmup=args.warmup)
                        )
                        row = {
                            "system": system,
                            "size": size,
                            "round": args.round,
                            **result.summary(),
                            "cpu_ms_per_request": cpu_per_request(cpu, result.ok),
                        }
                        out["sections"].setdefault(section, {"runs": []})["runs"].append(row)
                        _progress(section, row)


async def tdask_pipeline(args: argparse.Namespace, log_dir: Path, out: dict[str, Any]) -> None:
    for topology in args.topology_list:
        await _tdask_pipeline(args, log_dir, out, topology)


async def _tdask_pipeline(args: argparse.Namespace, log_dir: Path, out: dict[str, Any], topology: str) -> None:
    """One tdask deployment of the hello world, and its runs.

    ``spread``: a worker per operator (the hello world's shape: three processes on a request's
    path). ``colocated``: one worker hosting all three (the ensemble's shape: one process runs the
    orchestration and both models), the Deployment's ``colocate`` (``colocate_with`` in a
    deployment file); the nested calls are then in-process calls
    (``tdask.request.in-process-calls``).
    """
    from bench.tdask_side import deployment
    from tdask import RemoteOperator

    system = SYSTEMS[topology]
    ops = hello_world(1, 1, args.max_inflight)
    colocate = {"decoder": "encoder", "encoder_decoder": "encoder"} if topology == "colocated" else None
    async with deployment(
        ops,
        scheduler=args.scheduler,
        log_dir=log_dir / f"pipeline-{topology}",
        protocol=args.protocol,
        colocate=colocate,
    ) as cluster:
        out["startup_s"][system] = round(cluster.startup_s, 2)
        groups = cluster.process_groups()
        out.setdefault("processes", {})[system] = {label: len(pids) for label, pids in groups.items()}
        ed = RemoteOperator("encoder_decoder", client=cluster.client)
        enc = RemoteOperator("encoder", client=cluster.client)

        def calls(data: list[np.ndarray]) -> list[tuple[str, str, Any]]:
            async def pipeline(i: int) -> bool:
                x = data[i % len(data)]
                response = await ed.infer(inputs={"input": x})
                return bool(np.array_equal(response.outputs["output"], x))

            async def encoder(i: int) -> bool:
                x = data[i % len(data)]
                response = await enc.infer(inputs={"input": x})
                return bool(np.array_equal(response.outputs["output"], np.invert(x)))

            runs = []
            if "pipeline" in args.only_list:
                runs.append(("pipeline", system, pipeline))
            if "onehop" in args.only_list and colocate is None:
                runs.append(("onehop", system, encoder))
            return runs

        for size in args.size_list:
            data = payloads(size)
            n = requests_for(args, size)
            for conc in args.concurrency_list:
                for section, name, call in calls(data):
                    result, cpu = await metered(
                        groups, closed_loop(call, requests=n, concurrency=conc, warmup=args.warmup)
                    )
                    row = {
                        "system": name,
                        "size": size,
                        "round": args.round,
                        "scheduler": args.scheduler,
                        **result.summary(),
                        "cpu_ms_per_request": cpu_per_request(cpu, result.ok),
                    }
                    out["sections"].setdefault(section, {"runs": []})["runs"].append(row)
                    _progress(section, row)

        if args.profile and "pipeline" in args.only_list and args.round == args.rounds:
            from bench.profile import profile_run

            pipeline_call = next(c for s, _, c in calls(payloads(args.profile_size)) if s == "pipeline")
            out.setdefault("profile", {})[system] = await profile_run(
                Path(args.profile) / topology,
                cluster,
                pipeline_call,
                requests=args.profile_requests,
                concurrencies=args.concurrency_list,
                warmup=args.warmup,
                profilers=[x.strip() for x in args.profiler.split(",") if x.strip()],
            )


def compare(out: dict[str, Any], section: str, baseline: str) -> None:
    """tdask / baseline ratios, pairing the runs of the same round (size, concurrency), per tdask system."""
    runs = out["sections"].get(section, {}).get("runs", [])
    by_key = {(r["system"], r["size"], r["concurrency"], r["round"]): r for r in runs}
    ratios = []
    for (system, size, conc, rnd), r in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        if system == baseline or (baseline, size, conc, rnd) not in by_key:
            continue
        b = by_key[(baseline, size, conc, rnd)]
        ratios.append(
            {
                "system": system,
                "size": size,
                "concurrency": conc,
                "round": rnd,
                "throughput_ratio": round(r["req_per_s"] / b["req_per_s"], 3) if b["req_per_s"] else None,
                "p50_ratio": round(r["p50_ms"] / b["p50_ms"], 2) if b["p50_ms"] else None,
                "p99_ratio": round(r["p99_ms"] / b["p99_ms"], 2) if b["p99_ms"] else None,
            }
        )
    out["sections"][section]["ratios_tdask_over_" + baseline] = ratios


def targets(out: dict[str, Any]) -> None:
    """Issue 25's targets, judged on the median over rounds (and met in at least 4 of 5 rounds):
    at 1e3 elements >= 0.8 of the ensemble's throughput at 32 in flight and a sequential p50
    <= 1.6x the ensemble's; at 1e5 elements a sequential p50 <= 1.0x (issue 14's were 0.5, 2.0
    and 1.5). Each round pairs a fresh ensemble server with a fresh tdask
    deployment: on this VM a deployment's latency depends on where its processes land, so one
    round is one draw. A target whose size or concurrency was not run is left out."""
    all_ratios = out["sections"].get("pipeline", {}).get("ratios_tdask_over_triton_ensemble", [])
    wanted = {
        "throughput_32_inflight": (1000, 32, "throughput_ratio", ">= 0.8", lambda x: x >= 0.8),
        "sequential_p50": (1000, 1, "p50_ratio", "<= 1.6", lambda x: x <= 1.6),
        "sequential_p50_1e5": (100_000, 1, "p50_ratio", "<= 1.0", lambda x: x <= 1.0),
    }
    found = {}
    for topology, system in SYSTEMS.items():
        ratios = [r for r in all_ratios if r["system"] == system]
        for name, (size, conc, key, text, ok) in wanted.items():
            values = [r[key] for r in ratios if r["size"] == size and r["concurrency"] == conc and r[key] is not None]
            if not values:
                continue
            median = round(float(np.median(values)), 3)
            found[name if topology == "spread" else f"{name} ({topology})"] = {
                "system": system,
                "ratio": median,
                "target": text,
                "met": ok(median),
                "rounds": values,
                "rounds_met": sum(1 for v in values if ok(v)),
            }
    if found:
        out["targets"] = found


# -- data plane ---------------------------------------------------------------------------------


async def dataplane(args: argparse.Namespace, log_dir: Path, out: dict[str, Any]) -> None:
    from bench.tdask_side import deployment, store_stats
    from tdask import OperatorConfig, RemoteOperator
    from tdask.config import get_bytes

    ops = [
        OperatorConfig(name="producer", implementation="bench.operators:Producer"),
        OperatorConfig(name="consumer", implementation="bench.operators:Consumer"),
        OperatorConfig(name="forward", implementation="bench.operators:Forward"),
    ]
    section: dict[str, Any] = {"runs": []}
    out["sections"]["dataplane"] = section
    async with deployment(
        ops, scheduler=args.scheduler, log_dir=log_dir / "dataplane", protocol=args.protocol
    ) as cluster:
        out["startup_s"]["tdask_dataplane"] = round(cluster.startup_s, 2)
        forward = RemoteOperator("forward", client=cluster.client)
        await forward.infer(parameters={"nbytes": 8 * 1024})  # connections up, code warm
        before = await store_stats(cluster)
        moved = 0
        for nbytes, reps in zip(args.dataplane_size_list, args.dataplane_rep_list, strict=True):
            await forward.infer(parameters={"nbytes": nbytes})  # the producer builds its array once
            moved += nbytes
            fetch_s, total_s, bad = [], [], 0
            remote = True
            for _ in range(reps):
                began = time.perf_counter()
                response = await forward.infer(parameters={"nbytes": nbytes})
                total_s.append(time.perf_counter() - began)
                fetch_s.append(float(response.parameters["fetch_s"]))
                remote = (
                    remote and bool(response.parameters["remote"]) and bool(response.parameters["forwarded_descriptor"])
                )
                bad += 0 if bool(response.outputs["ok"][0]) else 1
                moved += nbytes
            copy_s, fresh_s = memcpy_times(nbytes, reps)
            tcp_s = float(np.median(await asyncio.to_thread(tcp_loopback_seconds, nbytes, reps)))
            # The wire alone (no data plane above it), where fetches of this size take it.
            on_wire = args.protocol == "tcp" and nbytes <= get_bytes("tdask.data-plane.wire-max-bytes")
            wire_s = float(np.median(await asyncio.to_thread(wire_loopback_seconds, nbytes, reps))) if on_wire else 0.0
            median = float(np.median(fetch_s))
            row = {
                "nbytes": nbytes,
                "reps": reps,
                "fetch_p50_ms": round(median * 1e3, 3),
                "fetch_min_ms": round(min(fetch_s) * 1e3, 3),
                "fetch_gb_per_s": round(nbytes / median / 1e9, 3),
                "memcpy_gb_per_s": round(nbytes / copy_s / 1e9, 3),
                "fresh_copy_gb_per_s": round(nbytes / fresh_s / 1e9, 3),
                "raw_tcp_gb_per_s": round(nbytes / tcp_s / 1e9, 3),
                "fetch_over_raw_tcp": round(tcp_s / median, 3),
                "wire_floor_gb_per_s": round(nbytes / wire_s / 1e9, 3) if wire_s else None,
                "fetch_best_gb_per_s": round(nbytes / min(fetch_s) / 1e9, 3),
                "fetch_over_memcpy": round(median / copy_s, 2),
                "end_to_end_p50_ms": round(float(np.median(total_s)) * 1e3, 3),
                "by_reference": remote,
                "bad_bytes": bad,
            }
            section["runs"].append(row)
            _progress("dataplane", row)
        await asyncio.sleep(0.2)  # releases are fire-and-forget at the end of each request
        after = await store_stats(cluster)

    def delta(name: str, key: str) -> int:
        return after[name][key] - before[name][key]

    check = {
        "orchestrator_pulled_bytes": delta("forward.0", "pulled_bytes"),
        "orchestrator_served_bytes": delta("forward.0", "served_bytes"),
        "orchestrator_stored_tensors_now": after["forward.0"]["tensors"],
        "producer_served_bytes": delta("producer.0", "served_bytes"),
        "consumer_pulled_bytes": delta("consumer.0", "pulled_bytes"),
        "tensor_bytes_moved_expected": moved,
        "stores_empty_after": all(s["tensors"] == 0 for s in after.values()),
    }
    check["orchestrator_moved_zero_bytes"] = (
        check["orchestrator_pulled_bytes"] == 0 and check["orchestrator_served_bytes"] == 0
    )
    check["bytes_went_producer_to_consumer"] = (
        check["producer_served_bytes"] == moved and check["consumer_pulled_bytes"] == moved
    )
    section["zero_copy_check"] = check


def memcpy_times(nbytes: int, reps: int) -> tuple[float, float]:
    """Median seconds of a numpy copy into a preallocated buffer, and of np.copy (fresh pages)."""
    src = np.arange(nbytes // 8, dtype=np.uint64).view(np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    warm, fresh = [], []
    for _ in range(max(reps, 3)):
        began = time.perf_counter()
        np.copyto(dst, src)
        warm.append(time.perf_counter() - began)
        began = time.perf_counter()
        copy = src.copy()
        fresh.append(time.perf_counter() - began)
        del copy
    return float(np.median(warm)), float(np.median(fresh))


# -- scaling ------------------------------------------------------------------------------------


async def scaling(args: argparse.Namespace, log_dir: Path, out: dict[str, Any]) -> None:
    from collections import Counter

    from bench.tdask_side import deployment
    from tdask import RemoteOperator

    section: dict[str, Any] = {"runs": [], "cpu_count": os.cpu_count()}
    out["sections"]["scaling"] = section
    data = payloads(1000)
    delays = [0.0] + ([args.scaling_delay] if args.scaling_delay > 0 else [])
    for model_inflight in args.scaling_model_inflight_list:
        for n in args.scaling_worker_list:
            ops = hello_world(n, n, args.max_inflight, model_inflight)
            name = f"scaling{n}x{model_inflight}"
            async with deployment(
                ops, scheduler=args.scheduler, log_dir=log_dir / name, protocol=args.protocol
            ) as cluster:
                ed = RemoteOperator("encoder_decoder", client=cluster.client)
                for delay in delays:
                    used: dict[str, Counter[str]] = {"encoder": Counter(), "decoder": Counter()}

                    async def call(
                        i: int,
                        delay: float = delay,
                        used: dict[str, Counter[str]] = used,
                        ed: RemoteOperator = ed,
                    ) -> bool:
                        x = data[i % len(data)]
                        params = {"delay": delay} if delay else None
                        response = await ed.infer(inputs={"input": x}, parameters=params)
                        used["encoder"][response.parameters.get("encoder", "")] += 1
                        used["decoder"][response.parameters.get("decoder", "")] += 1
                        return bool(np.array_equal(response.outputs["output"], x))

                    result = await closed_loop(call, requests=args.scaling_requests, concurrency=32, warmup=args.warmup)
                    enc = used["encoder"]  # warm-up requests included; the shares are what matter
                    total_enc = sum(enc.values()) or 1
                    row = {
                        "workers": n,
                        "model_max_inflight": model_inflight,
                        "delay_per_element_s": delay,
                        "model_ms_per_call": round(delay * 1000 * 1e3, 3),
                        "startup_s": round(cluster.startup_s, 2),
                        **result.summary(),
                        "encoders_used": len(used["encoder"]),
                        "decoders_used": len(used["decoder"]),
                        "busiest_encoder_share": round(max(enc.values()) / total_enc, 3) if enc else None,
                    }
                    section["runs"].append(row)
                    _progress("scaling", row)
    for model_inflight in args.scaling_model_inflight_list:
        for delay in delays:
            same = [
                r
                for r in section["runs"]
                if r["delay_per_element_s"] == delay and r["model_max_inflight"] == model_inflight
            ]
            base = next((r["req_per_s"] for r in same if r["workers"] == 1), None)
            for r in same:
                if base:
                    r["speedup_vs_1"] = round(r["req_per_s"] / base, 2)


async def floor(args: argparse.Namespace, log_dir: Path, out: dict[str, Any]) -> None:
    """What one hop costs without Triton: a tdask hop to a Python ``echo`` operator (on the
    configured request plane and transport) vs a bare Dask RPC round trip to the same worker
    (no request plane) vs a bare Dask RPC to the scheduler; 1e3 int64 elements (inline), 1 and
    32 in flight."""
    from distributed.protocol import to_serialize

    from bench.operators import install_echo_handler
    from bench.tdask_side import deployment
    from tdask import OperatorConfig, RemoteOperator

    section: dict[str, Any] = {"runs": []}
    out["sections"]["floor"] = section
    echo_config = OperatorConfig(
        name="echo", implementation="bench.operators:Echo", max_inflight_requests=args.max_inflight
    )
    ops = [(echo_config, 1)]
    data = payloads(1000)
    async with deployment(ops, scheduler=args.scheduler, log_dir=log_dir / "floor", protocol=args.protocol) as cluster:
        client = cluster.client
        address = cluster.worker_addresses["echo.0"]
        await client.run(install_echo_handler, workers=[address])
        echo = RemoteOperator("echo", client=client)
        groups = cluster.process_groups()

        async def tdask_hop(i: int) -> bool:
            x = data[i % len(data)]
            response = await echo.infer(inputs={"x": x})
            return bool(np.array_equal(response.outputs["x"], x))

        async def dask_rpc_worker(i: int) -> bool:
            x = data[i % len(data)]
            reply = await client.rpc(address).bench_echo(x=to_serialize(x))
            return bool(np.array_equal(reply["x"], x))

        async def dask_rpc_scheduler(i: int) -> bool:
            await client.scheduler.tdask_hosts(operator="echo/1")
            return True

        from distributed.comm import connect

        idle_comms: list[Any] = []

        async def dask_comm_worker(i: int) -> bool:
            # One persistent comm per caller in flight: write a message, read the reply.
            comm = idle_comms.pop() if idle_comms else await connect(address)
            try:
                x = data[i % len(data)]
                await comm.write({"op": "bench_echo", "x": to_serialize(x), "reply": True})
                reply = await comm.read()
            finally:
                idle_comms.append(comm)
            return bool(np.array_equal(reply["x"], x))

        plane = dask.config.get("tdask.request.plane")
        if plane == "direct":
            plane += f" plane, {dask.config.get('tdask.request.direct-transport')} transport"
        else:
            plane += " plane"
        for conc in args.concurrency_list:
            for system, call in (
                (f"tdask hop ({plane})", tdask_hop),
                ("dask rpc to worker", dask_rpc_worker),
                ("dask comm to worker (persistent, no pool)", dask_comm_worker),
                ("dask rpc to scheduler (no payload)", dask_rpc_scheduler),
            ):
                result, cpu = await metered(
                    groups, closed_loop(call, requests=args.requests, concurrency=conc, warmup=args.warmup)
                )
                row = {
                    "system": system,
                    "size": 1000,
                    **result.summary(),
                    "cpu_ms_per_request": cpu_per_request(cpu, result.ok),
                    "cpu_total_ms_per_request": round(sum(cpu.values()) * 1e3 / max(result.ok, 1), 3),
                }
                section["runs"].append(row)
                _progress("floor", row)
        for comm in idle_comms:
            await comm.close()


# -- output -------------------------------------------------------------------------------------


def _progress(section: str, row: dict[str, Any]) -> None:
    keys = [
        k
        for k in (
            "system",
            "size",
            "concurrency",
            "nbytes",
            "workers",
            "delay_per_element_s",
            "req_per_s",
            "p50_ms",
            "p99_ms",
            "errors",
            "fetch_gb_per_s",
        )
        if k in row
    ]
    print(f"[{section}] " + " ".join(f"{k}={row[k]}" for k in keys), file=sys.stderr, flush=True)  # noqa: T201


def _load_columns(r: dict[str, Any]) -> list[Any]:
    """The columns every closed-loop run shows: in flight, requests, errors, req/s, p50, p99."""
    return [r["concurrency"], r["requests"], r["errors"], r["req_per_s"], r["p50_ms"], r["p99_ms"]]


def render(out: dict[str, Any]) -> str:
    parts = []
    v, m = out["versions"], out["machine"]
    parts.append(
        f"tdask bench: python {v['python']}, dask {v['dask']}, distributed {v['distributed']}, numpy {v['numpy']}, "
        f"tritonclient {v['tritonclient']}, tritonserver {v['tritonserver']}; "
        f"{m['cpu_count']} CPUs, {m['platform']}; scheduler: {out['config']['scheduler']}"
    )
    for section, baseline, label in (
        ("pipeline", "triton_ensemble", "tdask encoder_decoder vs Triton ensemble"),
        ("onehop", "triton", "tdask encoder vs Triton encoder (one hop)"),
    ):
        s = out["sections"].get(section)
        if not s:
            continue
        rows = []
        ratios = {
            (r["system"], r["size"], r["concurrency"], r["round"]): r
            for r in s.get(f"ratios_tdask_over_{baseline}", [])
        }
        rounds = len({r["round"] for r in s["runs"]}) > 1
        for r in sorted(s["runs"], key=lambda r: (r["size"], r["concurrency"], r["round"], r["system"] != baseline)):
            ratio = ratios.get((r["system"], r["size"], r["concurrency"], r["round"]), {})
            system = f"{r['system']} (round {r['round']})" if rounds else r["system"]
            rows.append([system, r["size"], *_load_columns(r), ratio.get("throughput_ratio"), ratio.get("p50_ratio")])
        parts.append(
            table(
                f"{section}: {label}",
                [
                    "system",
                    "elements",
                    "in flight",
                    "requests",
                    "errors",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "tput ratio",
                    "p50 ratio",
                ],
                rows,
                note="ratios are tdask / Triton (throughput: higher is better; p50: lower is better)",
            )
        )
    if "targets" in out:
        rows = [
            [
                name,
                t["ratio"],
                t["target"],
                "yes" if t["met"] else "NO",
                f"{t['rounds_met']}/{len(t['rounds'])}: " + ", ".join(str(v) for v in t["rounds"]),
            ]
            for name, t in out["targets"].items()
        ]
        parts.append(
            table(
                "targets (tdask / ensemble)",
                ["target", "median ratio", "wanted", "met", "rounds met: ratios"],
                rows,
                note="each round: a fresh ensemble server, then a fresh tdask deployment (--rounds)",
            )
        )
    cpu_rows = []
    for section in ("pipeline",):
        for r in out["sections"].get(section, {}).get("runs", []):
            if r["size"] == min(x["size"] for x in out["sections"][section]["runs"]):
                for label, ms in r["cpu_ms_per_request"].items():
                    suffix = f" (round {r['round']})" if out["config"].get("rounds", 1) > 1 else ""
                    cpu_rows.append([f"{r['system']} @{r['concurrency']}{suffix}", label, ms])
    if cpu_rows:
        parts.append(
            table(
                "pipeline CPU per request (smallest size): ms of CPU per completed request, by process",
                ["run", "process", "cpu ms/req"],
                cpu_rows,
            )
        )
    s = out["sections"].get("dataplane")
    if s:
        rows = [
            [
                f"{r['nbytes'] / MB:g} MB",
                r["reps"],
                r["fetch_p50_ms"],
                r["fetch_gb_per_s"],
                r["fetch_best_gb_per_s"],
                r["raw_tcp_gb_per_s"],
                r["fetch_over_raw_tcp"],
                "-" if r["wire_floor_gb_per_s"] is None else r["wire_floor_gb_per_s"],
                r["memcpy_gb_per_s"],
                r["fresh_copy_gb_per_s"],
                r["fetch_over_memcpy"],
                r["end_to_end_p50_ms"],
                "yes" if r["by_reference"] and not r["bad_bytes"] else "NO",
            ]
            for r in s["runs"]
        ]
        c = s.get("zero_copy_check", {})
        note = (
            f"orchestrator moved {c.get('orchestrator_pulled_bytes')} B pulled / "
            f"{c.get('orchestrator_served_bytes')} B served "
            f"(zero: {'yes' if c.get('orchestrator_moved_zero_bytes') else 'NO'}); producer served "
            f"{c.get('producer_served_bytes')} B, consumer pulled {c.get('consumer_pulled_bytes')} B of "
            f"{c.get('tensor_bytes_moved_expected')} B expected; stores empty after: {c.get('stores_empty_after')}\n"
            "fetch GB/s: median over reps; raw TCP: plain socket between two processes on 127.0.0.1 into fresh "
            "pages (the floor under Dask's comm); wire floor: tdask's wire alone between two uvloop processes, "
            "asked and answered as a fetch is, no data plane (sizes that take the wire); memcpy: numpy copy "
            "into a warm buffer; fresh copy: np.copy"
        )
        parts.append(
            table(
                "dataplane: worker-to-worker fetch vs numpy copy",
                [
                    "size",
                    "reps",
                    "fetch p50 ms",
                    "fetch GB/s",
                    "best GB/s",
                    "raw TCP GB/s",
                    "fetch/raw TCP",
                    "wire floor GB/s",
                    "memcpy GB/s",
                    "fresh copy GB/s",
                    "fetch/memcpy",
                    "e2e p50 ms",
                    "by ref+ok",
                ],
                rows,
                note=note,
            )
        )
    s = out["sections"].get("floor")
    if s:
        rows = [[r["system"], *_load_columns(r), r["cpu_total_ms_per_request"]] for r in s["runs"]]
        parts.append(
            table(
                "floor: one hop without Triton (1e3 int64 elements)",
                ["path", "in flight", "requests", "errors", "req/s", "p50 ms", "p99 ms", "cpu ms/req (all)"],
                rows,
                note="cpu ms/req (all): CPU of the bench process (client, and scheduler when embedded), "
                "scheduler and worker, per request",
            )
        )
    s = out["sections"].get("scaling")
    if s:
        rows = [
            [
                r["workers"],
                r["model_max_inflight"],
                r["model_ms_per_call"],
                r["requests"],
                r["errors"],
                r["req_per_s"],
                r.get("speedup_vs_1"),
                r["p50_ms"],
                r["p99_ms"],
                f"{r['encoders_used']}/{r['decoders_used']}",
                r["busiest_encoder_share"],
            ]
            for r in s["runs"]
        ]
        parts.append(
            table(
                f"scaling: hello world, 1e3 elements, 32 in flight, {s['cpu_count']} CPU cores",
                [
                    "enc+dec workers",
                    "model max_inflight",
                    "model ms/call",
                    "requests",
                    "errors",
                    "req/s",
                    "speedup",
                    "p50 ms",
                    "p99 ms",
                    "enc/dec used",
                    "busiest enc share",
                ],
                rows,
                note="model ms/call: the models' sleep per call (time.sleep in the python backend, not CPU); with 0 "
                "the run is CPU-bound on this machine. model max_inflight: max_inflight_requests of each encoder "
                "and decoder worker (encoder_decoder keeps --max-inflight).",
            )
        )
    if "clients" in out["sections"]:
        from bench.clients import render as render_clients

        parts.append("\n".join(render_clients(out["sections"]["clients"])))
    if "profile" in out:
        from bench.profile import render_profile

        for system, profile in out["profile"].items():
            parts.append(f"== profile of {system} ==\n" + render_profile(profile))
    return "\n\n".join(parts)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    import tdask.config  # noqa: F401  (tdask's dask.config defaults, recorded below)

    out: dict[str, Any] = {
        "bench": "tdask",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "cwd": os.getcwd(),
        "versions": versions(),
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
        "tdask_request_config": dict(dask.config.get("tdask.request")),
        "triton_mode": dask.config.get("tdask.triton.mode"),
        "startup_s": {},
        "sections": {},
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tdask-bench-logs-") as tmp:
        log_dir = Path(args.log_dir or tmp).resolve()
        if {"pipeline", "onehop"} & set(args.only_list):
            for pipeline_round in range(1, args.rounds + 1):
                args.round = pipeline_round
                await triton_baseline(args, log_dir, out)
                await tdask_pipeline(args, log_dir, out)
            for section, baseline in (("pipeline", "triton_ensemble"), ("onehop", "triton")):
                if section in out["sections"]:
                    compare(out, section, baseline)
            targets(out)
        if "dataplane" in args.only_list:
            await dataplane(args, log_dir, out)
        if "floor" in args.only_list:
            await floor(args, log_dir, out)
        if "scaling" in args.only_list:
            await scaling(args, log_dir, out)
        if "clients" in args.only_list:
            from bench.clients import clients

            await clients(args, log_dir, out)
    out["total_s"] = round(time.perf_counter() - began, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Quiet workers and scheduler (they read this at import, before any config reaches them).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.WARNING)
    for name in ("tdask", "distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import dask.config

    dask.config.set({"logging.distributed": "warning", "logging.tdask": "warning"})
    if args.triton_mode is not None:
        dask.config.set({"tdask.triton.mode": args.triton_mode})
    out = asyncio.run(amain(args))
    print(render(out))  # noqa: T201
    print(json.dumps(out, default=str))  # noqa: T201
    bad = [r for s in out["sections"].values() for r in s.get("runs", []) if r.get("errors") or r.get("bad_bytes")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
