"""``python -m tdask.gateway`` / ``tdask gateway``: serve a deployment's operators on KServe v2."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from tdask.cli import configure_logging
from tdask.gateway.core import Gateway

__all__ = ["main"]


async def _serve(gateway: Gateway) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with gateway:
        click.echo(
            f"tdask gateway for {gateway.scheduler_address}: "
            f"HTTP {gateway.host}:{gateway.http_port}, gRPC {gateway.host}:{gateway.grpc_port}",
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
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="WARNING",
    show_default=True,
    help="Log level of tdask and Dask.",
)
def main(
    scheduler_address: str, host: str, http_port: int, grpc_port: int, connect_timeout: float, log_level: str
) -> None:
    """Serve every tdask operator as a model on Triton's KServe v2 HTTP and gRPC protocols."""
    configure_logging(log_level)
    gateway = Gateway(
        scheduler_address, host=host, http_port=http_port, grpc_port=grpc_port, connect_timeout=connect_timeout
    )
    try:
        asyncio.run(_serve(gateway))
    except (OSError, TimeoutError, ValueError) as exc:
        click.echo(f"tdask gateway: cannot serve {scheduler_address}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
