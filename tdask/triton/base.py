"""What both ways of hosting Triton share: one interface, the lifecycle, the error, the model config, the log.

:class:`~tdask.triton.server.TritonServer` runs a ``tritonserver`` process per worker;
:class:`~tdask.triton.inprocess.InProcessServer` runs Triton's core in the worker's own process
(``tdask.triton.mode``; :func:`tdask.triton.make_server` picks). The operator and the worker's
plugin use either through :class:`TritonServerBase` alone: its clients
(:mod:`tdask.triton.interface`), its health (:meth:`~TritonServerBase.is_alive`,
:attr:`~TritonServerBase.broken`), its metrics source and its exit callbacks.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from tdask.triton import model_config
from tdask.triton.interface import InferClient, MetricsSource, StreamClient
from tdask.triton.options import TritonOptions
from tdask.triton.process import LOG_TAIL_LINES, log_tail, new_shm_prefix

__all__ = ["Status", "TritonServerBase", "TritonServerError"]

logger = logging.getLogger(__name__)

#: The python backend's stub program (its process name).
STUB_NAME = "triton_python_backend_stub"


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
    """One Triton server, of either kind: the one interface the operator and the worker use.

    Subclasses call this constructor and implement the abstract members: :meth:`from_options`,
    ``_start`` and ``_shutdown`` (the lifecycle's two halves), :meth:`stop`, the models (:meth:`load_model`,
    :meth:`unload_model`), the clients (:meth:`client`, :meth:`stream_client`), the health
    (:meth:`is_alive`, :attr:`broken`, :attr:`returncode`, :meth:`wait`, the exit callbacks) and
    :attr:`metrics_source`.

    Parameters
    ----------
    options
        What to run (:class:`~tdask.triton.options.TritonOptions`).
    """

    def __init__(self, options: TritonOptions) -> None:
        self.options = options
        self.model_repositories = list(options.repositories)
        self.log_dir = Path(options.log_dir) if options.log_dir is not None else None
        self.log_verbose = options.log_verbose
        self.name = options.name
        self.stop_timeout_s = float(options.stop_timeout_s)
        self.metrics = options.metrics
        self.status = Status.created
        self._lock = asyncio.Lock()
        self._log_path: Path | None = None
        self._log_offset = 0  # where this server's part of an appended log starts
        # The python backend names its shared-memory regions with this; one per server, so that
        # servers on one host never collide and a stop can remove what a killed one left.
        self._shm_prefix = new_shm_prefix()
        # Python-backend stubs watched for death: pid -> (model, pidfd).
        self._stubs: dict[int, tuple[str, int]] = {}

    @classmethod
    @abc.abstractmethod
    def from_options(cls, options: TritonOptions) -> Self:
        """Make a server of this kind from ``options`` (what :func:`tdask.triton.make_server` calls)."""

    # ------------------------------------------------------------------ the interface

    @abc.abstractmethod
    async def _start(self) -> None:
        """Bring the server up and wait until it is ready (status is ``starting``)."""

    @abc.abstractmethod
    async def _shutdown(self) -> None:
        """Release everything ``_start`` made, also after a failed start."""

    @abc.abstractmethod
    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the server; safe to call more than once.

        Parameters
        ----------
        graceful
            ``False``: end it at once (a server that is broken anyway), where the kind can.
        """

    @abc.abstractmethod
    async def load_model(
        self, model: str, config: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Load (or reload) ``model``, with ``config`` merged into its config (see :meth:`model_config`).

        Parameters
        ----------
        model
            The model's directory name in a repository.
        config
            Triton JSON config keys to override (``instance_group``, ``parameters``...).
        timeout_s
            Bound on the load; ``None`` waits as long as Triton takes. A load past it cannot be
            interrupted: the server is given up (:attr:`broken`, the exit callbacks fire).

        Raises
        ------
        TritonServerError
            Triton refused or failed the load (its message says why), or the server is gone.
        """

    @abc.abstractmethod
    async def unload_model(self, model: str, *, wait: bool = True, timeout_s: float = 30.0) -> None:
        """Unload ``model``; with ``wait``, return once Triton no longer reports it loaded.

        Raises
        ------
        TritonServerError
            Triton refused the unload, the model was still loaded after ``timeout_s``, or the
            server is gone.
        """

    @abc.abstractmethod
    def client(self) -> InferClient:
        """A new client for unary inference on this server (the caller closes it)."""

    @abc.abstractmethod
    def stream_client(self) -> StreamClient:
        """A new client for decoupled models' streamed inference (the caller closes it).

        Make it inside the event loop that uses it.
        """

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """Whether the server can take requests (it may still be starting)."""

    @property
    @abc.abstractmethod
    def broken(self) -> str | None:
        """Why the server cannot serve on (it died, or a load never returned); ``None`` while it can."""

    @property
    @abc.abstractmethod
    def returncode(self) -> int | None:
        """The exit status once the server has ended or broken, else ``None``."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The process Triton runs in (``None`` before a subprocess is started)."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Where requests go, for log lines."""

    @property
    @abc.abstractmethod
    def metrics_source(self) -> MetricsSource | None:
        """Where Triton's Prometheus metrics are read (see :class:`tdask.host.metrics.TritonMetrics`).

        ``None`` when metrics are off.
        """

    @abc.abstractmethod
    def add_exit_callback(self, callback: Callable[[int], object]) -> None:
        """Call ``callback(returncode)`` once the server ends or breaks.

        A subprocess's callbacks also run when :meth:`stop` ends it (its owner knows it asked);
        the in-process server's only when it breaks. A callback may run in another thread (use
        ``loop.call_soon_threadsafe`` to reach a loop).
        """

    @abc.abstractmethod
    def remove_exit_callback(self, callback: Callable[[int], object]) -> None:
        """Forget a callback given to :meth:`add_exit_callback`."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait until the server has ended; return its exit status."""

    # ------------------------------------------------------------------ shared

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

    # ------------------------------------------------------------------ python-backend stubs

    def _stub_root(self) -> int | None:
        """The process whose descendants the stubs are (Triton's process)."""
        return self.pid

    def _stub_pids(self, model: str | None = None) -> dict[int, str]:
        """Return the server's python-backend stubs now (``pid -> model``), of ``model`` or all."""
        import psutil

        root = self._stub_root()
        if root is None:
            return {}
        found = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(root).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmdline = child.cmdline()
                    # <stub> <model dir>/<version>/model.py <shm region> ... <instance name> ...
                    if len(cmdline) < 3 or not cmdline[0].endswith(STUB_NAME) or self._shm_prefix not in cmdline[2]:
                        continue
                    owner = Path(cmdline[1]).parent.parent.name
                    if model is None or owner == model:
                        found[child.pid] = owner
        return found

    def _watch_stubs(self, model: str) -> None:
        """Watch ``model``'s stubs (after its load): one that dies breaks the server at once.

        Triton's python backend only notices a dead stub at its next request's health check
        (about a second later) and neither restarts it nor unloads the model cleanly; a pidfd
        on the event loop notices the death itself, so the worker restarts (and its requests
        are served again elsewhere) without waiting for that.
        """
        if not hasattr(os, "pidfd_open"):
            return
        loop = asyncio.get_running_loop()
        for pid, owner in self._stub_pids(model).items():
            if pid in self._stubs:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # already gone: the next request's health check tells
                continue
            self._stubs[pid] = (owner, fd)
            loop.add_reader(fd, self._stub_exited, pid)

    def _unwatch_stubs(self, model: str | None = None) -> None:
        """Stop watching ``model``'s stubs (before an unload or a reload ends them), or all."""
        for pid, (owner, fd) in list(self._stubs.items()):
            if model is None or owner == model:
                del self._stubs[pid]
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _stub_exited(self, pid: int) -> None:
        entry = self._stubs.pop(pid, None)
        if entry is None:
            return
        model, fd = entry
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        if self.status is not Status.running or self.broken is not None:
            return
        if any(p not in self._stubs for p in self._stub_pids(model)):
            # Triton replaced the model's stubs itself: a load reloads what it depends on (an
            # ensemble's composing models), and the old stubs end once the new ones serve.
            logger.info("Triton server %r: model %r has new stubs (pid %d ended)", self.name, model, pid)
            self._watch_stubs(model)
            return
        self._stub_died(model, pid)

    def _stub_died(self, model: str, pid: int) -> None:  # noqa: B027 - overridden by each kind
        """A watched stub of ``model`` died while the server runs: give the server up (each kind)."""

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

    def check_model(self, model: str) -> None:
        """Refuse, before Triton sees it, a python-backend model whose model file is missing.

        Triton 2.51 would wait for ever on the stub of such a model; its own message is raised
        at once instead.

        Raises
        ------
        TritonServerError
            The model file of the version Triton would load is missing.
        """
        problem = model_config.check_model_directory(self.model_repositories, model)
        if problem is not None and problem.startswith("Python model file not found"):
            raise TritonServerError(f"loading model {model!r} on Triton server {self.name!r} failed: {problem}")

    def explain_load_failure(self, model: str) -> str:
        """``"; Triton said: ..."``: what Triton logged about ``model``'s directory and what its check finds.

        Triton's load error says only "failed to poll from model repository" for a config that
        does not parse, a directory/model name mismatch and the like; its reason is in its log
        (or the process's stderr). ``""`` when nothing more is known.
        """
        text = log_tail(self._log_path, self._log_offset, 400)
        reason = model_config.explain_load_failure(self.model_repositories, model, text)
        return f"; Triton said: {reason}" if reason else ""

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
