"""The GPU checks of issue 17, in one go, for a machine with an NVIDIA GPU (cupy, distributed-ucxx).

    python bench/gpu_check.py                 # ~3-5 minutes: tests, device-to-device GB/s, hello world
    python bench/gpu_check.py --skip-tests --sizes-mb 1,16 --requests 100

1. The GPU tests (``-m gpu``: CUDA shared memory with Triton, cupy outputs, UCX device to device,
   KIND_GPU hello world), with pytest's summary.
2. Device to device over UCX: ``bench.operators`` producer keeps a cupy array of 1/16/256 MB, the
   consumer on another worker fetches it (timed until the bytes are on its GPU); against a plain
   cupy device-to-device copy of the same size on one GPU. Plus the stores' ``host_copy_bytes``
   (0 expected: nothing staged through host memory).
3. The hello world with KIND_GPU encoder and decoder (CUDA shared memory between each worker and
   its Triton): sequential latency p50/p99 over tcp and ucxx, for 1e3 and 1e5 int64 elements.

Prints a table per part and then one JSON line with everything. Exit status 1 when a test failed,
an answer was wrong or a host copy was counted over UCX; 2 when there is no usable GPU (the
reason is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _say(line: str) -> None:
    """This program's output (a CLI: tables and the JSON line on stdout)."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    _say(f"\n== {title} ==")
    if not rows:
        _say("(none)")
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys]
    _say("  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    _say("  ".join("-" * w for w in widths))
    for row in rows:
        _say("  ".join(str(row.get(k, "")).rjust(w) for k, w in zip(keys, widths, strict=True)))


def run_tests(timeout_s: int) -> dict[str, Any]:
    """The gpu-marked tests, in a pytest subprocess."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_gpu_shared_memory.py",
        "tests/test_gpu_ucx.py",
        "tests/test_triton_operator.py::test_kind_gpu_models_round_trip",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    began = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr[-500:]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    skipped = [line for line in lines if line.startswith("SKIPPED")]
    return {
        "exit": done.returncode,
        "summary": summary,
        "failed": failed,
        "skipped": skipped,
        "seconds": round(time.monotonic() - began, 1),
    }


def cupy_copy_gb_per_s(nbytes: int, reps: int) -> float:
    """A plain device-to-device copy on one GPU (``dst[...] = src``), median GB/s."""
    import cupy

    src = cupy.arange(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    times = []
    for _ in range(reps + 1):
        cupy.cuda.get_current_stream().synchronize()
        began = time.perf_counter()
        dst[...] = src
        cupy.cuda.get_current_stream().synchronize()
        times.append(time.perf_counter() - began)
    return nbytes / float(np.median(times[1:])) / 1e9


async def ucx_device_to_device(sizes_mb: list[int], reps: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fetch times of cupy arrays between two workers over UCX, and the stores' host-copy counts."""
    from bench.tdask_side import store_stats
    from tdask import Deployment, OperatorConfig, RemoteOperator

    ops = [
        OperatorConfig(name="producer", implementation="bench.operators:Producer"),
        OperatorConfig(name="consumer", implementation="bench.operators:Consumer"),
        OperatorConfig(name="forward", implementation="bench.operators:Forward"),
    ]
    rows = []
    async with Deployment(ops, protocol="ucxx", dashboard_address=None, asynchronous=True) as dep:
        forward = RemoteOperator("forward", client=dep.client)
        await forward.infer(parameters={"nbytes": 8 * 1024, "device": "cuda"})  # endpoints up, code warm
        for mb in sizes_mb:
            nbytes = mb * 1024 * 1024
            await forward.infer(parameters={"nbytes": nbytes, "device": "cuda"})  # the producer builds it once
            fetch_s, bad, on_device = [], 0, True
            for _ in range(reps):
                response = await forward.infer(parameters={"nbytes": nbytes, "device": "cuda"})
                fetch_s.append(float(response.parameters["fetch_s"]))
                bad += 0 if bool(response.outputs["ok"][0]) else 1
                on_device = on_device and bool(response.parameters["on_device"])
            median = float(np.median(fetch_s))
            copy = cupy_copy_gb_per_s(nbytes, reps)
            rows.append(
                {
                    "MB": mb,
                    "reps": reps,
                    "ucx_fetch_p50_ms": round(median * 1e3, 3),
                    "ucx_gb_per_s": round(nbytes / median / 1e9, 2),
                    "cupy_copy_gb_per_s": round(copy, 2),
                    "ucx_over_copy": round((nbytes / median / 1e9) / copy, 3),
                    "arrived_on_device": on_device,
                    "bad": bad,
                }
            )
        stats = await store_stats(dep)
    return rows, {name: s["host_copy_bytes"] for name, s in stats.items()}


async def hello_world_latency(protocol: str, sizes: list[int], requests: int) -> list[dict[str, Any]]:
    """Sequential latency of the hello world with KIND_GPU encoder and decoder."""
    from tdask import Deployment, RemoteOperator
    from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators

    operators = hello_world_operators(
        encoders=TritonGroup(workers=1, max_inflight=8, instances=1, kind="GPU"),
        decoders=TritonGroup(workers=1, max_inflight=8, instances=1, kind="GPU"),
        encoder_decoders=PythonGroup(workers=1, max_inflight=8),
    )
    rows = []
    async with Deployment(operators, protocol=protocol, dashboard_address=None, asynchronous=True) as dep:
        op = RemoteOperator("encoder_decoder", client=dep.client)
        for size in sizes:
            data = np.arange(size, dtype=np.int64)
            for _ in range(10):
                await op.infer(inputs={"input": data})
            times, wrong = [], 0
            for _ in range(requests):
                began = time.perf_counter()
                response = await op.infer(inputs={"input": data})
                times.append(time.perf_counter() - began)
                out = response.outputs["output"]
                out = out.get() if type(out).__module__.startswith("cupy") else out
                wrong += 0 if np.array_equal(out, data) else 1
            ms = np.array(times) * 1e3
            rows.append(
                {
                    "protocol": protocol,
                    "elements": size,
                    "requests": requests,
                    "p50_ms": round(float(np.percentile(ms, 50)), 3),
                    "p99_ms": round(float(np.percentile(ms, 99)), 3),
                    "wrong": wrong,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=int, default=400)
    parser.add_argument("--sizes-mb", default="1,16,256")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--elements", default="1000,100000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--protocols", default="tcp,ucxx")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    from tdask.cli import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    out: dict[str, Any] = {"argv": sys.orig_argv, "gpu_reason": reason}
    if reason is not None:
        _say(f"no usable GPU: {reason}")
        _say(json.dumps(out))
        return 2
    import cupy

    out["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    out["ucx"] = importlib.util.find_spec("distributed_ucxx") is not None
    status = 0
    if not args.skip_tests:
        out["tests"] = run_tests(args.test_timeout)
        _table("GPU tests", [{"exit": out["tests"]["exit"], "summary": out["tests"]["summary"]}])
        for line in out["tests"]["failed"] + out["tests"]["skipped"]:
            _say(line)
        status |= int(out["tests"]["exit"] != 0)
    if out["ucx"]:
        sizes = [int(s) for s in args.sizes_mb.split(",")]
        rows, host_copies = asyncio.run(ucx_device_to_device(sizes, args.reps))
        out["ucx_device_to_device"], out["ucx_host_copy_bytes"] = rows, host_copies
        _table("device to device over UCX vs a cupy copy", rows)
        _say(f"host bytes copied on the data path, per worker: {host_copies}")
        status |= int(any(v for v in host_copies.values()) or any(r["bad"] for r in rows))
    else:
        _say("distributed-ucxx is not installed: no UCX measurement (pip install 'tdask[ucx]')")
    latency: list[dict[str, Any]] = []
    for protocol in args.protocols.split(","):
        if protocol == "ucxx" and not out["ucx"]:
            continue
        elements = [int(e) for e in args.elements.split(",")]
        latency += asyncio.run(hello_world_latency(protocol, elements, args.requests))
    out["hello_world_gpu"] = latency
    _table("hello world, KIND_GPU encoder and decoder, sequential", latency)
    status |= int(any(r["wrong"] for r in latency))
    _say(json.dumps(out))
    return status


if __name__ == "__main__":
    sys.exit(main())
