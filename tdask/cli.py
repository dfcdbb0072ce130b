"""The ``tdask`` command group, and what tdask's commands share.

``tdask check`` says whether this machine can run tdask's Triton operators. ``tdask hello-world``,
``tdask deploy`` and ``tdask client`` are the hello world's three commands (also
``python -m tdask.hello_world[.deploy|.client]``); the group finds them by import string when
one is asked for, so this module never imports :mod:`tdask.hello_world` (which sits above it and
builds its commands from the helpers here). The group is registered as the ``tdask`` console
script and as ``dask tdask`` (the ``dask_cli`` entry point).

The helpers: option decorators (:func:`common_options`, :func:`cluster_options`),
:func:`configure_logging`, :func:`prepare_log_dir`, :func:`tls_security`,
:func:`install_sigterm_as_interrupt`, :func:`deployed` and :func:`gpu_unavailable_reason`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tdask import __version__

if TYPE_CHECKING:
    from tdask.deployment import Deployment

__all__ = [
    "Check",
    "LazyGroup",
    "cluster_options",
    "common_options",
    "configure_logging",
    "deployed",
    "gpu_unavailable_reason",
    "install_sigterm_as_interrupt",
    "main",
    "prepare_log_dir",
    "run_checks",
    "temporary_credentials",
    "tls_security",
]

# -- shared click options -----------------------------------------------------------------------


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the flags of every command that reaches a cluster: ``--scheduler-address``, ``--log-level``."""
    options = [
        click.option(
            "--scheduler-address", default=None, help="A running scheduler to use instead of an embedded cluster."
        ),
        click.option(
            "--log-level",
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            default="WARNING",
            show_default=True,
            help="Log level of tdask, Dask and Triton.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the flags of a command that starts workers: logs, comm protocol, dashboard."""
    options = [
        click.option(
            "--log-dir",
            type=click.Path(file_okay=False),
            default="tdask-logs",
            show_default=True,
            help="Per-worker log files and Triton logs.",
        ),
        click.option("--clear-logs", is_flag=True, help="Empty the log dir first."),
        click.option(
            "--protocol",
            type=click.Choice(["tcp", "tls", "ucxx"]),
            default="tcp",
            show_default=True,
            help="Dask comm protocol (ucxx needs the 'ucx' extra).",
        ),
        click.option(
            "--dashboard-address",
            default="127.0.0.1:8787",
            show_default=True,
            help="Where the scheduler's dashboard listens (port 0: any free port).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# -- shared behaviour ---------------------------------------------------------------------------


def gpu_unavailable_reason() -> str | None:
    """Say why GPU models cannot run here.

    Returns
    -------
    str or None
        The reason (no driver, no device, cupy missing or failing), or ``None`` when a GPU
        can be used.
    """
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
    """Create ``log_dir`` (emptied first with ``clear``) and return its absolute path."""
    path = Path(log_dir).resolve()
    if clear and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def configure_logging(level: str) -> None:
    """Apply ``--log-level`` here and (through dask.config) in the workers and Triton."""
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
    """Make SIGTERM stop this process the way Ctrl-C does, so the same cleanup runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def deployed(
    deployment: Deployment, *, interrupted_exit_code: int, process_log: str | None = None
) -> Iterator[Deployment]:
    """Start ``deployment``, print where everything runs, and stop it whatever happens.

    Ctrl-C or SIGTERM exits with ``interrupted_exit_code``; a start that fails exits with 1 and
    its reason. Either way everything started is stopped first.

    Parameters
    ----------
    deployment
        A deployment not yet started.
    interrupted_exit_code
        The exit status after Ctrl-C or SIGTERM (0 for a command meant to end that way).
    process_log
        Also copy this process's ``tdask`` and ``distributed`` log lines (the scheduler's, the
        callers') into this file of the deployment's log dir, beside the workers' own.
    """
    install_sigterm_as_interrupt()
    handler = _log_to_file(deployment.log_dir / process_log) if process_log and deployment.log_dir else None
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
        if handler is not None:
            for name in ("tdask", "distributed"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()


def _log_to_file(path: Path) -> logging.Handler:
    """Copy this process's ``tdask`` and ``distributed`` log lines into ``path`` (as each worker does)."""
    import dask.config

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
    for name in ("tdask", "distributed"):
        logging.getLogger(name).addHandler(handler)
    return handler


@contextlib.contextmanager
def temporary_credentials(security: Any) -> Iterator[dict[str, str]]:
    """Temporary TLS's client credentials in files, for the commands that operate the deployment.

    Those commands are ``tdask status``, ``scale``, ``adapt``, ``update`` and ``model``.
    :meth:`distributed.security.Security.temporary` keeps its CA and certificate in memory, so
    no other process could reach the cluster. The CA, the client certificate and its key are
    written to a new directory only this user can read (0700; files 0600), removed on exit.
    That certificate is every role's (``Security.temporary`` makes one): whoever can read the
    files can join the cluster, as whoever runs ``tdask serve`` already can.

    Yields
    ------
    dict
        The Dask config variables that point the other commands at them
        (``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` and the client's cert and key).
    """
    import tempfile

    directory = tempfile.mkdtemp(prefix="tdask-tls-")  # mode 0700
    try:
        env = {}
        for variable, name, pem in (
            ("DASK_DISTRIBUTED__COMM__TLS__CA_FILE", "ca.pem", security.tls_ca_file),
            ("DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT", "client.pem", security.tls_client_cert),
            ("DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY", "client.key", security.tls_client_key),
        ):
            path = os.path.join(directory, name)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(pem)
            env[variable] = path
        yield env
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def tls_security(protocol: str, *, temporary: bool) -> Any:
    """Return the ``distributed.Security`` for ``--protocol``: ``None`` unless it is ``tls``.

    Certificates come from Dask's config (``distributed.comm.tls.*``, e.g. the
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` environment variables), or, where allowed, are made
    for this run only.

    Parameters
    ----------
    protocol
        The ``--protocol`` value.
    temporary
        Whether a throw-away CA and certificate may be made when none is configured (fine when
        nothing outside this process tree must connect).

    Raises
    ------
    click.UsageError
        TLS without configured certificates where ``temporary`` is not allowed (or cannot be
        made: the ``cryptography`` package is missing).
    """
    if protocol != "tls":
        return None
    from distributed.security import Security

    configured = Security()
    # Security sets its tls_* attributes from the config at run time (they are not declared).
    if getattr(configured, "tls_ca_file", None) and getattr(configured, "tls_scheduler_cert", None):
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


# -- the group ----------------------------------------------------------------------------------


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when one is asked for.

    Parameters
    ----------
    lazy_commands
        Command name to ``"module:attribute"`` of a :class:`click.Command`.
    **kwargs
        Passed to :class:`click.Group`.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Return the names of the eager and the lazy commands, sorted."""
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Return the command ``cmd_name``, importing it first if it is a lazy one."""
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is a {type(command).__name__}, not a click command")
        return command


@click.group(
    name="tdask",
    cls=LazyGroup,
    lazy_commands={
        "hello-world": "tdask.hello_world.__main__:main",
        "deploy": "tdask.hello_world.deploy:main",
        "client": "tdask.hello_world.client:main",
        "gateway": "tdask.gateway.cli:main",
        # Operating a running deployment (tdask/operate.py).
        "status": "tdask.operate:status",
        "scale": "tdask.operate:scale",
        "adapt": "tdask.operate:adapt",
        "update": "tdask.operate:update",
        "model": "tdask.operate:model",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(version=__version__, prog_name="tdask")
def main() -> None:
    """Distributed inference pipelines on Dask, with Triton models and Python operators."""


# -- tdask check --------------------------------------------------------------------------------

#: numpy releases the bundled Triton's python backend works with (numpy 2 gives empty tensors).
_NUMPY_BELOW = 2


@dataclass
class Check:
    """One line of ``tdask check``.

    Attributes
    ----------
    name : str
        What was checked.
    ok : bool
        Whether it passed.
    detail : str
        What was found, or why it failed.
    required : bool
        Whether a failure makes ``tdask check`` fail (else it is a warning).
    """

    name: str
    ok: bool
    detail: str
    required: bool = True

    @property
    def status(self) -> str:
        """``OK``, ``FAIL`` (a required check failed) or ``WARN`` (an optional one)."""
        if self.ok:
            return "OK"
        return "FAIL" if self.required else "WARN"


def _check_triton() -> tuple[Check, Check]:
    """Check that a ``tritonserver`` is found, and that it has a python-backend stub for this Python."""
    from tdask.triton.binary import OPT_TRITONSERVER, find_tritonserver, python_backend_stub

    python = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    try:
        binary = find_tritonserver()
    except FileNotFoundError as exc:
        return Check("tritonserver", False, str(exc)), Check("python-stub", False, "no tritonserver to look next to")
    if os.environ.get("TDASK_TRITONSERVER"):
        origin = "$TDASK_TRITONSERVER"
    elif binary.bundle_root is not None:
        origin = "the nvidia-pytriton wheel"
    elif binary.path == OPT_TRITONSERVER:
        origin = str(OPT_TRITONSERVER.parent.parent)
    else:
        origin = "PATH"
    found = Check("tritonserver", True, f"{binary.path} (from {origin})")
    stub = python_backend_stub(binary)
    if stub is not None:
        return found, Check("python-stub", True, f"{stub} ({python})")
    if binary.bundle_root is not None:
        versions = sorted(p.name for p in (binary.bundle_root / "python_backend_stubs").glob("*") if p.is_dir())
        reason = f"the bundle has no stub for {python} (it has: {', '.join(versions) or 'none'})"
    else:
        reason = f"no triton_python_backend_stub in {binary.path.resolve().parent.parent / 'backends' / 'python'}"
    return found, Check("python-stub", False, f"{reason}; Triton python-backend models cannot run")


def _check_in_process() -> Check:
    """Check Triton's library for the in-process mode (required when it is the mode): found, API version, shim."""
    import dask.config

    from tdask.triton import capi, shim

    mode = dask.config.get("tdask.triton.mode", "in-process")
    required = mode == "in-process"
    try:
        api = capi.TritonCApi.load()
    except (OSError, RuntimeError) as exc:
        return Check("in-process", False, f"tdask.triton.mode: {mode}; {exc}", required=required)
    built = shim.find_shim()
    if built is not None:
        callbacks = f"C shim {built}"
    elif shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc"):
        callbacks = "C shim built on first use"
    else:
        callbacks = "Python (no C compiler: `python -m tdask.triton.capi --build-shim` where there is one)"
    detail = f"tdask.triton.mode: {mode}; {api.path} (C API {api.version[0]}.{api.version[1]}); callbacks: {callbacks}"
    return Check("in-process", True, detail, required=required)


def _check_numpy() -> Check:
    import numpy

    major = int(numpy.__version__.split(".")[0])
    if major < _NUMPY_BELOW:
        return Check(
            "numpy", True, f"{numpy.__version__} (< 2, as the python backend of the bundled Triton 2.51 needs)"
        )
    return Check(
        "numpy",
        False,
        f"{numpy.__version__}: the python backend of the bundled Triton 2.51 needs numpy < 2 "
        "(it returns empty tensors under numpy 2); pip install 'numpy<2'",
    )


def _check_loopback() -> Check:
    """Check that two free ports can be bound and listened on at 127.0.0.1 at once."""
    try:
        with socket.socket() as first, socket.socket() as second:
            for sock in (first, second):
                sock.bind(("127.0.0.1", 0))
                sock.listen()
            ports = [first.getsockname()[1], second.getsockname()[1]]
    except OSError as exc:
        return Check("loopback", False, f"cannot listen on a free port of 127.0.0.1: {exc}")
    return Check("loopback", True, f"127.0.0.1 binds free ports (e.g. {ports[0]}, {ports[1]})")


def _check_versions() -> Check:
    import dask
    import distributed

    python = ".".join(map(str, sys.version_info[:3]))
    detail = f"tdask {__version__}, dask {dask.__version__}, distributed {distributed.__version__}"
    return Check("versions", True, f"{detail}, python {python}")


def _check_gpu() -> Check:
    reason = gpu_unavailable_reason()
    if reason is None:
        return Check("gpu", True, "KIND_GPU instances and cupy tensors can be used", required=False)
    return Check("gpu", False, f"{reason}; CPU (KIND_CPU) models only", required=False)


def run_checks() -> list[Check]:
    """Run every check of ``tdask check``.

    Returns
    -------
    list of Check
        In the order they are reported.
    """
    return [*_check_triton(), _check_in_process(), _check_numpy(), _check_loopback(), _check_versions(), _check_gpu()]


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def check(as_json: bool) -> None:
    """Check that this machine can run tdask's Triton operators (exit status 1 if not)."""
    checks = run_checks()
    ok = all(c.ok for c in checks if c.required)
    if as_json:
        checks_out = [{**asdict(c), "status": c.status} for c in checks]
        click.echo(json.dumps({"ok": ok, "checks": checks_out}))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{c.status:<4} {c.name:<{width}}  {c.detail}")
    sys.exit(0 if ok else 1)


# -- tdask serve, tdask status ------------------------------------------------------------------


@main.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--model-repository",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Serve every model of this Triton model repository (instead of a FILE), as tritonserver does.",
)
@click.option(
    "--workers-per-model", type=click.IntRange(min=1), default=1, show_default=True, help="With --model-repository."
)
@click.option(
    "--max-inflight-requests",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Per worker, with --model-repository.",
)
@click.option("--scheduler-address", default=None, help="Join this running scheduler (overrides the file).")
@click.option("--scheduler-port", type=click.IntRange(0, 65535), default=None, help="Port of the scheduler started.")
@click.option("--dashboard-address", default=None, help="Where the scheduler's dashboard listens (overrides the file).")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None, help="Per-worker logs (overrides the file).")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Log level of tdask, Dask and Triton (overrides the file).",
)
@click.option("--check", "check_only", is_flag=True, help="Validate, print what would start, and exit.")
def serve(
    file: str | None,
    model_repository: str | None,
    workers_per_model: int,
    max_inflight_requests: int,
    scheduler_address: str | None,
    scheduler_port: int | None,
    dashboard_address: str | None,
    log_dir: str | None,
    log_level: str | None,
    check_only: bool,
) -> None:
    """Serve a deployment FILE (or every model of --model-repository) until Ctrl-C or SIGTERM.

    The file is validated before anything starts (errors name the file, the line and the
    field); on Ctrl-C or SIGTERM the workers drain (tdask.worker.drain-timeout) and everything
    started stops.
    """
    import time

    from tdask.deployment import Deployment
    from tdask.deployment_file import load_deployment_file, spec_for_repository
    from tdask.exceptions import DeploymentFileError

    if (file is None) == (model_repository is None):
        raise click.UsageError("give a deployment FILE or --model-repository DIR (one of them)")
    try:
        if file is not None:
            spec = load_deployment_file(file)
        else:
            assert model_repository is not None
            spec = spec_for_repository(
                model_repository, workers=workers_per_model, max_inflight_requests=max_inflight_requests
            )
    except DeploymentFileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    cluster = spec.cluster
    overrides = {
        "scheduler_address": scheduler_address,
        "scheduler_port": scheduler_port,
        "dashboard_address": dashboard_address,
        "log_dir": str(Path(log_dir).resolve()) if log_dir else None,
        "log_level": log_level.upper() if log_level else None,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cluster, key, value)
    if scheduler_address is not None and scheduler_port is None:
        cluster.scheduler_port = 0
    if check_only:
        click.echo(spec.describe())
        return
    configure_logging(cluster.log_level)
    prepare_log_dir(cluster.log_dir, False)
    deployment = Deployment.from_spec(spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(deployed(deployment, interrupted_exit_code=0, process_log="scheduler.log"))
        status = f"`tdask status --scheduler {deployment.scheduler_address}`"
        if cluster.protocol == "tls" and cluster.tls is not None and cluster.tls.temporary:
            env = stack.enter_context(temporary_credentials(deployment.security))
            status = f"`{' '.join(f'{k}={v}' for k, v in env.items())} {status[1:-1]}` (temporary TLS)"
        click.echo(
            f"serving {len(spec.operators)} operators from {spec.source}; {status} shows them; Ctrl-C or SIGTERM stops",
            err=True,
        )
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
