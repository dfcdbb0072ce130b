"""One real Triton Inference Server process, owned by one tdask worker process.

:class:`TritonServer` finds a ``tritonserver`` binary, starts it in explicit model-control
mode with gRPC and HTTP bound to 127.0.0.1 on free ports, health-checks it with a bounded
deadline, notices when it dies, loads and unloads models (optionally with a config
override) and stops it together with every python-backend stub it started.

Binary lookup order: ``$TDASK_TRITONSERVER``, ``tritonserver`` on ``PATH``,
``/opt/tritonserver/bin/tritonserver``, then the build bundled in the ``nvidia-pytriton``
wheel. The bundle needs three things that a container install has on its own, and that
:class:`TritonServer` provides (as PyTriton's own launcher does):

- its shared libraries, in ``site-packages/nvidia_pytriton.libs``, on ``LD_LIBRARY_PATH``;
- a backends directory whose ``python/`` holds the stub built for the running Python
  (``pytriton/tritonserver/python_backend_stubs/<X.Y>/triton_python_backend_stub``);
- the running interpreter's directory first on ``PATH``: the stub embeds libpython and finds
  its ``sys.prefix`` (hence site-packages and numpy) through ``python3`` on ``PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import ctypes.util
import enum
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger("tdask.triton_server")

__all__ = ["TritonServer", "TritonServerError", "find_tritonserver", "merge_model_config"]

#: Lines of the server log quoted in errors.
LOG_TAIL_LINES = 40
#: Where a container install of Triton keeps its binary.
OPT_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
#: Log fragments that mean "the port we picked was taken meanwhile"; start retries then.
_PORT_IN_USE_MARKERS = ("already in use", "failed to listen", "failed to bind")
_START_ATTEMPTS = 3
_POLL_INTERVAL_S = 0.05
_NUDGE_INTERVAL_S = 0.25
# gRPC would route 127.0.0.1 through $http_proxy/$grpc_proxy unless told not to.
_CONTROL_CHANNEL_ARGS = [("grpc.enable_http_proxy", 0)]


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
    """Lifecycle of a :class:`TritonServer`; it is not restartable once stopped."""

    created = "created"
    starting = "starting"
    running = "running"
    stopping = "stopping"
    stopped = "stopped"


@dataclass(frozen=True)
class TritonBinary:
    """A ``tritonserver`` to run and what it needs around it.

    Attributes
    ----------
    path : Path
        The executable.
    bundle_root : Path or None
        ``pytriton/tritonserver`` when this is the binary bundled in nvidia-pytriton; the
        bundle needs a backends directory, libraries and ``PATH`` set up (see module doc).
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
    import importlib.util

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

    Raises
    ------
    FileNotFoundError
        When no binary is found anywhere; the message lists where it looked.
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


def _prepare_bundle_backends(bundle: TritonBinary, workdir: Path) -> Path:
    """Build a backends directory for the bundled server and return it.

    The wheel ships the python backend without a stub and one stub per Python version next
    to it; the backend launches ``<backend dir>/triton_python_backend_stub``, so a directory is
    assembled from symlinks (cheap, and the stub's ``$ORIGIN`` rpath keeps resolving).
    """
    assert bundle.bundle_root is not None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle.bundle_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (bundle.bundle_root / "python_backend_stubs").iterdir() if p.is_dir())
        raise TritonServerError(
            f"the Triton bundled in nvidia-pytriton has no python-backend stub for Python {version} "
            f"(it has: {', '.join(available) or 'none'})"
        )
    backends = workdir / "backends"
    for source_backend in (bundle.bundle_root / "backends").iterdir():
        target = backends / source_backend.name
        target.mkdir(parents=True)
        for item in source_backend.iterdir():
            if item.name != "__pycache__":
                (target / item.name).symlink_to(item)
    (backends / "python" / "triton_python_backend_stub").symlink_to(stub)
    return backends


