"""Which ``tritonserver`` to run, and what it needs around it.

Lookup order: ``$TDASK_TRITONSERVER``, ``tritonserver`` on ``PATH``,
``/opt/tritonserver/bin/tritonserver``, then the build bundled in the ``nvidia-pytriton``
wheel. The bundle needs three things that a container install has on its own, and that
:class:`~tdask.triton.server.TritonServer` provides (as PyTriton's own launcher does):

- its shared libraries, in ``site-packages/nvidia_pytriton.libs``, on ``LD_LIBRARY_PATH``;
- a backends directory whose ``python/`` holds the stub built for the running Python
  (``pytriton/tritonserver/python_backend_stubs/<X.Y>/triton_python_backend_stub``);
- the running interpreter's directory first on ``PATH``: the stub embeds libpython and finds
  its ``sys.prefix`` (hence site-packages and numpy) through ``python3`` on ``PATH``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tdask.triton.options import TritonOptions

__all__ = [
    "OPT_TRITONSERVER",
    "TritonBinary",
    "find_tritonserver",
    "prepare_bundle_backends",
    "python_backend_stub",
    "server_args",
    "server_env",
]

#: Where a container install of Triton keeps its binary.
OPT_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
_STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonBinary:
    """A ``tritonserver`` to run and what it needs around it.

    Attributes
    ----------
    path : Path
        The executable.
    bundle_root : Path or None
        ``pytriton/tritonserver`` when this is the binary bundled in nvidia-pytriton; the
        bundle needs a backends directory, libraries and ``PATH`` set up (see the module doc).
    libs_dir : Path or None
        The bundle's ``nvidia_pytriton.libs`` directory.
    """

    path: Path
    bundle_root: Path | None = None
    libs_dir: Path | None = None


def _pytriton_bundle() -> TritonBinary | None:
    """Locate the Triton build inside the nvidia-pytriton wheel without importing pytriton.

    Importing ``pytriton`` pulls in its logging setup and many dependencies; only files are needed.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    root = package_dir / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    libs = package_dir.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # an editable pytriton checkout keeps them here
        libs = root / "external_libs"
    return TritonBinary(path=binary, bundle_root=root, libs_dir=libs if libs.is_dir() else None)


def find_tritonserver() -> TritonBinary:
    """Return the ``tritonserver`` to run, in the documented lookup order.

    Returns
    -------
    TritonBinary
        The binary, with its bundle's paths when it is the one bundled in nvidia-pytriton.

    Raises
    ------
    FileNotFoundError
        When no binary is found anywhere (the message lists where it looked), or when
        ``$TDASK_TRITONSERVER`` names no executable file.
    """
    bundle = _pytriton_bundle()
    env_path = os.environ.get("TDASK_TRITONSERVER")
    if env_path:
        path = Path(env_path).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"$TDASK_TRITONSERVER={env_path!r} is not an executable file")
        if bundle is not None and path.resolve() == bundle.path.resolve():
            return bundle
        return TritonBinary(path=path)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonBinary(path=Path(on_path))
    if OPT_TRITONSERVER.is_file() and os.access(OPT_TRITONSERVER, os.X_OK):
        return TritonBinary(path=OPT_TRITONSERVER)
    if bundle is not None:
        return bundle
    raise FileNotFoundError(
        "no tritonserver found: set $TDASK_TRITONSERVER, put tritonserver on PATH, install it in "
        f"{OPT_TRITONSERVER.parent}, or install the nvidia-pytriton wheel (which bundles one)"
    )


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def python_backend_stub(binary: TritonBinary) -> Path | None:
    """Return the python-backend stub that ``binary`` runs for this Python, if there is one.

    Parameters
    ----------
    binary
        A ``tritonserver``, e.g. from :func:`find_tritonserver`.

    Returns
    -------
    Path or None
        For the nvidia-pytriton bundle, its stub built for the running Python
        (``<bundle_root>/python_backend_stubs/<X.Y>/triton_python_backend_stub``); for another
        install, the ``backends/python/triton_python_backend_stub`` next to its ``bin/``.
        ``None`` when that file does not exist.
    """
    if binary.bundle_root is not None:
        stub = binary.bundle_root / "python_backend_stubs" / _python_version() / _STUB
    else:
        stub = binary.path.resolve().parent.parent / "backends" / "python" / _STUB
    return stub if stub.is_file() else None


