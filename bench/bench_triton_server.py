"""Time a Triton server's start, model loads, encoder calls and stop, on 127.0.0.1.

Usage: ``python bench/bench_triton_server.py [--mode subprocess|in-process] [--size 1000]
[--calls 200] [--copies 1]``. ``subprocess``: a ``tritonserver`` the bench owns, called with
tritonclient's gRPC clients; ``in-process``: Triton's core in this process
(:class:`~tdask.triton.inprocess.InProcessServer`), called through its own client. Both
models (encoder and decoder) are loaded, so that the stop unloads two python-backend models.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from tdask.triton.server import TritonServer

LOG_DIR = None
MODELS = Path(__file__).resolve().parent.parent / "models"


def _inputs(module, data: np.ndarray) -> list:
    tensor = module.InferInput("input", list(data.shape), "INT64")
    tensor.set_data_from_numpy(data)
    return [tensor]


async def _latencies(call: Callable[[], Awaitable[object]], calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` awaited calls, one after the other."""
    latencies = []
    for _ in range(calls):
        began = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - began) * 1e3)
    return latencies


async def main(mode: str, size: int, calls: int, copies: int) -> dict:
    """Start, load encoder and decoder, call the encoder (first call, then ``calls`` more), stop."""
    result: dict = {"mode": mode, "size": size, "calls": calls, "copies": copies}
    data = np.arange(size, dtype=np.int64)
    params = {"input_copies": copies}
    with tempfile.TemporaryDirectory() as tmp:
        server: Any
        if mode == "in-process":
            from tdask.triton.inprocess import InProcessServer

            server = InProcessServer(model_repository=MODELS, log_dir=LOG_DIR or tmp, name="bench")
        else:
            server = TritonServer(model_repository=MODELS, log_dir=LOG_DIR or tmp, name="bench")
        began = time.perf_counter()
        await server.start()
        result["start_s"] = time.perf_counter() - began
        try:
            began = time.perf_counter()
            await server.load_model("encoder")
            result["load_encoder_s"] = time.perf_counter() - began
            await server.load_model("decoder")  # two python models for the stop to unload
            # (name, one call): in process, its own client; a subprocess, tritonclient's gRPC clients.
            paths: list[tuple[str, Callable[[], Awaitable[object]]]] = []
            if mode == "in-process":
                client = server.client()
                paths.append(("", lambda: client.infer("encoder", {"input": (data, "INT64")}, parameters=params)))
            else:
                sync = grpcclient.InferenceServerClient(server.grpc_url)
                aio = aioclient.InferenceServerClient(server.grpc_url)

                async def sync_call() -> object:
                    return sync.infer("encoder", _inputs(grpcclient, data), parameters=params)

                paths += [
                    ("sync_", sync_call),
                    ("aio_", lambda: aio.infer("encoder", _inputs(aioclient, data), parameters=params)),
                ]
            try:
                for prefix, call in paths:
                    began = time.perf_counter()
                    await call()
                    result[f"{prefix}first_call_ms"] = (time.perf_counter() - began) * 1e3
                    latencies = await _latencies(call, calls)
                    result[f"{prefix}p50_ms"] = statistics.median(latencies)
                    result[f"{prefix}p90_ms"] = statistics.quantiles(latencies, n=10)[-1]
            finally:
                if mode != "in-process":
                    sync.close()
                    await aio.close()
        finally:
            began = time.perf_counter()
            await server.stop()
            result["stop_s"] = time.perf_counter() - began
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["subprocess", "in-process"], default="subprocess")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--log-dir", default=None, help="keep the server log here")
    args = parser.parse_args()
    LOG_DIR = args.log_dir
    result = asyncio.run(main(args.mode, args.size, args.calls, args.copies))
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")  # noqa: T201
    print(json.dumps({"bench": "triton_server", **result}))  # noqa: T201
