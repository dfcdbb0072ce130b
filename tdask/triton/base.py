"""What both ways of hosting Triton share: the lifecycle, the error, the model config, the log.

:class:`~tdask.triton.server.TritonServer` runs a ``tritonserver`` process per worker;
:class:`~tdask.triton.inprocess.InProcessServer` runs Triton's core in the worker's own process
(``tdask.triton.mode``). The operator and the worker's plugin use either through this surface.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from tdask.triton import model_config
from tdask.triton.process import LOG_TAIL_LINES, log_tail

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

    Subclasses set ``name``, ``model_repositories``, ``status`` (:attr:`Status.created`),
    ``_lock``, ``_log_path``, ``_log_offset`` and ``_shm_prefix`` in their constructor, and
    implement ``_start``, ``_shutdown`` and ``stop``.
    """

    name: str
    model_repositories: list[Path]
    status: Status
    _lock: asyncio.Lock
    _log_path: Path | None
    _log_offset: int
    _shm_prefix: str

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
