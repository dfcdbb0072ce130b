"""What Triton in the worker's process needs before ``TRITONSERVER_ServerNew``: backends and options.

:func:`server_options` renders :class:`~tdask.triton.options.TritonOptions` for the C API, as
:func:`tdask.triton.binary.server_args` renders them as the subprocess's command line. Where the
``tritonserver`` binary relies on its own command-line defaults, they are set here explicitly,
because the C API's options object does not share them all (see :func:`server_options`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from ctypes import byref, c_void_p
from pathlib import Path
from typing import TYPE_CHECKING

from tdask.triton import capi
from tdask.triton.base import TritonServerError
from tdask.triton.binary import _pytriton_bundle, prepare_bundle_backends, server_env

if TYPE_CHECKING:
    from tdask.triton.options import TritonOptions

logger = logging.getLogger(__name__)

__all__ = ["prepare_process", "server_options"]

#: ``TritonOptions.model_control_mode`` as the C API's ``TRITONSERVER_ModelControlMode``.
_MODEL_CONTROL = {"explicit": capi.MODEL_CONTROL_EXPLICIT}


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
    api: capi.TritonCApi, options: TritonOptions, *, shm_prefix: str, backends: Path | None, log_path: Path
) -> int:
    """``options`` as a ``TRITONSERVER_ServerOptions*``: the in-process mode's rendering of them.

    The subprocess mode's is :func:`tdask.triton.binary.server_args` (the same choices, as a
    command line). Explicit model control, strict readiness, exit on error, Triton's log in
    ``log_path``, the python backend's shared-memory regions named with ``shm_prefix``; metrics
    (CPU, and GPU where a GPU exists) when ``options.metrics``. Set explicitly as the
    ``tritonserver`` binary does from its command-line defaults: the load retry count (0), which
    the C API's options object leaves **uninitialized** (``TritonServerOptions``' constructor in
    Triton 2.51's ``tritonserver.cc`` omits it), so that a model whose load failed was retried for
    ever and ``ServerLoadModel`` never returned; auto-completed model configs
    (``strict_model_config`` false, the binary's default; the C API's is true); the binary's load
    thread count. The caller deletes the returned options.

    Parameters
    ----------
    api
        Triton's C API.
    options
        What to run (repositories, server id, model control, exit timeout, log level, metrics).
    shm_prefix
        Names the python backend's shared-memory regions.
    backends
        Triton's backend directory; ``None``: its default.
    log_path
        The file Triton logs to.

    Returns
    -------
    int
        The ``TRITONSERVER_ServerOptions*``.

    Raises
    ------
    TritonCError
        Triton refused an option.
    ValueError
        ``options`` asks for a model control mode this rendering does not know.
    """
    if options.model_control_mode not in _MODEL_CONTROL:
        raise ValueError(f"model control mode {options.model_control_mode!r} is not one of {sorted(_MODEL_CONTROL)}")
    fn = api.fn
    handle = c_void_p()
    api.check(fn.ServerOptionsNew(byref(handle)))
    try:
        for repository in options.repositories:
            api.check(fn.ServerOptionsSetModelRepositoryPath(handle, str(repository).encode()))
        api.check(fn.ServerOptionsSetServerId(handle, options.name.encode()))
        api.check(fn.ServerOptionsSetModelControlMode(handle, _MODEL_CONTROL[options.model_control_mode]))
        api.check(fn.ServerOptionsSetStrictReadiness(handle, options.strict_readiness))
        api.check(fn.ServerOptionsSetExitOnError(handle, options.exit_on_error))
        api.check(fn.ServerOptionsSetExitTimeout(handle, options.exit_timeout_s))
        api.check(fn.ServerOptionsSetLogFile(handle, str(log_path).encode()))
        for setter in (fn.ServerOptionsSetLogInfo, fn.ServerOptionsSetLogWarn, fn.ServerOptionsSetLogError):
            api.check(setter(handle, True))
        api.check(fn.ServerOptionsSetLogVerbose(handle, options.log_verbose))
        api.check(fn.ServerOptionsSetModelLoadRetryCount(handle, 0))
        api.check(fn.ServerOptionsSetStrictModelConfig(handle, False))
        api.check(fn.ServerOptionsSetModelLoadThreadCount(handle, max(2, 2 * (os.cpu_count() or 1))))
        metrics = options.metrics
        api.check(fn.ServerOptionsSetMetrics(handle, metrics))
        api.check(fn.ServerOptionsSetCpuMetrics(handle, metrics))
        # NVML is only there with a GPU; without one it prints an error on this process's stderr.
        api.check(fn.ServerOptionsSetGpuMetrics(handle, metrics and Path("/dev/nvidiactl").exists()))
        if backends is not None:
            api.check(fn.ServerOptionsSetBackendDirectory(handle, str(backends).encode()))
        api.check(fn.ServerOptionsSetBackendConfig(handle, b"python", b"shm-region-prefix-name", shm_prefix.encode()))
    except BaseException:
        fn.ServerOptionsDelete(handle)
        raise
    return handle.value or 0
