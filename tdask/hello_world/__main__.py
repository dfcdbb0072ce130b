"""``python -m tdask.hello_world`` (``tdask hello-world``): deploy on an embedded cluster, run the client, stop."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from tdask.cli import common_options, deployed
from tdask.hello_world import deployment_options
from tdask.hello_world.client import ClientReport, client_options, run_clients, where_to_look
from tdask.hello_world.deploy import build_deployment


@click.command()
@common_options
@deployment_options
@client_options
def main(
    requests_per_client: int,
    clients: int,
    max_inflight_per_client: int,
    operator: str,
    input_size_mean: int,
    input_size_stdev: float,
    **deploy_kwargs: Any,
) -> None:
    """Run the whole hello world: exit code 0 only when every response was correct."""
    # Everything runs in this process tree, so a throw-away certificate is enough for TLS.
    deployment = build_deployment(**deploy_kwargs, temporary_tls=True)
    with deployed(deployment, interrupted_exit_code=130, process_log="client.log"):

        async def run() -> ClientReport:
            from distributed import Client

            async with Client(deployment.scheduler_address, asynchronous=True, security=deployment.security) as c:
                return await run_clients(
                    c,
                    operator=operator,
                    clients=clients,
                    requests_per_client=requests_per_client,
                    input_size_mean=input_size_mean,
                    input_size_stdev=input_size_stdev,
                    max_inflight_per_client=max_inflight_per_client,
                    encoder_input_copies=deploy_kwargs["encoder_input_copies"],
                )

        report = asyncio.run(run())
        click.echo(report.summary())
        dashboard_link = deployment.dashboard_link
    # Said once the cluster has stopped, as it is then: no link to a dashboard that is gone.
    log_level = deploy_kwargs.get("log_level")
    click.echo(where_to_look(dashboard_link, deployment.log_dir, still_up=False, log_level=log_level))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
