"""What a tdask Triton server is started with, in either kind: :class:`TritonOptions`.

One object, two renderings: :func:`tdask.triton.binary.server_args` writes it as a
``tritonserver`` command line (subprocess mode), :func:`tdask.triton.inprocess_setup.server_options`
as a ``TRITONSERVER_ServerOptions`` (in-process mode). What only one kind uses is marked so below;
what a server picks at each start (ports, its shared-memory prefix, its backend directory, its
log file) is handed to the renderings beside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import dask.config

if TYPE_CHECKING:
    from tdask.triton.binary import TritonBinary

__all__ = ["TritonOptions"]


def _log_verbose() -> int:
    return int(dask.config.get("tdask.triton.log-verbose"))


def _metrics() -> bool:
    return bool(dask.config.get("tdask.triton.metrics", True))


def _use_shim() -> bool:
    return bool(dask.config.get("tdask.triton.in-process-shim", True))


@dataclass(frozen=True)
class TritonOptions:
    """How to run one Triton server; what is not given comes from ``tdask.triton.*`` config.

    Parameters
    ----------
    model_repository
        The model repository, or several (each must be a directory; a model name must be unique
        across them). Models load only on ``load_model`` (explicit model control).
    name
        Names the log file (``<name>.triton.log``), the log lines and Triton's server id.
    log_dir
        Directory of ``<name>.triton.log`` (appended); ``None``: a temporary file, removed at stop.
    log_verbose
        Triton's verbose log level; default ``tdask.triton.log-verbose``.
    metrics
        Collect Triton's Prometheus metrics; default ``tdask.triton.metrics``.
    stop_timeout_s
        Bound on a graceful stop; Triton's own exit timeout (the wait for in-flight requests) is
        half of it (:attr:`exit_timeout_s`).
    backend_directory
        Triton's backend directory; ``None``: the one tdask assembles for the nvidia-pytriton
        bundle, or the install's own.
    startup_timeout_s
        Subprocess mode: bound on the wait for the server to report ready; ``None``:
        ``tdask.triton.startup-timeout``.
    binary
        Subprocess mode: the ``tritonserver`` to run; ``None``: :func:`~tdask.triton.binary.find_tritonserver`.
    extra_args
        Subprocess mode: more ``tritonserver`` flags, appended last.
    env
        Subprocess mode: variables added to the server's environment.
    use_shim
        In-process mode: run Triton's callbacks in the C shim when it can be built; default
        ``tdask.triton.in-process-shim``.

    Raises
    ------
    ValueError
        No model repository was given.
    FileNotFoundError
        A model repository is not a directory.
    """

    #: Models load and unload only when asked (``load_model``, ``unload_model``).
    model_control_mode: ClassVar[str] = "explicit"
    #: Ready only once every model asked for is ready.
    strict_readiness: ClassVar[bool] = True
    #: A server that fails to start exits instead of serving what it could load.
    exit_on_error: ClassVar[bool] = True

    model_repository: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
    name: str = "triton"
    log_dir: str | os.PathLike[str] | None = None
    log_verbose: int = field(default_factory=_log_verbose)
    metrics: bool = field(default_factory=_metrics)
    stop_timeout_s: float = 10.0
    backend_directory: str | os.PathLike[str] | None = None
    startup_timeout_s: float | None = None
    binary: TritonBinary | None = None
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    use_shim: bool = field(default_factory=_use_shim)
    _repositories: tuple[Path, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = self.model_repository
        paths = [given] if isinstance(given, (str, os.PathLike)) else list(given)
        repositories = tuple(Path(path).resolve() for path in paths)
        if not repositories:
            raise ValueError("a Triton server needs at least one model repository")
        for path in repositories:
            if not path.is_dir():
                raise FileNotFoundError(f"model repository {str(path)!r} is not a directory")
        object.__setattr__(self, "_repositories", repositories)

    @property
    def repositories(self) -> tuple[Path, ...]:
        """The model repositories, resolved."""
        return self._repositories

    @property
    def exit_timeout_s(self) -> int:
        """Triton's exit timeout: how long its stop waits for in-flight requests (whole seconds, >= 1)."""
        return max(1, int(self.stop_timeout_s / 2))
