"""``python -m tdask.hello_world.deploy`` (``tdask deploy``): keep the hello world deployed until Ctrl-C or SIGTERM."""

from __future__ import annotations

import time
from typing import Any

import click

from tdask.cli import common_options, configure_logging, deployed, prepare_log_dir, tls_security
from tdask.deployment import Deployment
from tdask.hello_world import (
    MODEL_REPOSITORY,
    PythonGroup,
    TritonGroup,
    check_gpu_request,
    deployment_options,
    hello_world_operators,
)


def build_deployment(
    *,
    scheduler_address: str | None,
    encoders: TritonGroup,
    decoders: TritonGroup,
    encoder_decoders: PythonGroup,
    encoder_delay_per_token: float,
    decoder_delay_per_token: float,
    encoder_input_copies: int,
    log_dir: str,
    clear_logs: bool,
    protocol: str,
    dashboard_address: str,
    log_level: str,
    model_repository: str = MODEL_REPOSITORY,
    operator_repository: str | None = None,
    temporary_tls: bool = False,
    colocate: bool = False,
) -> Deployment:
    """Turn the shared flags into a (not yet started) Deployment.

    ``temporary_tls``: with ``--protocol tls`` and no certificates in Dask's config, make a
    throw-away CA and certificate (fine when nothing outside this process must connect).
    ``colocate``: decoder and encoder_decoder on every encoder worker (``Deployment(colocate=...)``).
    """
    check_gpu_request(encoders, decoders)
    if colocate and (decoders.workers != 1 or encoder_decoders.workers != 1):
        raise click.UsageError(
            "--colocate runs decoder and encoder_decoder on every encoder worker: give the number of workers "
            f"with --encoders, not --decoders ({decoders.workers}) or --encoder-decoders ({encoder_decoders.workers})"
        )
    security = tls_security(protocol, temporary=temporary_tls)
    configure_logging(log_level)
    operators = hello_world_operators(
        encoders=encoders,
        decoders=decoders,
        encoder_decoders=encoder_decoders,
        encoder_delay_per_token=encoder_delay_per_token,
        decoder_delay_per_token=decoder_delay_per_token,
        encoder_input_copies=encoder_input_copies,
        log_level=log_level,
        model_repository=model_repository,
        operator_repository=operator_repository,
    )
    return Deployment(
        operators,
        scheduler_address=scheduler_address,
        protocol=protocol,
        security=security,
        dashboard_address=dashboard_address,
        log_dir=prepare_log_dir(log_dir, clear_logs),
        log_level=log_level,
        colocate={"decoder": "encoder", "encoder_decoder": "encoder"} if colocate else None,
    )


@click.command()
@common_options
@deployment_options
def main(**kwargs: Any) -> None:
    """Deploy encoder, decoder and encoder_decoder, print how to reach them, and wait."""
    deployment = build_deployment(**kwargs)
    # Ctrl-C / SIGTERM is how this command is meant to end: exit code 0.
    with deployed(deployment, interrupted_exit_code=0, process_log="scheduler.log"):
        click.echo(
            "run the client with:\n"
            f"  python -m tdask.hello_world.client --scheduler-address {deployment.scheduler_address}"
            + (
                f" --encoder-input-copies {kwargs['encoder_input_copies']}"
                if kwargs["encoder_input_copies"] != 1
                else ""
            )
        )
        click.echo("deployed; press Ctrl-C to stop", err=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