def prepare_bundle_backends(bundle: TritonBinary, workdir: Path) -> Path:
    """Build a backends directory for the bundled server in ``workdir`` and return it.

    The wheel ships the python backend without a stub and one stub per Python version next
    to it; the backend launches ``<backend dir>/triton_python_backend_stub``, so a directory is
    assembled from symlinks (cheap, and the stub's ``$ORIGIN`` rpath keeps resolving).

    Parameters
    ----------
    bundle
        The nvidia-pytriton bundle (its ``bundle_root`` is set).
    workdir
        A directory of the caller's; ``backends/`` is created in it.

    Returns
    -------
    Path
        The directory to pass as ``--backend-directory``.

    Raises
    ------
    FileNotFoundError
        The bundle has no python-backend stub for the running Python (the message lists the
        versions it has).
    """
    if bundle.bundle_root is None:
        raise ValueError(f"{bundle.path} is not the Triton bundled in nvidia-pytriton")
    stub = python_backend_stub(bundle)
    if stub is None:
        stubs = bundle.bundle_root / "python_backend_stubs"
        available = sorted(p.name for p in stubs.iterdir() if p.is_dir()) if stubs.is_dir() else []
        raise FileNotFoundError(
            f"the Triton bundled in nvidia-pytriton has no python-backend stub for Python {_python_version()} "
            f"(it has: {', '.join(available) or 'none'})"
        )
    backends = workdir / "backends"
    for source_backend in (bundle.bundle_root / "backends").iterdir():
        target = backends / source_backend.name
        target.mkdir(parents=True)
        for item in source_backend.iterdir():
            if item.name != "__pycache__":
                (target / item.name).symlink_to(item)
    (backends / "python" / _STUB).symlink_to(stub)
    return backends


def server_env(binary: TritonBinary, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the server's environment: the caller's, plus what the bundle and the stub need.

    Parameters
    ----------
    binary
        The ``tritonserver`` that will run.
    extra_env
        Variables set last, over everything else.

    Returns
    -------
    dict of str to str
        A copy of ``os.environ`` with this interpreter's directory first on ``PATH`` and, for the
        bundle, its libraries (and this interpreter's ``libpython``) first on ``LD_LIBRARY_PATH``.
    """
    env = dict(os.environ)
    # The stub's embedded Python takes its prefix from `python3` on PATH: make it this one.
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([python_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
    if binary.bundle_root is not None:
        extra_libs = []
        if binary.libs_dir is not None:
            extra_libs.append(str(binary.libs_dir))
        # The stub links libpython3.X.so; prefer this interpreter's own shared library.
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            libdir = sysconfig.get_config_var("LIBDIR")
            if libdir:
                extra_libs.insert(0, str(libdir))
        current = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*extra_libs, *current])
    if extra_env:
        env.update(extra_env)
    return env


def server_args(
    options: TritonOptions,
    binary: TritonBinary,
    *,
    shm_prefix: str,
    backends: Path | None,
    grpc_port: int,
    http_port: int,
    metrics_port: int | None,
) -> list[str]:
    """``options`` as a ``tritonserver`` command line: the subprocess mode's rendering of them.

    The in-process mode's is :func:`tdask.triton.inprocess_setup.server_options`. Every endpoint
    is bound to 127.0.0.1; SageMaker and Vertex AI endpoints are off.

    Parameters
    ----------
    options
        What to run (repositories, model control, exit timeout, log level, metrics, extra flags).
    binary
        The ``tritonserver`` to run.
    shm_prefix
        Names the python backend's shared-memory regions (one prefix per server, so servers on one
        host never share one).
    backends
        ``--backend-directory``; ``None``: the binary's own.
    grpc_port, http_port
        Where the gRPC and HTTP endpoints listen.
    metrics_port
        Where the metrics endpoint listens; required when ``options.metrics``.

    Returns
    -------
    list of str
        The command line, ``options.extra_args`` last.

    Raises
    ------
    ValueError
        Metrics are on and no ``metrics_port`` was given.
    """
    if options.metrics and metrics_port is None:
        raise ValueError("Triton's metrics are on (options.metrics) but no metrics port was given")
    args = [
        str(binary.path),
        *[f"--model-repository={path}" for path in options.repositories],
        f"--model-control-mode={options.model_control_mode}",
        f"--strict-readiness={str(options.strict_readiness).lower()}",
        f"--exit-on-error={str(options.exit_on_error).lower()}",
        f"--exit-timeout-secs={options.exit_timeout_s}",
        "--allow-grpc=true",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--allow-http=true",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        *(
            ["--allow-metrics=true", "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}"]
            if options.metrics
            else ["--allow-metrics=false"]
        ),
        "--allow-sagemaker=false",
        "--allow-vertex-ai=false",
        f"--log-verbose={options.log_verbose}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    if backends is not None:
        args.append(f"--backend-directory={backends}")
    args.extend(options.extra_args)
    return args