def _server_env(binary: TritonBinary, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    """Environment of the server: the caller's, plus what the bundle and the stub need."""
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


def _config(key: str, default: Any) -> Any:
    """A ``dask.config`` setting (tdask's defaults live in ``tdask/tdask.yaml``), else ``default``."""
    import dask.config

    return dask.config.get(key, default)


def _config_seconds(key: str, default: float) -> float:
    """A duration setting (``"60s"``, ``60``) in seconds, else ``default``."""
    from dask.utils import parse_timedelta

    value = _config(key, None)
    return default if value is None else float(parse_timedelta(value, default="seconds"))


def _free_port() -> int:
    """A port free on 127.0.0.1 right now (the server may still lose a race for it; start retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_pdeathsig() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the server get SIGKILL when its parent dies.

    So a worker killed with SIGKILL (e.g. by a Nanny) does not leave its server behind. SIGKILL,
    not SIGTERM: an orphaned server has nobody to answer, and a graceful Triton stop takes 3 to
    11 s; its stubs notice the death within about 2 s and exit, and the shared-memory regions
    they leave are swept by the next server started on the host (after a minute).

    Linux ties this to the thread that forked: :meth:`TritonServer.start` must run in a thread
    that lives as long as the server (a worker's event-loop thread does). The libc call is
    resolved here, in the parent, so the child only makes one foreign call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in process group ``pgid``: the server and its stubs."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return members


_SHM_DIR = Path("/dev/shm")
_WORKDIR_PREFIX = "tdask-triton-"
_STALE_AFTER_S = 60.0


def _remove_shm_regions(prefix: str) -> None:
    """Unlink the python backend's shared-memory regions named ``prefix*``.

    Triton removes them on a clean stop; a SIGKILLed server or stub leaves them behind.
    """
    if not _SHM_DIR.is_dir():
        return
    for region in _SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            region.unlink()


def _sweep_stale(owner_pattern: re.Pattern[str], directory: Path) -> None:
    """Remove entries of ``directory`` left by tdask processes that died without cleaning up.

    ``owner_pattern`` captures the owner's pid; an entry goes only when that process is gone and
    the entry is older than a minute (so a server still shutting down keeps its files).
    """
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = owner_pattern.match(entry.name)
        if not match or psutil.pid_exists(int(match.group(1))):
            continue
        try:
            if now - entry.lstat().st_mtime < _STALE_AFTER_S:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except OSError:
            continue


def _nudge(port: int | None) -> None:
    """Open and close a TCP connection to ``port`` on 127.0.0.1, ignoring any failure.

    Measured with the bundled Triton 2.51: after large transfers its gRPC server shutdown
    sometimes idles about ten seconds after the last request before the process exits
    (half of the stops took 11 s instead of 3 s); a connection attempt every 0.25 s during the
    stop wakes it (all of 13 stops took 3 s).
    """
    if port is None:
        return
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        pass


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


_ERROR_LINE = re.compile(r"^E\d{4} |unrecognized option|error:|failed to", re.IGNORECASE)


def _tail(path: Path | None, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    """What of the log after ``offset`` explains a failure: its error lines, then its last lines.

    The error lines come first because Triton often buries them (a bad flag is followed by the
    whole usage text). Reads at most the last 256 KiB.
    """
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            start = max(offset, end - 256 * 1024)
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    last = text[-lines:]
    errors = [line for line in text[: len(text) - len(last)] if _ERROR_LINE.search(line)][:10]
    if errors:
        return "\n".join([*errors, "[...]", *last])
    return "\n".join(last)


class _ProcessWatch:
    """Waits for the server process in a daemon thread and tells whoever registered.

    Kept apart from :class:`TritonServer` so that the thread holds no reference to the server
    object (which must stay collectable for its finalizer to run).
    """

    def __init__(self, process: subprocess.Popen[bytes], on_exit: Callable[[int], None]) -> None:
        self.process = process
        self.exited = threading.Event()
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[int], None]] = [on_exit]
        self._thread = threading.Thread(target=self._run, name=f"tdask-triton-watch-{process.pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        returncode = self.process.wait()
        with self._lock:
            self.returncode = returncode
            self.exited.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(returncode)
            except Exception:  # a caller's bug must not hide the others' notifications
                logger.exception("Triton exit callback %r failed", callback)

    def add_callback(self, callback: Callable[[int], None]) -> None:
        with self._lock:
            if not self.exited.is_set():
                self._callbacks.append(callback)
                return
            returncode = self.returncode
        assert returncode is not None
        callback(returncode)

    def remove_callback(self, callback: Callable[[int], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)


def _terminate_at_exit(
    process: subprocess.Popen[bytes], workdir: str | None, shm_prefix: str, grpc_port: int | None, grace_s: float
) -> None:
    """Finalizer: stop a server its owner forgot (or could not) stop, then drop its files."""
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=_NUDGE_INTERVAL_S)
                _nudge(grpc_port)
        _killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    finally:
        _remove_shm_regions(shm_prefix)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _parameters_override(value: Any) -> dict[str, Any]:
    """Accept ``{"key": "v"}`` shorthand for Triton's ``{"key": {"string_value": "v"}}``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"config override 'parameters' must be a mapping, got {type(value).__name__}")
    result: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping):
            result[key] = dict(item)
        elif isinstance(item, bool):
            result[key] = {"string_value": "true" if item else "false"}
        else:
            result[key] = {"string_value": str(item)}
    return result


