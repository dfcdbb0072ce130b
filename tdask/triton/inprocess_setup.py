"""What Triton in the worker's process needs before ``TRITONSERVER_ServerNew``: backends and options.

:func:`server_options` is the in-process twin of :func:`tdask.triton.binary.server_args` (the
subprocess command line): the same choices, made through the C API. Where the ``tritonserver``
binary relies on its own command-line defaults, they are set here explicitly, because the C
API's options object does not share them all (see :func:`server_options`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Sequence
from ctypes import byref, c_void_p
from pathlib import Path

from tdask.triton import capi
from tdask.triton.binary import _pytriton_bundle, prepare_bundle_backends, server_env

logger = logging.getLogger(__name__)

__all__ = ["prepare_process", "server_options"]


def prepare_process(api: capi.TritonCApi, workdir: Path) -> Path | None:
    """Make this process ready to host Triton's backends; return the backend directory to use.

    With the nvidia-pytriton bundle: assemble its backends in ``workdir``, preload each from
    its real place (its RPATH is relative to that, not to the symlink Triton opens) and give
    this process the ``PATH``/``LD_LIBRARY_PATH`` a ``tritonserver`` process gets (the python
    backend starts its stubs from here). With a ``/opt/tritonserver`` install: its backends,
    and this interpreter first on ``PATH``.

    Raises
    ------
    TritonServerError
        The bundle lacks a backend it needs.
    """
    from tdask.triton.server import TritonServerError

    bundle = _pytriton_bundle()
    if bundle is not None and str(api.path).startswith(str(bundle.libs_dir or "//")):
        try:
            backends = prepare_bundle_backends(bundle, workdir)
        except FileNotFoundError as exc:
            raise TritonServerError(str(exc)) from exc
        for backend in (bundle.bundle_root or Path("/")).glob("backends/*/libtriton_*.so"):
            try:
                ctypes.CDLL(str(backend.resolve()))
            except OSError as exc:
                logger.warning("could not preload Triton backend %s: %s", backend, exc)
        env = server_env(bundle)
        for key in ("PATH", "LD_LIBRARY_PATH"):
            os.environ[key] = env[key]
        return backends
    if Path("/opt/tritonserver/backends").is_dir():
        python_dir = str(Path(sys.executable).parent)
        if not os.environ.get("PATH", "").startswith(python_dir):
            os.environ["PATH"] = os.pathsep.join([python_dir, os.environ.get("PATH", "")])
        return Path("/opt/tritonserver/backends")
    return None


def server_options(
    api: capi.TritonCApi,
    *,
    repositories: Sequence[Path],
    name: str,
    exit_timeout_s: int,
    log_path: Path,
    log_verbose: int,
    metrics: bool,
    backends: Path | None,
    shm_prefix: str,
) -> int:
    """A ``TRITONSERVER_ServerOptions*`` for tdask's in-process server (the caller deletes it).

    Explicit model control, strict readiness, exit on error, Triton's log in ``log_path``, the
    python backend's shared-memory regions named with ``shm_prefix``; metrics (CPU, and GPU
    where a GPU exists) when ``metrics``. Set explicitly as the ``tritonserver`` binary does
    from its command-line defaults: the load retry count (0), which the C API's options object
    leaves **uninitialized** (``TritonServerOptions``' constructor in Triton 2.51's
    ``tritonserver.cc`` omits it), so that a model whose load failed was retried for ever and
    ``ServerLoadModel`` never returned; auto-completed model configs (``strict_model_config``
    false, the binary's default; the C API's is true); the binary's load thread count.

    Raises
    ------
    TritonCError
        Triton refused an option.
    """
    fn = api.fn
    options = c_void_p()
    api.check(fn.ServerOptionsNew(byref(options)))
    try:
        for repository in repositories:
            api.check(fn.ServerOptionsSetModelRepositoryPath(options, str(repository).encode()))
        api.check(fn.ServerOptionsSetServerId(options, name.encode()))
        api.check(fn.ServerOptionsSetModelControlMode(options, capi.MODEL_CONTROL_EXPLICIT))
        api.check(fn.ServerOptionsSetStrictReadiness(options, True))
        api.check(fn.ServerOptionsSetExitOnError(options, True))
        api.check(fn.ServerOptionsSetExitTimeout(options, exit_timeout_s))
        api.check(fn.ServerOptionsSetLogFile(options, str(log_path).encode()))
        for setter in (fn.ServerOptionsSetLogInfo, fn.ServerOptionsSetLogWarn, fn.ServerOptionsSetLogError):
            api.check(setter(options, True))
        api.check(fn.ServerOptionsSetLogVerbose(options, log_verbose))
        api.check(fn.ServerOptionsSetModelLoadRetryCount(options, 0))
        api.check(fn.ServerOptionsSetStrictModelConfig(options, False))
        api.check(fn.ServerOptionsSetModelLoadThreadCount(options, max(2, 2 * (os.cpu_count() or 1))))
        api.check(fn.ServerOptionsSetMetrics(options, metrics))
        api.check(fn.ServerOptionsSetCpuMetrics(options, metrics))
        # NVML is only there with a GPU; without one it prints an error on this process's stderr.
        api.check(fn.ServerOptionsSetGpuMetrics(options, metrics and Path("/dev/nvidiactl").exists()))
        if backends is not None:
            api.check(fn.ServerOptionsSetBackendDirectory(options, str(backends).encode()))
        api.check(fn.ServerOptionsSetBackendConfig(options, b"python", b"shm-region-prefix-name", shm_prefix.encode()))
    except BaseException:
        fn.ServerOptionsDelete(options)
        raise
    return options.value or 0
