"""``python -m bench.trace``: the walk of one hello-world request through tdask's own code.

Deploys the hello world (encoder, decoder, encoder_decoder, as ``python -m tdask.hello_world``
does), warms it up, then records, in the client and in every worker's event-loop thread, each
Python function of the ``tdask`` package entered while one request is served (``sys.setprofile``;
tdask's code only, not Dask's, Triton's or the standard library's). Prints, per process, the
functions entered, the distinct files, and how often execution moved from one tdask file to
another, then the files crossed in order, and one JSON line.

This counts code paths, not time: it is deterministic for a given code and request, so it
compares layouts (``PYTHONPATH=<other checkout> python -m bench.trace`` traces another tree).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from itertools import groupby
from typing import Any

import numpy as np

from bench.common import table


def _install(prefix: str) -> None:
    """Start recording tdask calls in this thread (run in a worker's event loop by client.run)."""
    import sys as _sys

    calls: list[tuple[str, str]] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            filename = frame.f_code.co_filename
            if filename.startswith(prefix):
                calls.append(("tdask/" + filename[len(prefix) :], frame.f_code.co_name))

    _sys.modules[__name__]._calls = calls  # type: ignore[attr-defined]
    _sys.setprofile(profile)


def _collect() -> list[tuple[str, str]]:
    """Stop recording and return what was recorded."""
    sys.setprofile(None)
    return list(getattr(sys.modules[__name__], "_calls", []))


def _summary(calls: list[tuple[str, str]]) -> dict[str, Any]:
    files = [f for f, _ in calls]
    walk = [f for f, _ in groupby(files)]
    counts = Counter(f"{f}:{name}" for f, name in calls)
    return {
        "functions": len(calls),
        "files": len(set(files)),
        "file_changes": max(len(walk) - 1, 0),
        "walk": walk,
        "calls": dict(counts.most_common()),
    }


async def trace(size: int, warmup: int) -> dict[str, Any]:
    from distributed import Client

    import tdask
    from tdask import Deployment, RemoteOperator
    from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators

    prefix = os.path.dirname(os.path.abspath(tdask.__file__)) + os.sep  # tdask's own code only
    operators = hello_world_operators(
        encoders=TritonGroup(workers=1, max_inflight=1, instances=1, kind="CPU"),
        decoders=TritonGroup(workers=1, max_inflight=1, instances=1, kind="CPU"),
        encoder_decoders=PythonGroup(workers=1, max_inflight=1),
    )
    async with Deployment(operators, dashboard_address=None, asynchronous=True) as deployment:
        async with Client(deployment.scheduler_address, asynchronous=True) as client:
            op = RemoteOperator("encoder_decoder", client=client)
            data = np.arange(size, dtype=np.int64)
            for _ in range(warmup):
                await op.infer(inputs={"input": data})
            await client.run(_install, prefix)
            _install(prefix)
            response = await op.infer(inputs={"input": data})
            client_calls = _collect()
            worker_calls = await client.run(_collect)
            assert np.array_equal(response.outputs["output"], data)
            info = await client.scheduler.identity(n_workers=-1)
    names = {address: str(w["name"]) for address, w in info["workers"].items()}
    processes = {"client": _summary(client_calls)}
    for address, calls in sorted(worker_calls.items(), key=lambda kv: names.get(kv[0], kv[0])):
        processes[f"worker {names.get(address, address)}"] = _summary(calls)
    return {"prefix": prefix, "size": size, "processes": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1000, help="int64 elements of the request")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(trace(args.size, args.warmup))
    processes = result["processes"]
    rows = [[name, p["functions"], p["files"], p["file_changes"]] for name, p in processes.items()]
    rows.append(
        [
            "all",
            sum(p["functions"] for p in processes.values()),
            len({f for p in processes.values() for f in p["walk"]}),
            sum(p["file_changes"] for p in processes.values()),
        ]
    )
    print(  # noqa: T201
        table(
            "one encoder_decoder request: tdask functions entered",
            ["process", "functions", "files", "file changes"],
            rows,
        )
    )  # noqa: T201
    for name, p in processes.items():
        print(f"\n{name}: " + " -> ".join(p["walk"]))  # noqa: T201
    print(json.dumps({"bench": "trace", **result, "argv": sys.orig_argv}))  # noqa: T201


if __name__ == "__main__":
    main()
