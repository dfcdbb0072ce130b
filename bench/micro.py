"""Per-hop pieces in isolation: ``python -m bench.micro [--waits N] [--rounds R]``.

What one reply wait costs in the caller's process, on asyncio's and on uvloop's loop:

- ``asyncio.timeout`` around :meth:`ResponseStream.next` (what ``RemoteOperator`` did per reply
  wait before), against the stream's own timer (``next(timeout)``: one timer handle);
- no deadline at all (the floor: a future resolved by ``call_soon``).

Each row is the median of ``--rounds`` fresh timings of ``--waits`` waits. Prints a table, then
one JSON line (``"bench": "tdask-micro"``). The pipeline benchmark (``python -m bench``) is the
judge of what a change buys end to end; this shows where a few microseconds per hop come from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, table, versions
from tdask.request_plane.base import ResponseStream

WAYS = ("asyncio.timeout", "stream timer", "no deadline")


async def _time_waits(way: str, waits: int) -> float:
    """Microseconds per reply wait, ``way`` being one of :data:`WAYS`."""
    loop = asyncio.get_running_loop()
    final = {"final": True}
    began = time.perf_counter()
    for _ in range(waits):
        stream = ResponseStream("r")
        loop.call_soon(stream.deliver, final)
        if way == "asyncio.timeout":
            async with asyncio.timeout(120):
                await stream.next()
        elif way == "stream timer":
            await stream.next(120)
        else:
            await stream.next()
    return (time.perf_counter() - began) / waits * 1e6


async def _measure(waits: int, rounds: int) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):  # interleaved, so that a noisy moment hits every way alike
        for way in WAYS:
            got[way].append(round(await _time_waits(way, waits), 3))
    return got


def _loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loops["uvloop"] = uvloop.new_event_loop
    return loops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waits", type=int, default=20_000, help="reply waits per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timings per way (the median is shown)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    rows = []
    for name, factory in _loops().items():
        with asyncio.Runner(loop_factory=factory) as runner:
            got = runner.run(_measure(args.waits, args.rounds))
        results[name] = {way: {"median_us": statistics.median(v), "rounds_us": v} for way, v in got.items()}
        rows += [[name, way, statistics.median(v), min(v), max(v)] for way, v in got.items()]
    print(table("one reply wait (us)", ["loop", "deadline", "median", "min", "max"], rows))  # noqa: T201
    out = {
        "bench": "tdask-micro",
        "command": " ".join(sys.orig_argv),
        "versions": versions(),
        "machine": machine(),
        "config": vars(args),
        "reply_wait": results,
    }
    print(json.dumps(out))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
