"""Shared fixtures: real Dask clusters on 127.0.0.1, started once per module where possible."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import psutil
from distributed import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Worker processes (spawned) import test operators as ``tests.operators``.
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


def run_async(address: str, fn: Callable[[Client], Coroutine[Any, Any, Any]], timeout: float = 120) -> Any:
    """Run ``fn(client)`` with an asynchronous Client connected to ``address``."""

    async def main() -> Any:
        async with Client(address, asynchronous=True) as client:
            return await asyncio.wait_for(fn(client), timeout)

    return asyncio.run(main())


def children() -> list[psutil.Process]:
    """Live processes started (directly or not) by this test process."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            # multiprocessing's own helper lives as long as this interpreter, by design.
            if "multiprocessing.resource_tracker" in cmdline:
                continue
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "the condition never held",
) -> Any:
    """Poll ``predicate()`` every ``interval`` s until it returns something truthy, and return it.

    After ``timeout`` s, fail with ``message`` (or what ``message()`` says of the state then).
    A predicate may fail early itself (``assert proc.poll() is None``).
    """
    import time

    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{message() if callable(message) else message} (waited {timeout} s)")
        time.sleep(interval)
    return value


async def async_wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "the condition never held",
) -> Any:
    """:func:`wait_for` inside an event loop: ``predicate()`` may return an awaitable."""
    import inspect
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message() if callable(message) else message} (waited {timeout} s)")
        await asyncio.sleep(interval)


def child_pids() -> set[int]:
    return {p.pid for p in children()}


def assert_no_children(timeout: float = 15.0, ignore: set[int] | None = None) -> None:
    """Everything a test started must be gone (the brief: stop everything you started).

    ``ignore``: processes that existed before (a module-scoped cluster still in use).
    """
    ignore = ignore or set()

    def left() -> list[psutil.Process]:
        return [p for p in children() if p.pid not in ignore]

    def describe() -> str:
        desc = []
        for p in left():
            try:
                desc.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                pass
        return f"processes left behind: {desc}"

    wait_for(lambda: not left(), timeout, interval=0.2, message=describe)


def store_stats(client: Client) -> dict[str, dict[str, int]]:
    """Tensor-store counters of every worker, keyed by worker name."""
    stats = client.run(lambda dask_worker: dask_worker.handlers["tdask_store_stats"]())
    names = {addr: str(w["name"]) for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    return {names.get(addr, addr): s for addr, s in stats.items()}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Show the figures tests recorded with ``record_property("figures", ...)`` (the soak's)."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "figures":
                    terminalreporter.write_line(f"{report.nodeid}: {value}")
