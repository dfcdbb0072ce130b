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
from distributed.comm import parse_address
from distributed.comm.registry import get_backend
from tqdm.auto import tqdm

from tdask.cli import common_options, configure_logging, install_sigterm_as_interrupt, tls_security
from tdask.config import RequestSettings
from tdask.exceptions import OperatorUnavailableError, TdaskError
from tdask.protocol import operator_key
from tdask.remote import RemoteOperator, Response
from tdask.request_plane import Registry

logger = logging.getLogger("tdask.hello_world")

OPERATORS = ["encoder_decoder", "encoder", "decoder"]
CONNECT_TIMEOUT_S = 5.0


@dataclass(kw_only=True)
class ClientReport:
    """What the clients measured; ``ok`` only when every response was right."""

    requests: int = 0
    correct: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    workers: dict[str, int] = field(default_factory=dict)
    dashboard_link: str | None = None

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


def where_to_look(
    dashboard_link: str | None, log_dir: Any = None, *, still_up: bool = True, log_level: str | None = None
) -> str:
    """The lines that end a report: tdask's dashboard page, the Prometheus metrics, the logs.

    Parameters
    ----------
    dashboard_link
        The scheduler's dashboard.
    log_dir
        The deployment's log directory, if any.
    still_up
        Whether the deployment still runs when these lines are read; ``False`` (the embedded
        hello world, which stops its cluster) names no link that is gone by then.
    log_level
        The level the run logged at: request ids are in the logs at DEBUG only.
    """
    lines = []
    if dashboard_link and still_up:
        base = dashboard_link.rsplit("/status", 1)[0]
        lines.append(f"Dashboard: {base}/tdask (rates, latency, errors, queues, in flight per worker)")
        lines.append(f"Metrics: {base}/metrics (Prometheus, whole cluster; every worker serves its own /metrics)")
    elif dashboard_link:
        lines.append(
            "Dashboard and metrics: stopped with this run's cluster; to keep them up, deploy with "
            "`python -m tdask.hello_world.deploy` and run `python -m tdask.hello_world.client --scheduler-address ...`"
        )
    if log_dir:
        if (log_level or "").upper() == "DEBUG":
            follow = "follow a request id: grep -r client0-0"
        else:
            follow = "run with --log-level debug to follow a request id through them: grep -r client0-0"
        lines.append(f"Logs: {log_dir} (one file per worker and process; {follow})")
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
    assert client.scheduler is not None  # set once the client is connected
    scheduler = client.scheduler
    names: dict[str, str] = {}

    async def learn_names() -> None:
        info = await scheduler.identity(n_workers=-1)
        names.update({addr: str(w.get("name", addr)) for addr, w in info["workers"].items()})

    await learn_names()
    answered_by: dict[tuple[str, ...], int] = {}  # (worker, encoder, decoder) addresses -> count

    def who(route: tuple[str, ...]) -> str:
        """``encoder_decoder.0 (encoder.1 -> decoder.0)``: the worker, and those it called."""
        worker, *called = (names.get(address, address) for address in route)
        return f"{worker} ({' -> '.join(called)})" if called and all(called) else worker

    def route_of(response: Response) -> tuple[str, ...]:
        called = tuple(response.parameters.get(k, "") for k in ("encoder", "decoder"))
        return (response.worker or "?", *called) if all(called) else (response.worker or "?",)

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
                route = route_of(response)
                answered_by[route] = answered_by.get(route, 0) + 1
                worker = who(route)
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
    if any(address not in names for route in answered_by for address in route):
        await learn_names()  # workers that joined meanwhile (restarted ones) are named too
    for route, count in answered_by.items():
        report.workers[who(route)] = report.workers.get(who(route), 0) + count
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
@click.option(
    "--wait-for",
    default="",
    metavar="OPERATOR[,OPERATOR...]",
    help="Before sending, wait until these operators are hosted (print who hosts them).",
)
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=180.0,
    show_default=True,
    help="Seconds --wait-for may wait.",
)
def main(
    scheduler_address: str | None,
    log_level: str,
    encoder_input_copies: int,
    wait_for: str,
    wait_timeout: float,
    **client_kwargs: Any,
) -> None:
    """Send requests to the hello world running at --scheduler-address and check every answer."""
    if not scheduler_address:
        raise click.UsageError("--scheduler-address is required (start one with python -m tdask.hello_world.deploy)")
    configure_logging(log_level)
    install_sigterm_as_interrupt()
    waits = [name.strip() for name in wait_for.split(",") if name.strip()]
    try:
        report = asyncio.run(_main(scheduler_address, encoder_input_copies, client_kwargs, waits, wait_timeout))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (OSError, TimeoutError, ValueError, TdaskError) as exc:
        # One line, within seconds: an unreachable scheduler, a wrong protocol, nobody hosting the operator.
        click.echo(f"tdask client: {scheduler_address}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    click.echo(report.summary())
    if report.dashboard_link:
        click.echo(where_to_look(report.dashboard_link))
    sys.exit(0 if report.ok else 1)


async def _main(
    address: str, copies: int, kwargs: dict[str, Any], wait_for: list[str], wait_timeout: float
) -> ClientReport:
    # tls:// addresses take their certificates from Dask's config (distributed.comm.tls.*).
    security = tls_security("tls", temporary=False) if address.startswith("tls://") else None
    get_backend(parse_address(address)[0])  # a wrong protocol: ValueError now, before a Client exists
    try:
        client = await Client(address, asynchronous=True, timeout=CONNECT_TIMEOUT_S, security=security)
    except OSError as exc:  # distributed wraps a refused or silent address in OSError after `timeout`
        raise OSError(f"cannot reach the scheduler within {CONNECT_TIMEOUT_S:g} s ({exc.__class__.__name__})") from None
    async with client:
        if wait_for:  # the operators a cluster started with this client will host: wait for them
            await wait_for_operators(client, wait_for, wait_timeout)
        operator = kwargs.get("operator", "encoder_decoder")
        await _wait_for_host(client, operator)
        report = await run_clients(client, encoder_input_copies=copies, **kwargs)
        try:
            report.dashboard_link = client.dashboard_link
        except Exception:  # no dashboard on that scheduler
            report.dashboard_link = None
        return report


async def _wait_for_host(client: Client, operator: str, wait_s: float | None = None) -> None:
    """Fail (one line) when no worker hosts ``operator`` within ``wait_s`` s.

    Default: ``tdask.request.unavailable-timeout`` (10 s), the bound every request has anyway; a
    hand-started cluster whose Triton workers are still loading models sets it higher.
    """
    if wait_s is None:
        wait_s = RequestSettings.read().unavailable_timeout_s
    registry = Registry(client.scheduler)
    deadline = time.monotonic() + wait_s
    while not await registry.hosts(operator_key(operator)):
        if time.monotonic() >= deadline:
            raise OperatorUnavailableError(
                f"no worker hosts operator {operator!r} (waited {wait_s:g} s); is the hello world deployed there?",
                operator=operator,
            )
        await asyncio.sleep(0.1)


async def wait_for_operators(client: Client, operators: list[str], timeout_s: float) -> None:
    """Wait until every one of ``operators`` is hosted, then print which workers host each."""
    deadline = time.monotonic() + timeout_s
    hosts = {}
    for name in operators:  # an operator not hosted in time: OperatorUnavailableError (one line)
        left = max(deadline - time.monotonic(), 1e-3)
        hosts[name] = await RemoteOperator(name, client=client).wait(timeout=left)
    assert client.scheduler is not None
    info = await client.scheduler.identity(n_workers=-1)
    names = {addr: str(w.get("name", addr)) for addr, w in info["workers"].items()}
    for name, addresses in hosts.items():
        click.echo(f"ready: {name} on {', '.join(sorted(names.get(a, a) for a in addresses))}")


if __name__ == "__main__":
    main()
