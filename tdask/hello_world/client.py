"""``python -m tdask.hello_world.client`` (``tdask client``): send requests to a running hello world and check them.

Each client sends its requests of random int64 arrays, checks that every output equals its
input, and shows a progress bar naming the worker that answered last. Throughput counts the
time from the first request to the last answer only, not process or cluster start-up.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from tdask.cli import common_options, configure_logging, install_sigterm_as_interrupt, tls_security
from tdask.exceptions import TdaskError
from tdask.remote import RemoteOperator, Response

logger = logging.getLogger("tdask.hello_world")

OPERATORS = ["encoder_decoder", "encoder", "decoder"]


@dataclass(kw_only=True)
class ClientReport:
    """What the clients measured; ``ok`` only when every response was right."""

    requests: int = 0
    correct: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    workers: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether there were requests and every one was answered correctly."""
        return self.requests > 0 and self.correct == self.requests

    @property
    def throughput(self) -> float:
        """Requests per second over the time the requests took."""
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        """Return the report the hello world prints (throughput, latency, ``Correct: n/m``, who answered)."""
        p50, p90, p99 = (
            (np.percentile(self.latencies_s, q) * 1e3 for q in (50, 90, 99)) if self.latencies_s else (0, 0, 0)
        )
        lines = [
            f"Throughput: {self.throughput:.2f} req/s Total Time: {self.elapsed_s:.3f} s "
            "(request time only: first request sent to last response received; start-up excluded)",
            f"Latency: p50 {p50:.2f} ms  p90 {p90:.2f} ms  p99 {p99:.2f} ms",
            f"Correct: {self.correct}/{self.requests}",
            "Answered by: " + ", ".join(f"{w} x{n}" for w, n in sorted(self.workers.items())),
        ]
        lines += [f"Error: {e}" for e in self.errors[:10]]
        return "\n".join(lines)


def expected_output(operator: str, data: np.ndarray, copies: int) -> np.ndarray:
    """Return what a correct answer to ``data`` looks like for ``operator``."""
    if operator == "encoder":
        return np.invert(np.tile(data, copies))
    return data  # encoder_decoder, and decoder fed with the encoding of data


async def run_clients(
    client: Client,
    *,
    operator: str = "encoder_decoder",
    clients: int = 1,
    requests_per_client: int = 100,
    input_size_mean: int = 1000,
    input_size_stdev: float = 0.0,
    max_inflight_per_client: int = 1,
    encoder_input_copies: int = 1,
    progress: bool = True,
    seed: int = 0,
) -> ClientReport:
    """Run ``clients`` concurrent clients against ``operator`` and verify every output."""
    report = ClientReport()
    op = RemoteOperator(operator, client=client)
    scheduler = client.scheduler
    assert scheduler is not None  # set once the client is connected
    names: dict[str, str] = {}

    async def who(response: Response) -> str:
        """``encoder_decoder.0 (encoder.1 -> decoder.0)``: the worker, and those it called."""
        addresses = [response.worker] + [response.parameters.get(k) for k in ("encoder", "decoder")]
        if any(a and a not in names for a in addresses):  # first answer, or workers that joined since
            info = await scheduler.identity(n_workers=-1)
            names.update({addr: str(w.get("name", addr)) for addr, w in info["workers"].items()})
            names.update({a: a for a in addresses if a and a not in names})  # gone already: asked once
        worker = names.get(response.worker or "", response.worker or "?")
        called = [names.get(response.parameters.get(k, ""), "") for k in ("encoder", "decoder")]
        return f"{worker} ({' -> '.join(called)})" if all(called) else worker

    async def one_client(index: int) -> None:
        rng = np.random.default_rng(seed + index)
        bar = tqdm(
            total=requests_per_client,
            desc=f"client {index}",
            position=index,
            disable=not progress,
            leave=True,
            file=sys.stderr,
        )
        slots = asyncio.Semaphore(max_inflight_per_client)

        async def one_request(i: int) -> None:
            async with slots:
                size = max(0, int(round(rng.normal(input_size_mean, input_size_stdev))))
                data = rng.integers(-(2**62), 2**62, size, dtype=np.int64)
                inputs = {"input": data}
                copies = encoder_input_copies
                if operator == "decoder":
                    inputs = {"input": np.invert(np.tile(data, copies)), "input_copies": np.array([copies], np.int64)}
                start = time.perf_counter()
                try:
                    response = await op.infer(inputs=inputs, request_id=f"client{index}-{i}")
                except TdaskError as exc:
                    report.errors.append(str(exc))
                    report.requests += 1
                    bar.update()
                    return
                report.latencies_s.append(time.perf_counter() - start)
                report.requests += 1
                worker = await who(response)
                report.workers[worker] = report.workers.get(worker, 0) + 1
                got = response.outputs.get("output")
                want = expected_output(operator, data, copies)
                if got is not None and got.dtype == np.int64 and np.array_equal(got, want):
                    report.correct += 1
                else:
                    report.errors.append(f"request client{index}-{i}: wrong output from {worker}")
                bar.set_postfix_str(worker, refresh=False)
                bar.update()

        await asyncio.gather(*(one_request(i) for i in range(requests_per_client)))
        bar.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    report.elapsed_s = time.perf_counter() - start
    return report


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the flags of the hello world's clients."""
    options = [
        click.option("--requests-per-client", type=click.IntRange(min=1), default=100, show_default=True),
        click.option("--clients", type=click.IntRange(min=1), default=1, show_default=True, help="Concurrent clients."),
        click.option(
            "--max-inflight-per-client",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Requests each client keeps in flight.",
        ),
        click.option("--operator", type=click.Choice(OPERATORS), default="encoder_decoder", show_default=True),
        click.option(
            "--input-size-mean",
            type=click.IntRange(min=0),
            default=1000,
            show_default=True,
            help="Mean number of int64 elements per request.",
        ),
        click.option("--input-size-stdev", type=click.FloatRange(min=0), default=0.0, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command()
@common_options
@client_options
@click.option(
    "--encoder-input-copies",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="The copies the deployment's encoder makes (to check --operator encoder/decoder).",
)
def main(scheduler_address: str | None, log_level: str, encoder_input_copies: int, **client_kwargs: Any) -> None:
    """Send requests to the hello world running at --scheduler-address and check every answer."""
    if not scheduler_address:
        raise click.UsageError("--scheduler-address is required (start one with python -m tdask.hello_world.deploy)")
    configure_logging(log_level)
    install_sigterm_as_interrupt()
    try:
        report = asyncio.run(_main(scheduler_address, encoder_input_copies, client_kwargs))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)


async def _main(address: str, copies: int, kwargs: dict[str, Any]) -> ClientReport:
    # tls:// addresses take their certificates from Dask's config (distributed.comm.tls.*).
    security = tls_security("tls", temporary=False) if address.startswith("tls://") else None
    async with Client(address, asynchronous=True, timeout=30, security=security) as client:
        return await run_clients(client, encoder_input_copies=copies, **kwargs)


if __name__ == "__main__":
    main()
