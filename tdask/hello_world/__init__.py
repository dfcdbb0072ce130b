"""The hello world: ``encoder`` and ``decoder`` (Triton models) behind ``encoder_decoder``.

``python -m tdask.hello_world`` (or ``tdask hello-world``) runs it all on an embedded local
cluster; ``python -m tdask.hello_world.deploy`` and ``python -m tdask.hello_world.client``
(``tdask deploy``, ``tdask client``) run the two halves separately. This module holds what they
share: the hello world's flags and how they become operators; the flags and behaviour of any
tdask command come from :mod:`tdask.cli`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import click

from tdask.cli import cluster_options, gpu_unavailable_reason
from tdask.operator import OperatorConfig


def _find_model_repository() -> str:
    """Where the hello world's Triton models are: inside the installed package, or the checkout's ``models/``.

    A wheel carries the top-level ``models/`` as ``tdask/models`` (pyproject's package-dir); an
    editable install, or a checkout on ``sys.path``, imports tdask from the checkout, next to
    ``models/``.
    """
    packaged = files("tdask") / "models"
    if (packaged / "encoder" / "config.pbtxt").is_file():
        return str(packaged)
    checkout = Path(__file__).resolve().parent.parent.parent / "models"
    return str(checkout if checkout.is_dir() else packaged)


#: The hello world's Triton model repository (``encoder``, ``decoder``).
MODEL_REPOSITORY = _find_model_repository()


@dataclass(kw_only=True)
class TritonGroup:
    """``--encoders N MAX_INFLIGHT INSTANCES CPU|GPU``: N workers, each with INSTANCES model instances."""

    workers: int
    max_inflight: int
    instances: int
    kind: str


@dataclass(kw_only=True)
class PythonGroup:
    """``--encoder-decoders N MAX_INFLIGHT``."""

    workers: int
    max_inflight: int


def hello_world_operators(
    *,
    encoders: TritonGroup,
    decoders: TritonGroup,
    encoder_decoders: PythonGroup,
    encoder_delay_per_token: float = 0.0,
    decoder_delay_per_token: float = 0.0,
    encoder_input_copies: int = 1,
    log_level: str | None = None,
    model_repository: str = MODEL_REPOSITORY,
    operator_repository: str | None = None,
) -> list[tuple[OperatorConfig, int]]:
    """Return the three operators of the hello world, with their worker counts.

    ``model_repository`` holds the ``encoder`` and ``decoder`` Triton models; with
    ``operator_repository``, ``encoder_decoder`` is the class ``EncoderDecoder`` of its
    ``encoder_decoder.py`` instead of tdask's own.
    """

    def triton(name: str, group: TritonGroup, parameters: dict[str, str]) -> tuple[OperatorConfig, int]:
        config = {
            "instance_group": [{"kind": f"KIND_{group.kind}", "count": group.instances}],
            "parameters": {k: {"string_value": v} for k, v in parameters.items()},
        }
        return (
            OperatorConfig(
                name=name,
                implementation="triton",
                repository=model_repository,
                max_inflight_requests=group.max_inflight,
                parameters={"config": config},
                log_level=log_level,
            ),
            group.workers,
        )

    return [
        triton(
            "encoder",
            encoders,
            {"input_copies": str(encoder_input_copies), "delay": repr(float(encoder_delay_per_token))},
        ),
        triton("decoder", decoders, {"delay": repr(float(decoder_delay_per_token))}),
        (
            OperatorConfig(
                name="encoder_decoder",
                implementation=(
                    "encoder_decoder:EncoderDecoder"
                    if operator_repository
                    else "tdask.hello_world.operators:EncoderDecoder"
                ),
                repository=operator_repository,
                max_inflight_requests=encoder_decoders.max_inflight,
                log_level=log_level,
            ),
            encoder_decoders.workers,
        ),
    ]


# -- shared click options ---------------------------------------------------------------------


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise click.BadParameter(f"{name} must be >= 1, got {value}")
    return value


def _triton_group(ctx: click.Context, param: click.Parameter, value: tuple[Any, ...]) -> TritonGroup:
    workers, max_inflight, instances, kind = value
    return TritonGroup(
        workers=_positive("N", workers),
        max_inflight=_positive("MAX_INFLIGHT", max_inflight),
        instances=_positive("INSTANCES", instances),
        kind=kind.upper(),
    )


def _python_group(ctx: click.Context, param: click.Parameter, value: tuple[int, int]) -> PythonGroup:
    return PythonGroup(workers=_positive("N", value[0]), max_inflight=_positive("MAX_INFLIGHT", value[1]))


def _model_repository(ctx: click.Context, param: click.Parameter, value: str) -> str:
    missing = [m for m in ("encoder", "decoder") if not os.path.isfile(os.path.join(value, m, "config.pbtxt"))]
    if missing:
        raise click.BadParameter(
            f"{value} has no {' or '.join(f'{m}/config.pbtxt' for m in missing)} (the hello world's models); "
            "to serve your own repository's models: tdask serve --model-repository DIR"
        )
    return os.path.abspath(value)


def _operator_repository(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not os.path.isfile(os.path.join(value, "encoder_decoder.py")):
        raise click.BadParameter(f"{value} has no encoder_decoder.py (defining class EncoderDecoder)")
    return None if value is None else os.path.abspath(value)


def _non_negative(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


def _at_least_one(ctx: click.Context, param: click.Parameter, value: int) -> int:
    return _positive(param.name or "value", value)


KIND = click.Choice(["CPU", "GPU"], case_sensitive=False)


def deployment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the flags describing the deployment (shared by the embedded run and ``deploy``)."""
    options = [
        click.option(
            "--encoders",
            type=(int, int, int, KIND),
            default=(1, 1, 1, "CPU"),
            show_default=True,
            callback=_triton_group,
            metavar="N MAX_INFLIGHT INSTANCES CPU|GPU",
            help="Encoder workers, requests in flight per worker, Triton instances per worker, device.",
        ),
        click.option(
            "--decoders",
            type=(int, int, int, KIND),
            default=(1, 1, 1, "CPU"),
            show_default=True,
            callback=_triton_group,
            metavar="N MAX_INFLIGHT INSTANCES CPU|GPU",
            help="Decoder workers, requests in flight per worker, Triton instances per worker, device.",
        ),
        click.option(
            "--encoder-decoders",
            type=(int, int),
            default=(1, 1),
            show_default=True,
            callback=_python_group,
            metavar="N MAX_INFLIGHT",
            help="encoder_decoder workers and requests in flight per worker.",
        ),
        click.option(
            "--encoder-delay-per-token",
            type=float,
            default=0.0,
            show_default=True,
            callback=_non_negative,
            help="Seconds the encoder sleeps per output element.",
        ),
        click.option(
            "--decoder-delay-per-token",
            type=float,
            default=0.0,
            show_default=True,
            callback=_non_negative,
            help="Seconds the decoder sleeps per output element.",
        ),
        click.option(
            "--encoder-input-copies",
            type=int,
            default=1,
            show_default=True,
            callback=_at_least_one,
            help="How many times the encoder tiles its input.",
        ),
    ]
    options += [
        click.option(
            "--triton-core-models",
            "model_repository",
            type=click.Path(exists=True, file_okay=False),
            default=MODEL_REPOSITORY,
            show_default="tdask's own",
            callback=_model_repository,
            help="Triton model repository holding the encoder and decoder models.",
        ),
        click.option(
            "--colocate",
            is_flag=True,
            default=False,
            help="Run decoder and encoder_decoder on every encoder worker (one Triton server for both models; "
            "the orchestrator's calls stay in process): --encoders sets the workers, the others take no count.",
        ),
        click.option(
            "--operator-repository",
            type=click.Path(exists=True, file_okay=False),
            default=None,
            callback=_operator_repository,
            help="Directory of Python operators: encoder_decoder is EncoderDecoder of its encoder_decoder.py.",
        ),
    ]
    fn = cluster_options(fn)  # --log-dir, --clear-logs, --protocol, --dashboard-address, after these
    for option in reversed(options):
        fn = option(fn)
    return fn


def check_gpu_request(*groups: TritonGroup) -> None:
    """Refuse ``GPU`` where no NVIDIA GPU can be used, with a sentence saying why."""
    if not any(g.kind == "GPU" for g in groups):
        return
    reason = gpu_unavailable_reason()
    if reason:
        raise click.UsageError(f"GPU instances were requested, but {reason}; use CPU")
