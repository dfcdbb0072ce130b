"""``python -m tdask.gateway`` / ``tdask gateway``: serve a deployment's operators on KServe v2."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, cast

import click

from tdask.cli import configure_logging
from tdask.gateway.core import Gateway
from tdask.gateway.limits import FrontDoor, Limits

__all__ = ["main"]


def _runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """``asyncio.run``, or ``uvloop.run`` for ``uvloop``."""
    if choice == "uvloop":
        import uvloop

        return cast(Callable[[Coroutine[Any, Any, None]], None], uvloop.run)
    return asyncio.run


async def _serve(gateway: Gateway) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with gateway:
        click.echo(
            f"tdask gateway for {gateway.scheduler_address}: "
            f"HTTP {gateway.host}:{gateway.http_port}, gRPC {gateway.host}:{gateway.grpc_port}"
            + (" (TLS)" if gateway.front_door.tls else "")
            + f"; event loop: {type(loop).__module__.split('.')[0]}",
        )
        await stop.wait()


@click.command(name="gateway", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scheduler-address", required=True, help="The scheduler of the tdask deployment to serve.")
@click.option("--host", default="127.0.0.1", show_default=True, help="The interface to bind (both protocols).")
@click.option("--http-port", type=int, default=8000, show_default=True, help="KServe v2 HTTP port (0: any free).")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="KServe v2 gRPC port (0: any free).")
@click.option(
    "--connect-timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the scheduler."
)
@click.option(
    "--max-request-bytes",
    default="256MiB",
    show_default=True,
    help="Largest request body / gRPC message (and gRPC response); larger: HTTP 413, RESOURCE_EXHAUSTED.",
)
@click.option(
    "--max-inflated-bytes",
    default="0",
    show_default=True,
    help="Inflate gzip/deflate HTTP bodies up to this size (413 past it); 0 refuses compressed bodies.",
)
@click.option(
    "--header-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to send a request's headers, and to stay idle between requests.",
)
@click.option("--body-timeout", type=float, default=120.0, show_default=True, help="Seconds to send a request's body.")
@click.option(
    "--max-connections", type=int, default=1000, show_default=True, help="Open HTTP connections / gRPC calls at most."
)
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Server certificate (PEM), both protocols."
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Server key (PEM).")
@click.option(
    "--tls-ca", type=click.Path(exists=True, dir_okay=False), help="Require client certificates signed by these CAs."
)
@click.option(
    "--auth-token",
    envvar="TDASK_GATEWAY_AUTH_TOKEN",
    help="Bearer token every call must carry (health endpoints excepted); also from $TDASK_GATEWAY_AUTH_TOKEN.",
)
@click.option("--insecure", is_flag=True, help="Serve plain text in front of a tls:// cluster.")
@click.option(
    "--event-loop",
    type=click.Choice(["asyncio", "uvloop"]),
    default="asyncio",
    show_default=True,
    help="The gateway's event loop. uvloop measured no better here, and gRPC's p99 worse (docs/performance.md).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="WARNING",
    show_default=True,
    help="Log level of tdask and Dask.",
)
def main(
    scheduler_address: str,
    host: str,
    http_port: int,
    grpc_port: int,
    connect_timeout: float,
    max_request_bytes: str,
    max_inflated_bytes: str,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    auth_token: str | None,
    insecure: bool,
    event_loop: str,
    log_level: str,
) -> None:
    """Serve every tdask operator as a model on Triton's KServe v2 HTTP and gRPC protocols."""
    from dask.utils import parse_bytes

    configure_logging(log_level)
    try:
        limits = Limits(
            max_request_bytes=parse_bytes(max_request_bytes),
            max_inflated_bytes=parse_bytes(max_inflated_bytes),
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
        )
        front_door = FrontDoor(
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, auth_token=auth_token or None, insecure=insecure
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    gateway = Gateway(
        scheduler_address,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        connect_timeout=connect_timeout,
        limits=limits,
        front_door=front_door,
    )
    try:
        _runner(event_loop)(_serve(gateway))
    except (OSError, TimeoutError, ValueError) as exc:
        click.echo(f"tdask gateway: cannot serve {scheduler_address}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
