"""A client of a multi-host test, run inside a network namespace: ``python -m tests.multihost_client``.

The test process cannot reach the namespaces' addresses, so everything it asks of the cluster
goes through this program, which prints one JSON line per result on stdout:

- ``wait ADDRESS KEY=N ...``: wait until every operator ``KEY`` (``name/version``) has ``N`` hosts.
- ``run ADDRESS OPERATOR``: send requests (``--requests``, ``--inflight``, ``--size`` int64
  elements each), check every answer, and report their latencies and who served them. With
  ``--pause-after K``, print ``{"paused": ...}`` after K answers and wait for a line on stdin
  before the rest (the test changes the network meanwhile).
- ``sessions ADDRESS``: which transport every worker's direct sessions use, by worker name.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click
import numpy as np
from distributed import Client

from tdask.cli import tls_security
from tdask.exceptions import TdaskError
from tdask.hello_world.client import expected_output
from tdask.host import PLUGIN_NAME
from tdask.remote import RemoteOperator
from tdask.request_plane import Registry


def emit(**fields: Any) -> None:
    click.echo(json.dumps(fields))


def _client(address: str) -> Client:
    security = tls_security("tls", temporary=False) if address.startswith("tls://") else None
    return Client(address, asynchronous=True, timeout=60, security=security)


def _session_kinds(dask_worker: Any) -> dict[str, str]:
    """On a worker: its own direct sessions (as a caller), peer address -> transport class."""
    plane = dask_worker.plugins[PLUGIN_NAME].plane
    workers = getattr(plane, "_workers", {})
    return {address: type(session).__name__ for address, session in workers.items()}


def _names(info: dict[str, Any]) -> dict[str, str]:
    return {address: str(w.get("name", address)) for address, w in info["workers"].items()}


@click.group()
def main() -> None:
    """Clients of the multi-host tests."""


@main.command()
@click.argument("address")
@click.argument("wanted", nargs=-1)
@click.option("--timeout", type=float, default=120)
def wait(address: str, wanted: tuple[str, ...], timeout: float) -> None:
    """Wait until each KEY=N has N hosts."""

    async def run() -> None:
        async with _client(address) as client:
            registry = Registry(client.scheduler)
            deadline = time.monotonic() + timeout
            while True:
                missing = {}
                for item in wanted:
                    key, _, count = item.partition("=")
                    registry.forget_hosts(key)
                    hosts = await registry.hosts(key)
                    if len(hosts) < int(count or 1):
                        missing[key] = hosts
                if not missing:
                    emit(ready=True)
                    return
                if time.monotonic() > deadline:
                    emit(ready=False, missing=missing, operators=str(await registry.operators())[:2000])
                    sys.exit(1)
                await asyncio.sleep(0.2)

    asyncio.run(run())


@main.command()
@click.argument("address")
@click.argument("operator", default="encoder_decoder")
@click.option("--requests", "count", type=int, default=50)
@click.option("--inflight", type=int, default=1)
@click.option("--size", type=int, default=1000, help="int64 elements per request.")
@click.option("--pause-after", type=int, default=0, help="Answers before pausing for a line on stdin.")
@click.option("--timeout", type=float, default=120, help="Each request's deadline.")
def run(address: str, operator: str, count: int, inflight: int, size: int, pause_after: int, timeout: float) -> None:
    """Send requests, check the answers, report latencies (s) and who served them."""

    async def main() -> None:
        async with _client(address) as client:
            names = _names(await client.scheduler.identity(n_workers=-1))
            op = RemoteOperator(operator, client=client)
            rng = np.random.default_rng(0)
            slots = asyncio.Semaphore(inflight)
            results: list[dict[str, Any]] = []
            paused = asyncio.Event()
            resume = asyncio.Event()
            begin = time.monotonic()

            async def one(i: int) -> None:
                if pause_after and i >= pause_after:
                    await resume.wait()
                async with slots:
                    data = rng.integers(-(2**62), 2**62, size, dtype=np.int64)
                    sent = time.monotonic()
                    entry: dict[str, Any] = {"i": i, "sent": round(sent - begin, 3)}
                    try:
                        response = await op.infer(inputs={"input": data}, timeout=timeout)
                    except TdaskError as exc:
                        entry["error"] = f"{type(exc).__name__}: {exc}"
                    else:
                        got = response.outputs.get("output")
                        entry["ok"] = bool(got is not None and np.array_equal(got, expected_output(operator, data, 1)))
                        entry["worker"] = names.get(response.worker or "", response.worker)
                        entry["called"] = [
                            names.get(response.parameters.get(k, ""), "") for k in ("encoder", "decoder")
                        ]
                    entry["latency"] = round(time.monotonic() - sent, 3)
                    results.append(entry)
                    if pause_after and len(results) == pause_after:
                        paused.set()

            tasks = [asyncio.create_task(one(i)) for i in range(count)]
            if pause_after:
                await paused.wait()
                plane = client.extensions["tdask"].plane  # this client's own sessions, before the change
                emit(paused=True, sessions={a: type(s).__name__ for a, s in plane._workers.items()})
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                resume.set()
            await asyncio.gather(*tasks)
            plane = client.extensions["tdask"].plane
            emit(
                results=sorted(results, key=lambda r: r["i"]),
                correct=sum(1 for r in results if r.get("ok")),
                elapsed=round(time.monotonic() - begin, 3),
                sessions={names.get(a, a): type(s).__name__ for a, s in plane._workers.items()},
            )

    asyncio.run(main())


@main.command()
@click.argument("address")
def sessions(address: str) -> None:
    """Each worker's direct sessions as a caller ({worker: {peer worker: transport}}), and its address."""

    async def main() -> None:
        async with _client(address) as client:
            names = _names(await client.scheduler.identity(n_workers=-1))
            kinds = await client.run(_session_kinds)
            emit(
                sessions={names[w]: {names.get(a, a): k for a, k in peers.items()} for w, peers in kinds.items()},
                addresses={name: address for address, name in names.items()},
            )

    asyncio.run(main())


if __name__ == "__main__":
    main()
