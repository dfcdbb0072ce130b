"""Shared fixtures: real Dask clusters on 127.0.0.1, started once per module where possible."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import re
import shlex
import sys
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import psutil
import pytest
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


# ---------------------------------------------------------------------------- the `cluster` marker
#
# `python -m pytest -m "not cluster"` is the fast tier: the tests that start no Dask cluster, no
# Triton, no worker or tdask/dask process, no browser and no network namespace. A test that starts
# any of these, itself or through a fixture, must be marked `cluster` (pyproject.toml). So that the
# marker cannot rot, a test without it that starts one of them fails, naming what it started:
# the entry points below report every start while a test (its fixtures included) runs, and a
# fixture seen starting one (say a module's cluster) is remembered, so that a test without the
# marker that uses it fails too, even when the fixture was already set up for an earlier test.

_PROGRAMS = {
    "dask",
    "tdask",
    "tritonserver",
    "triton_python_backend_stub",
    "chromium",
    "chromium-browser",
    "chrome",
    "headless_shell",
    "node",
    "ip",
    "iptables",
    "unshare",
    "nsenter",
    "bash",
    "sh",
}
# Modules that are programs tdask's tests run (``python -m ...``); ``pip`` and ``venv`` are not.
_PROGRAM_MODULES = ("tdask", "distributed", "dask", "dask_cuda", "examples", "bench", "tests")
# What in a ``python -c`` snippet starts a cluster, Triton, a caller or a command (an import and a
# print do not).
_SNIPPET_STARTS = re.compile(
    r"Triton|InProcess|Server|Client\(|Deployment|Cluster|Scheduler|Worker|Nanny|Remote|Popen|main\("
)


def _what_a_command_starts(args: Any, shell: bool) -> str | None:
    """What a command line starts that only a `cluster` test may, or None for a tool (pip, hadolint, ...)."""
    if isinstance(args, (str, bytes, os.PathLike)):
        argv = shlex.split(os.fsdecode(args)) if shell else [os.fsdecode(args)]
    else:
        argv = [os.fsdecode(a) for a in args]
    if not argv:
        return None
    name = os.path.basename(argv[0])
    if name in _PROGRAMS or name.startswith(("dask-", "tdask-")) or "playwright" in argv[0]:
        return f"the process {' '.join(argv[:4])!r}"
    if not name.startswith("python"):
        return None
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "-c":
            code = next(rest, "")
            return f"a Python process running {code[:60]!r}" if _SNIPPET_STARTS.search(code) else None
        if arg == "-m":
            module = next(rest, "")
            return f"the process 'python -m {module}'" if module.split(".")[0] in _PROGRAM_MODULES else None
        if arg in ("-X", "-W"):
            next(rest, None)
        elif not arg.startswith("-"):
            return f"the Python program {arg!r}"
    return None


class _ClusterGuard:
    """Who is running (the test and the fixtures being set up) and what was started while it ran."""

    def __init__(self) -> None:
        self.item: Any = None
        self.fixtures: list[tuple[str, str]] = []  # (baseid, name) of the fixtures being set up
        self.starters: dict[tuple[str, str], str] = {}  # fixture -> what it started
        self.violations: list[str] = []
        self.undo: list[Callable[[], None]] = []

    def started(self, what: str) -> None:
        for fixture in self.fixtures:
            self.starters.setdefault(fixture, what)
        item = self.item
        if item is not None and item.get_closest_marker("cluster") is None:
            message = f"{item.nodeid} starts {what} but is not marked `cluster`: add @pytest.mark.cluster"
            self.violations.append(message)
            raise _NotMarkedCluster(message)

    def patch(self, owner: Any, name: str, what: str) -> None:
        original = owner.__dict__[name]
        guard = self
        if inspect.iscoroutinefunction(original):

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                guard.started(what)
                return await original(*args, **kwargs)
        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                guard.started(what)
                return original(*args, **kwargs)

        functools.update_wrapper(wrapper, original)
        setattr(owner, name, wrapper)
        self.undo.append(lambda: setattr(owner, name, original))

    def install(self) -> None:
        import multiprocessing.process
        import subprocess

        from distributed import Nanny, Scheduler, SpecCluster, Worker

        from tdask.triton.base import TritonServerBase

        start = multiprocessing.process.BaseProcess.start
        guard = self

        @functools.wraps(start)
        def start_process(self: Any) -> None:
            # The test's own thread only: a Nanny (re)starts its worker process from a thread of its
            # own, also when an earlier test killed a worker of a module's cluster.
            if threading.current_thread() is threading.main_thread():
                guard.started("a process (multiprocessing)")
            start(self)

        multiprocessing.process.BaseProcess.start = start_process  # type: ignore[method-assign]
        self.undo.append(lambda: setattr(multiprocessing.process.BaseProcess, "start", start))
        for cls in (SpecCluster, Scheduler, Worker, Nanny):
            self.patch(cls, "__init__", f"a Dask {cls.__name__}")
        self.patch(TritonServerBase, "start", "a Triton server")

        popen_init = subprocess.Popen.__init__

        @functools.wraps(popen_init)
        def popen(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
            what = _what_a_command_starts(args, bool(kwargs.get("shell")))
            if what is not None:
                guard.started(what)
            popen_init(self, args, *rest, **kwargs)

        subprocess.Popen.__init__ = popen  # type: ignore[method-assign]
        self.undo.append(lambda: setattr(subprocess.Popen, "__init__", popen_init))

    def uninstall(self) -> None:
        while self.undo:
            self.undo.pop()()


class _NotMarkedCluster(Exception):
    pass


_GUARD = _ClusterGuard()


def pytest_sessionstart(session: Any) -> None:
    _GUARD.install()


def pytest_sessionfinish(session: Any) -> None:
    _GUARD.uninstall()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Any:
    _GUARD.fixtures.append((fixturedef.baseid, fixturedef.argname))
    try:
        return (yield)
    finally:
        _GUARD.fixtures.pop()


def _guarded(item: Any, phase: str) -> Generator[None, Any, Any]:
    _GUARD.item, _GUARD.violations = item, []
    if phase == "setup" and item.get_closest_marker("cluster") is None:
        info = getattr(item, "_fixtureinfo", None)
        fixturedefs = info.name2fixturedefs if info is not None else {}
        for name in item.fixturenames:
            for fixturedef in fixturedefs.get(name, ()):
                what = _GUARD.starters.get((fixturedef.baseid, fixturedef.argname))
                if what is not None:
                    pytest.fail(
                        f"{item.nodeid} uses the fixture {name!r}, which starts {what}, but is not marked"
                        " `cluster`: add @pytest.mark.cluster",
                        pytrace=False,
                    )
    try:
        return (yield)
    finally:
        violations, _GUARD.item, _GUARD.violations = _GUARD.violations, None, []
        if violations:  # also where the code under test caught the guard's error, or wrapped it
            pytest.fail("\n".join(violations), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: Any) -> Generator[None, Any, Any]:
    return (yield from _guarded(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: Any) -> Generator[None, Any, Any]:
    return (yield from _guarded(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: Any, nextitem: Any) -> Generator[None, Any, Any]:
    return (yield from _guarded(item, "teardown"))
