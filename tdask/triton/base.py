"""What both ways of hosting Triton share: the lifecycle, the error, the model config, the log.

:class:`~tdask.triton.server.TritonServer` runs a ``tritonserver`` process per worker;
:class:`~tdask.triton.inprocess.InProcessServer` runs Triton's core in the worker's own process
(``tdask.triton.mode``). The operator and the worker's plugin use either through this surface.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import dask.config

from tdask.triton import model_config
from tdask.triton.process import LOG_TAIL_LINES, log_tail, new_shm_prefix

__all__ = ["Status", "TritonServerBase", "TritonServerError"]


class TritonServerError(RuntimeError):
    """The Triton server failed to start, died, or refused a repository request.

    Attributes
    ----------
    returncode : int or None
        The server's exit status when it has exited (negative: killed by that signal).
    log_tail : str
        The last lines of the server log, so the cause is visible without opening the file.
    """

    def __init__(self, message: str, *, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = log_tail


class Status(enum.Enum):
    """Lifecycle of a Triton server; it is not restartable once stopped."""

    created = "created"
    starting = "starting"
    running = "running"
    stopping = "stopping"
    stopped = "stopped"


class TritonServerBase(abc.ABC):
    """The lifecycle and the read-only surface both server kinds share.

    Subclasses call this constructor and implement ``_start``, ``_shutdown`` and ``stop``.

    Parameters
    ----------
    model_repository
        The model repository, or several (each must be a directory).
    log_dir
        Directory of ``<name>.triton.log`` (appended); ``None``: a temporary file.
    log_verbose
        Triton's verbose log level; default ``tdask.triton.log-verbose``.
    name
        Names the log file and the log lines (the worker's name).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        log_dir: str | os.PathLike[str] | None,
        log_verbose: int | None,
        name: str,
    ) -> None:
        if isinstance(model_repository, (str, os.PathLike)):
            model_repository = [model_repository]
        self.model_repositories = [Path(path).resolve() for path in model_repository]
        if not self.model_repositories:
            raise ValueError(f"{type(self).__name__} needs at least one model repository")
        for path in self.model_repositories:
            if not path.is_dir():
                raise FileNotFoundError(f"model repository {str(path)!r} is not a directory")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_verbose = int(dask.config.get("tdask.triton.log-verbose") if log_verbose is None else log_verbose)
        self.name = name
        self.status = Status.created
        self._lock = asyncio.Lock()
        self._log_path: Path | None = None
        self._log_offset = 0  # where this server's part of an appended log starts
        # The python backend names its shared-memory regions with this; one per server, so that
        # servers on one host never collide and a stop can remove what a killed one left.
        self._shm_prefix = new_shm_prefix()

    @abc.abstractmethod
    async def _start(self) -> None:
        """Bring the server up and wait until it is ready (status is ``starting``)."""

    @abc.abstractmethod
    async def _shutdown(self) -> None:
        """Release everything ``_start`` made, also after a failed start."""

    @abc.abstractmethod
    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the server; safe to call more than once."""

    @property
    def _safe_name(self) -> str:
        """The name, made safe for a file name."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name) or "triton"

    @property
    def log_path(self) -> Path | None:
        """The file that receives Triton's log."""
        return self._log_path

    @property
    def shm_region_prefix(self) -> str:
        """Prefix of the python backend's shared-memory regions (``/dev/shm/<prefix>*``)."""
        return self._shm_prefix

    def _log_loaded(self, model: str, began: float, override: bool) -> None:
        """Log that ``model`` loaded (``began``: ``time.monotonic()`` when its load started).

        Under the logger of the server kind's own module, as each logged it before.
        """
        logging.getLogger(type(self).__module__).info(
            "Triton server %r loaded model %r in %.2fs%s",
            self.name,
            model,
            time.monotonic() - began,
            " with a config override" if override else "",
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return what this server wrote to its log that explains a failure.

        Its error lines, then its last ``lines`` lines (see :func:`tdask.triton.process.log_tail`).
        """
        return log_tail(self._log_path, self._log_offset, lines)

    def model_config(self, model: str, override: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The config ``model`` loads with, in Triton's JSON form.

        The repository's ``config.pbtxt`` (``{}`` if absent), with ``override`` merged in and
        checked (:mod:`tdask.triton.model_config`).

        Raises
        ------
        TritonServerError
            The repository's ``config.pbtxt`` does not parse.
        ValueError
            The merged config is not a valid ``ModelConfig`` (e.g. a misspelt key).
        """
        try:
            if override:
                return model_config.build_model_config(self.model_repositories, model, override)
            return model_config.read_model_config(self.model_repositories, model)
        except model_config.ModelConfigError as exc:
            raise TritonServerError(str(exc)) from exc

    async def __aenter__(self) -> Self:
        """Start the server (see :meth:`start`)."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the server (see :meth:`stop`)."""
        await self.stop()

    async def start(self) -> None:
        """Start the server and wait until it is ready; a no-op when it is already running.

        Raises
        ------
        TritonServerError
            It failed to start or was not ready in time; the message says why (with the end of
            its log). Nothing is left running.
        RuntimeError
            The server was stopped before (a stopped server cannot be restarted).
        """
        async with self._lock:
            if self.status is Status.running:
                return
            if self.status is not Status.created:
                raise RuntimeError(f"Triton server {self.name!r} is {self.status.value} and cannot be started")
            self.status = Status.starting
            try:
                await self._start()
            except BaseException:
                await self._shutdown()
                self.status = Status.stopped
                raise
            self.status = Status.running