def merge_model_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge a config override into a model config (both in Triton's JSON form).

    Triton *replaces* a model's config with the one sent at load time, so "override only
    ``instance_group`` and ``parameters``" needs the rest of the repository's config. Mappings
    merge key by key (so ``parameters`` keeps the keys not overridden); lists and scalars are
    replaced (so ``instance_group`` is exactly the override's). ``parameters`` values may be
    plain strings or numbers.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key == "parameters":
            value = _parameters_override(value)
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_model_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class TritonServer:
    """A ``tritonserver`` process in explicit model-control mode, on 127.0.0.1.

    One per worker process. Start it with ``await server.start()`` (or ``async with``), talk to
    it at :attr:`grpc_url`, and stop it with ``await server.stop()``: that stops the server and
    every python-backend stub it spawned (they share its process group). A finalizer stops a
    server whose owner is collected or exits without stopping it, and the server gets SIGKILL
    if the owning process dies.

    Parameters
    ----------
    model_repository
        The Triton model repository served, or several (models load only on
        :meth:`load_model`; a model name must be unique across them).
    log_dir
        Directory for ``<name>.triton.log`` (server stdout and stderr, appended). ``None``: a
        temporary file, removed by :meth:`stop`.
    log_verbose
        Triton's ``--log-verbose`` level; default ``tdask.triton.log-verbose``.
    startup_timeout_s
        Bound on the wait for the server to report ready; default ``tdask.triton.startup-timeout``.
    stop_timeout_s
        Bound on a graceful stop; after it everything left is killed with SIGKILL.
    name
        Names the log file and the log lines (e.g. the worker name).
    binary
        A ``tritonserver`` to use instead of the lookup of :func:`find_tritonserver`.
    backend_directory
        Overrides ``--backend-directory`` (the bundle otherwise gets one assembled).
    extra_args
        More ``tritonserver`` flags, appended last.
    env
        Variables added to the server's environment.
    """

    def __init__(
        self,
        *,
        model_repository: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        log_dir: str | os.PathLike[str] | None = None,
        log_verbose: int | None = None,
        startup_timeout_s: float | None = None,
        stop_timeout_s: float = 10.0,
        name: str = "triton",
        binary: str | os.PathLike[str] | TritonBinary | None = None,
        backend_directory: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(model_repository, (str, os.PathLike)):
            model_repository = [model_repository]
        self.model_repositories = [Path(path).resolve() for path in model_repository]
        if not self.model_repositories:
            raise ValueError("TritonServer needs at least one model repository")
        for path in self.model_repositories:
            if not path.is_dir():
                raise FileNotFoundError(f"model repository {str(path)!r} is not a directory")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if log_verbose is None:
            log_verbose = _config("tdask.triton.log-verbose", 0)
        self.log_verbose = int(log_verbose)
        if startup_timeout_s is None:
            startup_timeout_s = _config_seconds("tdask.triton.startup-timeout", 60.0)
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_timeout_s = float(stop_timeout_s)
        self.name = name
        if binary is None or isinstance(binary, TritonBinary):
            self._binary = binary
        else:
            self._binary = TritonBinary(path=Path(binary))
        self._backend_directory = Path(backend_directory) if backend_directory is not None else None
        self.extra_args = list(extra_args)
        self._extra_env = dict(env) if env else None

        self.status = Status.created
        self._lock = asyncio.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._watch: _ProcessWatch | None = None
        self._finalizer: weakref.finalize | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None
        self._log_offset = 0
        self._grpc_port: int | None = None
        self._http_port: int | None = None
        self._stopping = False
        # The python backend names its shared-memory regions with this; one per server so that
        # servers on one host never collide and stop() can remove what a killed server left.
        self._shm_prefix = f"tdask{os.getpid()}-{secrets.token_hex(4)}_"

    # ------------------------------------------------------------------ properties

    @property
    def _safe_name(self) -> str:
        """The name, made safe for a file name."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name) or "triton"

    def __repr__(self) -> str:
        where = f" grpc={self.grpc_url}" if self._grpc_port else ""
        return f"<TritonServer {self.name!r} {self.status.value} pid={self.pid}{where}>"

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:<port>`` of the gRPC endpoint (what ``tritonclient.grpc`` takes)."""
        if self._grpc_port is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        return f"127.0.0.1:{self._grpc_port}"

    @property
    def http_url(self) -> str:
        """``127.0.0.1:<port>`` of the HTTP endpoint."""
        if self._http_port is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        return f"127.0.0.1:{self._http_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id), once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the server has exited, else ``None``."""
        return self._watch.returncode if self._watch is not None else None

    @property
    def log_path(self) -> Path | None:
        """The file that receives the server's output."""
        return self._log_path

    @property
    def model_repository(self) -> Path:
        """The (first) model repository."""
        return self.model_repositories[0]

    @property
    def shm_region_prefix(self) -> str:
        """Prefix of the python backend's shared-memory regions (``/dev/shm/<prefix>*``)."""
        return self._shm_prefix

    def is_alive(self) -> bool:
        """Whether the server process is running (it may still be starting)."""
        return self._watch is not None and not self._watch.exited.is_set()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines this server wrote to its log."""
        return _tail(self._log_path, self._log_offset, lines)

    # ------------------------------------------------------------------ death notification

    def add_exit_callback(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(returncode)`` once the server process exits.

        It runs in a watcher thread (use ``loop.call_soon_threadsafe`` to reach a loop), or
        right away in the caller's thread if the server has already exited.
        """
        if self._watch is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        self._watch.add_callback(callback)

    def remove_exit_callback(self, callback: Callable[[int], None]) -> None:
        """Forget a callback given to :meth:`add_exit_callback`."""
        if self._watch is not None:
            self._watch.remove_callback(callback)

    async def wait(self) -> int:
        """Wait until the server process exits and return its exit status."""
        watch = self._watch
        if watch is None:
            raise RuntimeError(f"Triton server {self.name!r} has not been started")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()

        def notify(returncode: int) -> None:
            def resolve() -> None:
                if not future.done():
                    future.set_result(returncode)

            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(resolve)

        watch.add_callback(notify)
        try:
            return await future
        finally:
            watch.remove_callback(notify)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> TritonServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the server and wait until it is ready; a no-op when it is already running.

        Raises
        ------
        TritonServerError
            The server exited during start-up, or was not ready within ``startup_timeout_s``;
            the message has the exit status and the end of the log. Nothing is left running.
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

    async def _start(self) -> None:
        began = time.monotonic()
        binary = self._binary or find_tritonserver()
        tmp = Path(tempfile.gettempdir())
        _sweep_stale(re.compile(rf"{_WORKDIR_PREFIX}(\d+)-"), tmp)
        _sweep_stale(re.compile(r"tdask(\d+)-[0-9a-f]+_"), _SHM_DIR)
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-{self._safe_name}-"))
        backends = self._backend_directory
        if backends is None and binary.bundle_root is not None:
            backends = _prepare_bundle_backends(binary, self._workdir)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log_path = self.log_dir / f"{self._safe_name}.triton.log"
        else:
            self._log_path = self._workdir / "triton.log"
        env = _server_env(binary, self._extra_env)
        deadline = time.monotonic() + self.startup_timeout_s

        for attempt in range(1, _START_ATTEMPTS + 1):
            self._grpc_port, self._http_port = _free_port(), _free_port()
            while self._http_port == self._grpc_port:
                self._http_port = _free_port()
            args = self._command(binary, backends)
            self._launch(args, env)
            try:
                await self._wait_ready(deadline)
            except TritonServerError as exc:
                port_race = exc.returncode is not None and any(
                    marker in exc.log_tail.lower() for marker in _PORT_IN_USE_MARKERS
                )
                if not port_race or attempt == _START_ATTEMPTS:
                    raise
                logger.info("Triton server %r lost a port race; retrying on other ports", self.name)
                await self._end_process()
                continue
            break
        logger.info(
            "Triton server %r ready in %.2fs: pid=%s grpc=%s http=%s binary=%s log=%s",
            self.name,
            time.monotonic() - began,
            self.pid,
            self.grpc_url,
            self.http_url,
            binary.path,
            self._log_path,
        )

    def _command(self, binary: TritonBinary, backends: Path | None) -> list[str]:
        # The graceful stop waits for in-flight requests for this long, inside stop_timeout_s.
        exit_timeout = max(1, int(self.stop_timeout_s / 2))
        args = [
            str(binary.path),
            *[f"--model-repository={path}" for path in self.model_repositories],
            "--model-control-mode=explicit",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={exit_timeout}",
            "--allow-grpc=true",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self._grpc_port}",
            "--allow-http=true",
            "--http-address=127.0.0.1",
            f"--http-port={self._http_port}",
            "--allow-metrics=false",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--log-verbose={self.log_verbose}",
            # A region name of our own per server, so servers on one host never share one.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        if backends is not None:
            args.append(f"--backend-directory={backends}")
        args.extend(self.extra_args)
        return args

    def _launch(self, args: list[str], env: dict[str, str]) -> None:
        assert self._log_path is not None
        with open(self._log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            log_file.write(f"--- tdask: starting Triton server {self.name!r}: {' '.join(args)}\n".encode())
            log_file.flush()
            logger.debug("Starting Triton server %r: %s", self.name, " ".join(args))
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._workdir,
                start_new_session=True,  # its own process group: stop() signals it with its stubs
                preexec_fn=_make_pdeathsig(),
            )
        # A weak reference: the watcher thread must not keep this object (and its finalizer) alive.
        on_exit = weakref.WeakMethod(self._on_exit)

        def notify(returncode: int) -> None:
            method = on_exit()
            if method is not None:
                method(returncode)

        self._watch = _ProcessWatch(self._process, notify)
        self._finalizer = weakref.finalize(
            self,
            _terminate_at_exit,
            self._process,
            str(self._workdir),
            self._shm_prefix,
            self._grpc_port,
            min(self.stop_timeout_s, 5.0),
        )

    def _on_exit(self, returncode: int) -> None:
        """Runs in the watcher thread when the process exits."""
        if self._stopping or self.status is not Status.running:
            # stop() asked for it, or start() reports it (with the log) by raising.
            logger.debug("Triton server %r exited with %s", self.name, returncode)
            return
        logger.error(
            "Triton server %r (pid %s) exited unexpectedly with status %s; log %s ends with:\n%s",
            self.name,
            self.pid,
            returncode,
            self._log_path,
            self.log_tail(),
        )

    async def _wait_ready(self, deadline: float) -> None:
        """Poll the server's readiness until ``deadline``, failing fast if it exits."""
        from tritonclient.grpc import aio as grpcclient
        from tritonclient.utils import InferenceServerException

        assert self._watch is not None
        last_error: Exception | None = None
        client = grpcclient.InferenceServerClient(self.grpc_url, channel_args=_CONTROL_CHANNEL_ARGS)
        try:
            while True:
                if self._watch.exited.is_set():
                    returncode = self._watch.returncode
                    tail = self.log_tail()
                    raise TritonServerError(
                        f"Triton server {self.name!r} exited with status {returncode} during start-up; "
                        f"log {self._log_path} ends with:\n{tail}",
                        returncode=returncode,
                        log_tail=tail,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = self.log_tail()
                    raise TritonServerError(
                        f"Triton server {self.name!r} was not ready within {self.startup_timeout_s:g}s "
                        f"(last check: {last_error}); log {self._log_path} ends with:\n{tail}",
                        log_tail=tail,
                    )
                try:
                    if await client.is_server_ready(client_timeout=min(1.0, max(remaining, 0.05))):
                        return
                except InferenceServerException as exc:
                    last_error = exc
                await asyncio.sleep(min(_POLL_INTERVAL_S, max(deadline - time.monotonic(), 0)))
        finally:
            await client.close()

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the server and its stubs; safe to call more than once.

        SIGTERM first (Triton unloads models and ends its stubs), then, after
        ``stop_timeout_s``, SIGKILL for whatever is left of the process group. Returns once no
        process of the group is left. ``graceful=False`` sends SIGKILL at once (for a server
        that is broken anyway, e.g. after one of its stubs died).
        """
        async with self._lock:
            if self.status is Status.stopped:
                return
            self.status = Status.stopping
            try:
                await self._shutdown(graceful=graceful)
            finally:
                self.status = Status.stopped

    async def _shutdown(self, graceful: bool = True) -> None:
        """End the process (if any) and remove what start() created."""
        try:
            await self._end_process(graceful)
        finally:
            if self._workdir is not None:
                if self.log_dir is None:
                    self._log_path = None  # the temporary log goes with the workdir
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    async def _end_process(self, graceful: bool = True) -> None:
        process, watch = self._process, self._watch
        self._stopping = True
        try:
            if process is not None and watch is not None:
                await self._terminate(process, watch, graceful)
                _remove_shm_regions(self._shm_prefix)
        finally:
            self._stopping = False
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None

    async def _terminate(self, process: subprocess.Popen[bytes], watch: _ProcessWatch, graceful: bool = True) -> None:
        pgid = process.pid
        deadline = time.monotonic() + self.stop_timeout_s
        if graceful and not watch.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            next_nudge = time.monotonic() + _NUDGE_INTERVAL_S
            while not watch.exited.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_INTERVAL_S)
                if time.monotonic() >= next_nudge:
                    await asyncio.to_thread(_nudge, self._grpc_port)
                    next_nudge = time.monotonic() + _NUDGE_INTERVAL_S
        else:
            # The server is gone already (its orphaned stubs have nobody to answer), or it is
            # broken and not worth a graceful stop: end the whole group now.
            _killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(_group_members, pgid):
                break
            await asyncio.sleep(_POLL_INTERVAL_S)
        else:
            leftovers = await asyncio.to_thread(_group_members, pgid)
            if leftovers:
                logger.warning(
                    "Triton server %r did not stop within %gs; killing %s",
                    self.name,
                    self.stop_timeout_s,
                    [p.pid for p in leftovers],
                )
            _killpg(pgid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5.0
            while time.monotonic() < kill_deadline:
                if watch.exited.is_set() and not await asyncio.to_thread(_group_members, pgid):
                    break
                await asyncio.sleep(_POLL_INTERVAL_S)
            else:
                raise TritonServerError(
                    f"Triton server {self.name!r}: processes of group {pgid} survived SIGKILL",
                    returncode=watch.returncode,
                )
        logger.info("Triton server %r stopped (status %s)", self.name, watch.returncode)

    # ------------------------------------------------------------------ models

    def read_model_config(self, model: str) -> dict[str, Any]:
        """The repository's ``<model>/config.pbtxt`` as Triton's JSON form (``{}`` if absent).

        Raises
        ------
        TritonServerError
            The file does not parse as a Triton ``ModelConfig``.
        """
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        paths = [repo / model / "config.pbtxt" for repo in self.model_repositories]
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            return {}
        try:
            message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as exc:
            raise TritonServerError(f"cannot parse {path}: {exc}") from exc
        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    def build_model_config(self, model: str, override: Mapping[str, Any]) -> dict[str, Any]:
        """The config to load ``model`` with: the repository's, with ``override`` merged in.

        The result is checked against Triton's ``ModelConfig`` schema here, so a misspelt key
        fails with a clear message before the server sees it.
        """
        from google.protobuf import json_format
        from tritonclient.grpc import model_config_pb2

        merged = merge_model_config(self.read_model_config(model), override)
        merged.setdefault("name", model)
        try:
            json_format.ParseDict(merged, model_config_pb2.ModelConfig())
        except json_format.ParseError as exc:
            raise ValueError(f"invalid config override for model {model!r}: {exc}") from exc
        return merged

    def _client(self) -> Any:
        from tritonclient.grpc import aio as grpcclient

        if self.status is not Status.running:
            raise RuntimeError(f"Triton server {self.name!r} is {self.status.value}, not running")
        return grpcclient.InferenceServerClient(self.grpc_url, channel_args=_CONTROL_CHANNEL_ARGS)

    def _request_failed(self, what: str, exc: Exception) -> TritonServerError:
        if not self.is_alive():
            tail = self.log_tail()
            return TritonServerError(
                f"{what} failed: Triton server {self.name!r} exited with status {self.returncode}; "
                f"log ends with:\n{tail}",
                returncode=self.returncode,
                log_tail=tail,
            )
        return TritonServerError(f"{what} failed: {exc}")

    async def load_model(
        self, model: str, config: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Load (or reload) ``model``, optionally with a config override merged into its config.

        Parameters
        ----------
        model
            The model's directory name in the repository.
        config
            Triton JSON config keys to override, e.g.
            ``{"instance_group": [{"kind": "KIND_CPU", "count": 2}], "parameters": {"delay": "0.001"}}``;
            see :func:`merge_model_config`.
        timeout_s
            Bound on the load; ``None`` waits as long as Triton takes.

        Raises
        ------
        TritonServerError
            Triton refused or failed the load (its message says why), or the server is gone.
        """
        from tritonclient.utils import InferenceServerException

        payload = None
        if config:
            payload = json.dumps(self.build_model_config(model, config))
        began = time.monotonic()
        client = self._client()
        try:
            await client.load_model(model, config=payload, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise self._request_failed(f"loading model {model!r} on Triton server {self.name!r}", exc) from exc
        finally:
            await client.close()
        logger.info(
            "Triton server %r loaded model %r in %.2fs%s",
            self.name,
            model,
            time.monotonic() - began,
            " with a config override" if payload else "",
        )

    async def unload_model(self, model: str, *, wait: bool = True, timeout_s: float = 30.0) -> None:
        """Unload ``model``; with ``wait``, return only once Triton reports it unloaded.

        Triton's unload returns as soon as the unload starts, while in-flight requests finish
        and the stubs exit; ``wait`` polls the repository index so the caller knows it is gone.
        """
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout_s
        client = self._client()
        try:
            await client.unload_model(model, client_timeout=timeout_s)
            while wait:
                index = await client.get_model_repository_index(
                    as_json=True, client_timeout=max(deadline - time.monotonic(), 0.1)
                )
                states = [m.get("state", "") for m in index.get("models", []) if m.get("name") == model]
                if not any(state in ("READY", "UNLOADING", "LOADING") for state in states):
                    break
                if time.monotonic() >= deadline:
                    raise TritonServerError(f"model {model!r} still {states} {timeout_s:g}s after unload")
                await asyncio.sleep(_POLL_INTERVAL_S)
        except InferenceServerException as exc:
            raise self._request_failed(f"unloading model {model!r} on Triton server {self.name!r}", exc) from exc
        finally:
            await client.close()
        logger.info("Triton server %r unloaded model %r", self.name, model)
