"""The tdask side: a scheduler, a :class:`tdask.Deployment` of operators, and who runs where.

Two scheduler placements (``--scheduler``):

- ``embedded`` (default): the Deployment's own SpecCluster, as ``python -m tdask.hello_world``
  runs it: the scheduler (with the request broker) lives in the benchmark process, on its own
  thread, sharing the GIL with the client.
- ``process``: ``dask scheduler`` in its own process, as a deployed cluster runs it; the
  deployment joins it. The benchmark process then holds only the client (and idle nannies).
  On 2 cores this is the slower placement (one more process contending for the cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import ROOT


@dataclass
class Cluster:
    """A running deployment as the benchmark sees it."""

    client: Any  # an asynchronous distributed.Client
    scheduler_address: str
    scheduler_pid: int
    worker_pids: dict[str, int] = field(default_factory=dict)  # worker name -> pid
    worker_addresses: dict[str, str] = field(default_factory=dict)  # worker name -> address
    startup_s: float = 0.0

    def triton_pids(self, name: str) -> list[int]:
        """The tritonserver of a worker and the python-backend stubs it started."""
        try:
            proc = psutil.Process(self.worker_pids[name])
            return [p.pid for p in proc.children(recursive=True)]
        except (KeyError, psutil.Error):
            return []

    def process_groups(self) -> dict[str, list[int]]:
        """Labelled pid groups for CPU accounting: client, scheduler, each worker, each Triton."""
        groups: dict[str, list[int]] = {}
        if self.scheduler_pid == os.getpid():
            groups["client+scheduler (bench process)"] = [os.getpid()]
        else:
            groups["client (bench process)"] = [os.getpid()]
            groups["scheduler"] = [self.scheduler_pid]
        for name in sorted(self.worker_pids):
            groups[f"worker {name}"] = [self.worker_pids[name]]
            triton = self.triton_pids(name)
            if triton:
                groups[f"tritonserver of {name}"] = triton
        return groups


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


@contextlib.asynccontextmanager
async def scheduler_process(log_dir: Path) -> AsyncIterator[tuple[str, int]]:
    """``dask scheduler`` on 127.0.0.1 in a process of its own; yields (address, pid)."""
    with tempfile.TemporaryDirectory(prefix="tdask-bench-sched-") as tmp:
        scheduler_file = Path(tmp) / "scheduler.json"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "scheduler.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    "--no-dashboard",
                    "--scheduler-file",
                    str(scheduler_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
        try:
            deadline = time.monotonic() + 60
            while not scheduler_file.exists() or not scheduler_file.stat().st_size:
                if proc.poll() is not None:
                    raise RuntimeError(f"dask scheduler exited with {proc.returncode}; see {log_dir / 'scheduler.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError("dask scheduler did not start within 60s")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)
            address = json.loads(scheduler_file.read_text())["address"]
            yield address, proc.pid
        finally:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


@contextlib.asynccontextmanager
async def deployment(
    operators: Sequence[Any],
    *,
    scheduler: str,
    log_dir: Path,
    log_level: str = "WARNING",
    protocol: str = "tcp",
    colocate: dict[str, str] | None = None,
) -> AsyncIterator[Cluster]:
    """Start ``operators`` on a fresh cluster; yield it with a connected async client.

    ``protocol`` is the cluster's comm: ``tcp``, ``tls`` (a throw-away CA and certificates for
    this run, as ``tdask deploy --protocol tls`` makes them) or ``ucxx`` (distributed-ucxx).
    ``colocate``: the Deployment's (operators run on the workers of another).
    """
    from distributed import Client

    from tdask import Deployment
    from tdask.cli import tls_security

    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]  # spawned workers import bench.operators
    began = time.perf_counter()
    security = tls_security(protocol, temporary=True)
    if scheduler == "process" and protocol != "tcp":
        raise ValueError("--scheduler process runs `dask scheduler` over tcp only; use --scheduler embedded")
    if scheduler == "process":
        async with scheduler_process(log_dir) as (address, pid):
            async with Deployment(
                operators,
                scheduler_address=address,
                dashboard_address=None,
                log_dir=log_dir,
                log_level=log_level,
                asynchronous=True,
                colocate=colocate,
            ) as dep:
                async with Client(address, asynchronous=True) as client:
                    cluster = await _describe(client, address, pid, began)
                    yield cluster
        return
    if scheduler != "embedded":
        raise ValueError(f"unknown scheduler placement {scheduler!r}")
    # Synchronous Deployment: its scheduler runs on the Deployment's own loop thread, exactly
    # as in `python -m tdask.hello_world`; the client runs on this (main) thread's loop.
    dep = Deployment(
        operators,
        dashboard_address=None,
        log_dir=log_dir,
        log_level=log_level,
        protocol=protocol,
        security=security,
        colocate=colocate,
    )
    await asyncio.to_thread(dep.start)
    try:
        async with Client(dep.scheduler_address, asynchronous=True, security=security) as client:
            yield await _describe(client, dep.scheduler_address, os.getpid(), began)
    finally:
        await asyncio.to_thread(dep.close)


async def _describe(client: Any, address: str, scheduler_pid: int, began: float) -> Cluster:
    info = await client.scheduler.identity(n_workers=-1)
    pids = await client.run(os.getpid)
    names = {addr: str(w["name"]) for addr, w in info["workers"].items()}
    return Cluster(
        client=client,
        scheduler_address=address,
        scheduler_pid=scheduler_pid,
        worker_pids={names[a]: pid for a, pid in pids.items()},
        worker_addresses={names[a]: a for a in pids},
        startup_s=time.perf_counter() - began,
    )


async def store_stats(cluster: Cluster) -> dict[str, dict[str, int]]:
    """Tensor-store counters of every worker, by worker name (tests/conftest.py's helper)."""
    stats = await cluster.client.run(lambda dask_worker: dask_worker.handlers["tdask_store_stats"]())
    by_address = {a: n for n, a in cluster.worker_addresses.items()}
    return {by_address.get(a, a): s for a, s in stats.items()}
