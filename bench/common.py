"""What every section shares: the closed-loop load generator, statistics, the environment record
and the table printer."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class LoadResult:
    """Outcome of one closed-loop run: ``concurrency`` callers, ``requests`` requests in all."""

    requests: int
    concurrency: int
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) * 1e3 if self.latencies_s else np.zeros(1)
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "elapsed_s": round(self.elapsed_s, 4),
            "req_per_s": round(self.ok / self.elapsed_s, 2) if self.elapsed_s > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p90_ms": round(float(np.percentile(lat, 90)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "mean_ms": round(float(lat.mean()), 3),
        }


async def closed_loop(
    call: Callable[[int], Awaitable[bool]],
    *,
    requests: int,
    concurrency: int,
    warmup: int = 0,
) -> LoadResult:
    """Keep ``concurrency`` calls in flight until ``requests`` calls have completed.

    ``call(i)`` sends request ``i`` and returns whether its answer was right (raising counts as
    an error). Warm-up calls run first, at the same concurrency, and are not counted.
    Throughput is completed-correct calls over the time from the first send to the last answer.
    """
    if warmup:
        await _run(call, warmup, concurrency, [], [], offset=10**9)
    latencies: list[float] = []
    errors: list[str] = []
    began = time.perf_counter()
    await _run(call, requests, concurrency, latencies, errors)
    elapsed = time.perf_counter() - began
    return LoadResult(requests, concurrency, elapsed, latencies, errors)


async def _run(call, total, concurrency, latencies, errors, offset=0):  # type: ignore[no-untyped-def]
    counter = iter(range(total))

    async def lane() -> None:
        for i in counter:
            start = time.perf_counter()
            try:
                good = await call(offset + i)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            if good:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(f"request {offset + i}: wrong output")

    await asyncio.gather(*(lane() for _ in range(min(concurrency, total))))


def payloads(size: int, count: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Pre-generated random int64 inputs (generation is not part of what is timed)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(-(2**62), 2**62, size, dtype=np.int64) for _ in range(count)]


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for dist in (
        "tdask",
        "dask",
        "distributed",
        "numpy",
        "tritonclient",
        "nvidia-pytriton",
        "grpcio",
        "msgpack",
        "tornado",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if out["tdask"] is None:
        import tdask

        out["tdask"] = getattr(tdask, "__version__", None)
    out["tritonserver"] = None  # filled in by the first section that starts a server
    return out


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str | None = None) -> str:
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [f"== {title} =="]
    lines.append(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True)))
    )
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        )
    if note:
        lines.append(note)
    return "\n".join(lines)


class CpuMeter:
    """CPU seconds used by labelled groups of processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, processes: dict[str, list[int]]) -> None:
        import psutil

        self.procs: dict[str, list[Any]] = {}
        for label, pids in processes.items():
            group = []
            for pid in pids:
                try:
                    group.append(psutil.Process(pid))
                except psutil.Error:
                    pass
            if group:
                self.procs[label] = group
        self.before: dict[str, float] = {}

    def _cpu(self, label: str) -> float:
        import psutil

        total = 0.0
        for proc in self.procs[label]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def start(self) -> None:
        self.before = {label: self._cpu(label) for label in self.procs}

    def stop(self) -> dict[str, float]:
        return {label: self._cpu(label) - self.before.get(label, 0.0) for label in self.procs}


_TCP_SENDER = """
import socket, sys
import numpy as np
port, nbytes, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = np.ones(nbytes, np.uint8)
s = socket.create_connection(("127.0.0.1", port))
for _ in range(reps):
    s.recv(1)
    s.sendall(memoryview(data))
s.close()
"""


_WIRE_SENDER = """
import asyncio, sys
import numpy as np
import uvloop
from tdask.transport.wire import WireSession
nbytes = int(sys.argv[1])
data = memoryview(np.ones(nbytes, np.uint8))

def session() -> WireSession:
    def answer(message):
        if message["op"] == "get":
            wire.send_with_payload({"op": "data"}, "bytes", data)
    wire = WireSession("bench wire floor", answer)
    return wire

async def main():
    server = await asyncio.get_running_loop().create_server(session, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the bench closes it

uvloop.run(main())
"""


def wire_loopback_seconds(nbytes: int, reps: int) -> list[float]:
    """Seconds to ask for and receive ``nbytes`` over tdask's wire alone (a payload frame, two
    processes, uvloop on both ends, 127.0.0.1): the floor of an event loop to event loop fetch,
    under the data plane's own work (the data call, the store, the tensor's decoding)."""
    import subprocess

    import uvloop

    from tdask.transport.wire import open_session

    sender = subprocess.Popen(
        [sys.executable, "-c", _WIRE_SENDER, str(nbytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    async def fetch_all(port: int) -> list[float]:
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[Any]] = []

        def arrived(message: dict[str, Any]) -> None:
            if waiting and message["op"] == "data":
                waiting.pop().set_result(message["bytes"])

        session = await open_session(f"127.0.0.1:{port}", "bench", arrived, timeout=30)
        times = []
        try:
            for _ in range(reps):
                future = loop.create_future()
                waiting.append(future)
                began = time.perf_counter()
                session.send({"op": "get"})
                data = await asyncio.wait_for(future, 30)
                times.append(time.perf_counter() - began)
                if len(data) != nbytes:
                    raise ConnectionError(f"the wire floor's sender sent {len(data)} bytes, not {nbytes}")
        finally:
            await session.close()
        return times

    try:
        assert sender.stdout is not None
        line = sender.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the wire floor's sender did not start (exit {sender.poll()}): {line!r}")
        return uvloop.run(fetch_all(int(line)))
    finally:
        assert sender.stdin is not None
        sender.stdin.close()  # its loop ends at EOF
        sender.wait(30)


def tcp_loopback_seconds(nbytes: int, reps: int) -> list[float]:
    """Seconds to receive ``nbytes`` over a plain TCP socket on 127.0.0.1 from another process,
    into a freshly allocated numpy buffer (what a fetch does): the floor under any comm library."""
    import socket
    import subprocess

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    sender = subprocess.Popen([sys.executable, "-c", _TCP_SENDER, str(port), str(nbytes), str(reps)])
    times = []
    try:
        conn, _ = server.accept()
        with conn:
            for _ in range(reps):
                buf = np.empty(nbytes, np.uint8)
                view = memoryview(buf)
                began = time.perf_counter()
                conn.sendall(b"x")
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:], nbytes - got)
                    if not n:
                        raise ConnectionError("sender closed early")
                    got += n
                times.append(time.perf_counter() - began)
                del view, buf
    finally:
        server.close()
        sender.wait(30)
    return times
