"""``--preload tdask.worker``: host tdask operators on a worker started by ``dask worker``.

``dask worker ADDR --preload tdask.worker --tdask-operator '{"name": ..., "implementation": ...}'``
(and the same with ``dask cuda worker``). The preload adds an :class:`~tdask.host.plugin.OperatorHost`;
distributed only logs preload failures, so the host records them in the scheduler's registry,
where callers get :class:`~tdask.exceptions.OperatorUnavailableError` with the worker's message.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import sys
import time
from pathlib import Path

import click
import yaml
from distributed import Worker

from tdask.host.plugin import PLUGIN_NAME, OperatorHost
from tdask.operator import OperatorConfig

logger = logging.getLogger(__name__)

__all__ = ["cuda_worker_unavailable_reason", "dask_setup", "parse_operator_option"]

# The command lines that start dask-cuda's CUDAWorker (click's command path of each).
_CUDA_WORKER_COMMANDS = ("dask cuda worker", "dask-cuda-worker")
# Every command line that starts a worker with this preload (click's command path of each).
_WORKER_COMMANDS = ("dask worker", "dask-worker", "dask_worker", *_CUDA_WORKER_COMMANDS)


def cuda_worker_unavailable_reason() -> str | None:
    """Say why ``dask cuda worker`` cannot start here: NVML (which dask-cuda needs) or no GPU.

    Returns
    -------
    str or None
        The reason, or ``None`` when NVML loads and reports at least one GPU.
    """
    try:
        import pynvml  # nvidia-ml-py, a dependency of dask-cuda

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return f"NVML cannot be used ({type(exc).__name__}: {exc})"
    return None if count > 0 else "NVML reports no GPU"


def _refuse_cuda_worker_without_gpu() -> None:
    """Exit with one line when ``dask cuda worker`` runs this preload on a machine without a GPU.

    dask-cuda imports the preload while it parses its command line, before it looks for GPUs;
    without one it fails with a traceback through pynvml. Only the real command line is
    stopped (click's command path and ``sys.argv`` both name it), not code that merely parses
    such a command line.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.command_path not in _CUDA_WORKER_COMMANDS:
        return
    program = " ".join([sys.argv[0].rsplit("/", 1)[-1], *sys.argv[1:3]])
    if not (program.startswith("dask cuda worker") or program.startswith("dask-cuda-worker")):
        return
    reason = cuda_worker_unavailable_reason()
    if reason is not None:
        sys.exit(
            f"tdask: `{ctx.command_path}` needs an NVIDIA GPU and this machine has none it can use: {reason}. "
            "Without a GPU, start the worker with `dask worker` and the same arguments."
        )


_refuse_cuda_worker_without_gpu()


def parse_operator_option(text: str) -> list[OperatorConfig]:
    """Read ``--tdask-operator``: a JSON object or list, or ``@path`` to a JSON/YAML file.

    Raises
    ------
    click.BadParameter
        Not JSON (or the file cannot be read or is not YAML), not an object, an unknown field
        (with the closest known one), or a value :class:`OperatorConfig` refuses.
    """
    if text.startswith("@"):
        try:
            data = yaml.safe_load(Path(text[1:]).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"cannot read {text[1:]}: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}: {_shorten(text)}") from None
    items = data if isinstance(data, list) else [data]
    known = [f.name for f in dataclasses.fields(OperatorConfig)]
    configs = []
    for item in items:
        if not isinstance(item, dict):
            raise click.BadParameter(f"expected an object describing an operator, got {item!r}")
        for key in item:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
                raise click.BadParameter(f"unknown field {key!r} ({hint})")
        missing = [name for name in ("name", "implementation") if name not in item]
        if missing:
            raise click.BadParameter(f"missing field {missing[0]!r} in {json.dumps(item)}")
        try:
            configs.append(OperatorConfig(**item))
        except (TypeError, ValueError) as exc:
            raise click.BadParameter(str(exc)) from None
    return configs


def _starts_a_worker(ctx: click.Context) -> bool:
    """Whether ``ctx`` starts a worker: ``dask worker``, ``python -m distributed.cli.dask_worker``, ..."""
    # `python -m distributed.cli.dask_worker` (what dask-jobqueue runs) has no command path of its own.
    named = ctx.command.name in ("worker", "dask-worker", "dask_worker", "dask-cuda-worker")
    return ctx.command_path in _WORKER_COMMANDS or (named and "preload" in ctx.params)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_operators(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Validate every ``--tdask-operator`` while the command line is parsed.

    ``dask worker`` parses its preload's options before it starts anything
    (``distributed.preloading.validate_preload_argv``): there a malformed operator stops the
    command with one line on stderr and exit status 1, instead of a worker that joins the
    cluster hosting nothing. Elsewhere (a ``Worker(preload_argv=...)`` in Python) the error is a
    :class:`click.BadParameter`, which distributed logs.
    """
    for text in value:
        try:
            parse_operator_option(text)
        except click.BadParameter as exc:
            outer = click.get_current_context(silent=True)
            if outer is not None and _starts_a_worker(outer):
                sys.exit(f"tdask: --tdask-operator: {exc.message}")
            raise
    return value


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--tdask-operator",
    "operators",
    multiple=True,
    required=True,
    callback=_check_operators,
    help='An operator to host, as JSON ({"name": ..., "implementation": ..., ...}) or @file.',
)
@click.option("--tdask-log-dir", "log_dir", default=None, help="Directory for Triton's and operators' logs.")
async def dask_setup(worker: Worker, operators: tuple[str, ...], log_dir: str | None) -> None:
    """Host tdask operators on a worker started with ``--preload tdask.worker``."""
    configs = [config for text in operators for config in parse_operator_option(text)]
    host = OperatorHost(configs, log_dir=log_dir)
    started = time.monotonic()
    try:
        await worker.plugin_add(plugin=host, name=PLUGIN_NAME, catch_errors=False)
    except Exception as exc:
        # distributed only logs preload failures; the host already recorded them in the
        # scheduler's registry, so callers get OperatorUnavailableError with this message.
        logger.error("tdask preload failed on %s: %s", worker.address, exc)
        worker.log_event("tdask", {"action": "preload-failed", "error": str(exc)})
        return
    logger.info(
        "tdask hosting %s on %s (setup %.1fs)",
        [c.key for c in configs],
        worker.address,
        time.monotonic() - started,
    )
