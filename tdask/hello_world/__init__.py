"""The hello world: ``encoder`` and ``decoder`` (Triton models) behind ``encoder_decoder``.

``python -m tdask.hello_world`` runs it all on an embedded local cluster;
``python -m tdask.hello_world.deploy`` and ``python -m tdask.hello_world.client`` run the two
halves separately. This module holds what they share: the flags and how they become operators.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tdask.operator import OperatorConfig

if TYPE_CHECKING:
    from tdask.deployment import Deployment

MODEL_REPOSITORY = str(files("tdask") / "models")


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
) -> list[tuple[OperatorConfig, int]]:
    """The three operators of the hello world, with their worker counts."""

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
                implementation="tdask.hello_world.operators:EncoderDecoder",
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


def _non_negative(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value < 0:
        raise click.BadParameter(f"must be >= 0, got {value}")
    return value


def _at_least_one(ctx: click.Context, param: click.Parameter, value: int) -> int:
    return _positive(param.name or "value", value)


KIND = click.Choice(["CPU", "GPU"], case_sensitive=False)


def deployment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flags describing the deployment (shared by the embedded run and ``deploy``)."""
    options = [
        click.option("--encoders", type=(int, int, int, KIND), default=(1, 1, 1, "CPU"), show_default=True,
                     callback=_triton_group, metavar="N MAX_INFLIGHT INSTANCES CPU|GPU",
                     help="Encoder workers, requests in flight per worker, Triton instances per worker, device."),
        click.option("--decoders", type=(int, int, int, KIND), default=(1, 1, 1, "CPU"), show_default=True,
                     callback=_triton_group, metavar="N MAX_INFLIGHT INSTANCES CPU|GPU",
                     help="Decoder workers, requests in flight per worker, Triton instances per worker, device."),
        click.option("--encoder-decoders", type=(int, int), default=(1, 1), show_default=True,
                     callback=_python_group, metavar="N MAX_INFLIGHT",
                     help="encoder_decoder workers and requests in flight per worker."),
        click.option("--encoder-delay-per-token", type=float, default=0.0, show_default=True,
                     callback=_non_negative, help="Seconds the encoder sleeps per output element."),
        click.option("--decoder-delay-per-token", type=float, default=0.0, show_default=True,
                     callback=_non_negative, help="Seconds the decoder sleeps per output element."),
        click.option("--encoder-input-copies", type=int, default=1, show_default=True,
                     callback=_at_least_one, help="How many times the encoder tiles its input."),
        click.option("--log-dir", type=click.Path(file_okay=False), default="tdask-logs", show_default=True,
                     help="Per-worker log files and Triton logs."),
        click.option("--clear-logs", is_flag=True, help="Empty the log dir first."),
        click.option("--protocol", type=click.Choice(["tcp", "tls", "ucxx"]), default="tcp", show_default=True,
                     help="Dask comm protocol (ucxx needs the 'ucx' extra)."),
        click.option("--dashboard-address", default="127.0.0.1:8787", show_default=True,
                     help="Where the scheduler's dashboard listens (port 0: any free port)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flags shared by every hello world command."""
    options = [
        click.option("--scheduler-address", default=None,
                     help="A running scheduler to use instead of an embedded cluster."),
        click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
                     default="WARNING", show_default=True, help="Log level of tdask, Dask and Triton."),
    ]
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


def gpu_unavailable_reason() -> str | None:
    """Why GPU models cannot run here, or ``None`` when they can."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver was found (nvidia-smi is not on PATH)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CUDA reports no devices"
    except Exception as exc:  # ImportError, CUDARuntimeError
        return f"cupy cannot use a GPU ({type(exc).__name__}: {exc})"
    return None


def prepare_log_dir(log_dir: str, clear: bool) -> Path:
    path = Path(log_dir).resolve()
    if clear and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def configure_logging(level: str) -> None:
    """Apply ``--log-level`` here and (through dask.config) in the workers and Triton."""
    import os

    import dask.config

    level = level.upper()
    # Worker processes set up distributed's logging when they import it, before any config
    # reaches them; the environment they inherit is what they read then.
    os.environ["DASK_LOGGING__DISTRIBUTED"] = level.lower()
    for name in ("tdask", "distributed"):
        logging.getLogger(name).setLevel(level)
    dask.config.set(
        {
            "logging.distributed": level.lower(),
            "logging.tdask": level.lower(),
            "tdask.triton.log-verbose": 1 if level == "DEBUG" else 0,
        }
    )


@functools.cache
def install_sigterm_as_interrupt() -> None:
    """Make SIGTERM stop us the way Ctrl-C does, so the same cleanup runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def deployed(deployment: Deployment, *, interrupted_exit_code: int) -> Iterator[Deployment]:
    """Start ``deployment``, print where everything runs, and stop it whatever happens.

    Ctrl-C or SIGTERM exits with ``interrupted_exit_code``; a start that fails exits with 1 and
    its reason. Either way everything started is stopped first.
    """
    install_sigterm_as_interrupt()
    try:
        deployment.start()
        click.echo(deployment.describe())
        click.echo(f"logs: {deployment.log_dir}")
        yield deployment
    except KeyboardInterrupt:
        click.echo("interrupted; stopping everything", err=True)
        deployment.close()
        sys.exit(interrupted_exit_code)
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        deployment.close()
        sys.exit(1)
    finally:
        deployment.close()


def tls_security(protocol: str, *, temporary: bool) -> Any:
    """The ``distributed.Security`` for ``--protocol``: ``None`` unless it is ``tls``.

    Certificates come from Dask's config (``distributed.comm.tls.*``, e.g. the
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` environment variables), or, where allowed, are made
    for this run only.
    """
    if protocol != "tls":
        return None
    from distributed.security import Security

    configured = Security()
    if configured.tls_ca_file and configured.tls_scheduler_cert:
        return configured
    if not temporary:
        raise click.UsageError(
            "--protocol tls needs certificates that every process shares: set Dask's "
            "distributed.comm.tls.* config (e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
            "..._SCHEDULER__CERT, ..._WORKER__CERT, ..._CLIENT__CERT)"
        )
    try:
        return Security.temporary()
    except ImportError as exc:
        raise click.UsageError(f"--protocol tls without configured certificates needs {exc}") from None
