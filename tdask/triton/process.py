"""The ``tritonserver`` process and what it leaves behind: start, watch, stop and sweep up.

A server runs in its own process group with its python-backend stubs, gets SIGKILL when its
parent dies (:func:`make_pdeathsig`), and names its shared-memory regions with a prefix of its
own (:func:`new_shm_prefix`), so that whatever a killed server leaves can be found and removed:
by its owner (:func:`killpg`, :func:`remove_shm_regions`), by a finalizer
(:func:`terminate_at_exit`), by its reaper (:class:`Reaper`, running :mod:`tdask.triton.reaper`:
a small process that outlives a SIGKILLed owner or server and ends the stubs at once), or by the
next server started on the host (:func:`sweep_stale_leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tdask.triton import reaper as reaper_program

logger = logging.getLogger(__name__)

__all__ = [
    "LOG_TAIL_LINES",
    "NUDGE_INTERVAL_S",
    "SHM_DIR",
    "WORKDIR_PREFIX",
    "ProcessWatch",
    "Reaper",
    "free_port",
    "group_members",
    "killpg",
    "log_tail",
    "make_pdeathsig",
    "new_shm_prefix",
    "nudge",
    "remove_shm_regions",
    "sweep_stale",
    "sweep_stale_leftovers",
    "terminate_at_exit",
]

#: Lines of the server log quoted in errors.
LOG_TAIL_LINES = 40
#: How often a stopping server is nudged (see :func:`nudge`).
NUDGE_INTERVAL_S = 0.25
#: How often a stop checks whether the server and its stubs are gone.
POLL_INTERVAL_S = 0.05
#: Where the python backend keeps its shared-memory regions.
SHM_DIR = Path("/dev/shm")
#: Prefix of a server's temporary working directory: ``tdask-triton-<owner pid>-<name>-...``.
WORKDIR_PREFIX = "tdask-triton-"
_STALE_AFTER_S = 60.0
_ERROR_LINE = re.compile(r"^E\d{4} |unrecognized option|error:|failed to", re.IGNORECASE)


def free_port() -> int:
    """Return a port free on 127.0.0.1 right now.

    The server may still lose a race for it; :meth:`TritonServer.start` retries then.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_pdeathsig() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the server get SIGKILL when its parent dies.

    So a worker killed with SIGKILL (e.g. by a Nanny) does not leave its server behind. SIGKILL,
    not SIGTERM: an orphaned server has nobody to answer, and a graceful Triton stop takes 3 to
    11 s; its stubs notice the death within about 2 s and exit, and the shared-memory regions
    they leave are swept by the next server started on the host (after a minute).

    Linux ties this to the thread that forked: :meth:`TritonServer.start` must run in a thread
    that lives as long as the server (a worker's event-loop thread does). The libc call is
    resolved here, in the parent, so the child only makes one foreign call between fork and exec.

    Returns
    -------
    callable or None
        ``None`` where the platform has no ``prctl`` (not Linux, or no libc found).
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


def group_members(pgid: int) -> list[psutil.Process]:
    """Return the live (non-zombie) processes in process group ``pgid``: the server and its stubs."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return members


def killpg(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone (or not ours) is ignored."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def new_shm_prefix() -> str:
    """Return a fresh prefix for one server's shared-memory regions (``tdask<pid>-<hex>_``).

    One per server, so that servers on one host never share a region and a server's owner
    (or :func:`sweep_stale_leftovers`) can remove what a killed server left.
    """
    return f"tdask{os.getpid()}-{secrets.token_hex(4)}_"


def remove_shm_regions(prefix: str) -> None:
    """Unlink the python backend's shared-memory regions named ``prefix*``.

    Triton removes them on a clean stop; a SIGKILLed server or stub leaves them behind.
    """
    if not SHM_DIR.is_dir():
        return
    for region in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            region.unlink()


def sweep_stale(owner_pattern: re.Pattern[str], directory: Path) -> None:
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


def sweep_stale_leftovers(tmp: Path) -> None:
    """Remove the working directories (in ``tmp``) and shared-memory regions of dead owners."""
    sweep_stale(re.compile(rf"{WORKDIR_PREFIX}(\d+)-"), tmp)
    sweep_stale(re.compile(r"tdask(\d+)-[0-9a-f]+_"), SHM_DIR)


def nudge(port: int | None) -> None:
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


def log_tail(path: Path | None, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    """Return what of the log after ``offset`` explains a failure: its error lines, then its last lines.

    The error lines come first because Triton often buries them (a bad flag is followed by the
    whole usage text). Reads at most the last 256 KiB.

    Parameters
    ----------
    path
        The log file (``None``: no log, an empty answer).
    offset
        Where this server's part of the (appended) log starts.
    lines
        How many last lines to quote.
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


class ProcessWatch:
    """Waits for the server process in a daemon thread and tells whoever registered.

    Kept apart from :class:`~tdask.triton.server.TritonServer` so that the thread holds no
    reference to the server object (which must stay collectable for its finalizer to run).

    Parameters
    ----------
    process
        The process to wait for.
    on_exit
        The first callback, called with the exit status in the watcher thread.

    Attributes
    ----------
    exited : threading.Event
        Set once the process has exited (``returncode`` is set before).
    returncode : int or None
        The exit status, once the process has exited.
    """

    def __init__(self, process: subprocess.Popen[bytes], on_exit: Callable[[int], object]) -> None:
        self.process = process
        self.exited = threading.Event()
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[int], object]] = [on_exit]
        self._drained = False  # every callback registered so far has been called
        self._thread = threading.Thread(target=self._run, name=f"tdask-triton-watch-{process.pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        returncode = self.process.wait()
        with self._lock:
            self.returncode = returncode
            self.exited.set()
        # Callbacks run in the order they were registered, including those registered while
        # earlier ones run (``TritonServer.wait`` resolves only after the callbacks before it).
        while True:
            with self._lock:
                if not self._callbacks:
                    self._drained = True
                    return
                callback = self._callbacks.pop(0)
            try:
                callback(returncode)
            except Exception:  # a caller's bug must not hide the others' notifications
                logger.exception("Triton exit callback %r failed", callback)

    def add_callback(self, callback: Callable[[int], object]) -> None:
        """Call ``callback(returncode)`` at exit, or now (in this thread) once all are called.

        A callback added after the exit but while the watcher thread is still calling the
        earlier ones is queued behind them, so callbacks always run in the order given.
        """
        with self._lock:
            if not self._drained:
                self._callbacks.append(callback)
                return
            returncode = self.returncode
        assert returncode is not None
        callback(returncode)

    def remove_callback(self, callback: Callable[[int], object]) -> None:
        """Forget ``callback``; one not registered (or already called) is ignored."""
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)


def terminate_at_exit(
    process: subprocess.Popen[bytes],
    workdir: str | None,
    shm_prefix: str,
    grpc_port: int | None,
    grace_s: float,
    reaper: Reaper | None = None,
) -> None:
    """Stop a server its owner forgot (or could not) stop, then drop its files (a finalizer).

    Parameters
    ----------
    process
        The server.
    workdir
        Its working directory, removed at the end.
    shm_prefix
        Its shared-memory prefix (see :func:`remove_shm_regions`).
    grpc_port
        Its gRPC port, nudged while it stops (see :func:`nudge`).
    grace_s
        How long SIGTERM may take before the whole process group gets SIGKILL.
    reaper
        The server's reaper, released at the end.
    """
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=NUDGE_INTERVAL_S)
                nudge(grpc_port)
        killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    finally:
        remove_shm_regions(shm_prefix)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if reaper is not None:
            reaper.release()


class Reaper:
    """The owner's side of a server's reaper (:mod:`tdask.triton.reaper`), which ends its stubs whoever dies.

    The server gets SIGKILL from the kernel when its owner dies (:func:`make_pdeathsig`), but
    its python-backend stubs are the server's children: orphaned, a stub only notices after a
    while, and one that blocks while exiting (seen: still alive 25 minutes later, re-parented
    to PID 1) never does. The reaper, a process of its own, watches two things: a pipe whose
    other end only the owner holds (it reads end-of-file when the owner dies, by any signal) and
    the server itself (a pidfd). When either goes, it SIGKILLs every process of the server's
    process group and every process whose command line carries the server's shared-memory
    prefix (the stubs: their region name is an argument), then unlinks ``/dev/shm/<prefix>*``,
    and exits.

    The owner's orderly stop does the same itself first; it then closes the pipe
    (:meth:`release`) and the reaper finds nothing left to do.

    The reaper runs :mod:`tdask.triton.reaper` by its file's path, in its own session (a Ctrl-C
    to the owner's group must not stop it first), with ``-P`` (its directory, whose modules
    would shadow the standard library's, is not on ``sys.path``): it imports the standard
    library and psutil only, not the ``tdask`` package.

    Parameters
    ----------
    server_pid
        The server (also its process group id).
    shm_prefix
        The server's shared-memory region prefix (:func:`new_shm_prefix`).
    kill_group
        Also kill the processes of ``server_pid``'s process group (a ``tritonserver`` leads its
        own); ``False`` for Triton in a worker's process, which leads no group of its own.
    """

    def __init__(self, server_pid: int, shm_prefix: str, *, kill_group: bool = True) -> None:
        read_end, self._lifeline = os.pipe()  # both close-on-exec: only the reaper gets read_end
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    reaper_program.__file__,
                    str(read_end),
                    str(server_pid),
                    shm_prefix,
                    str(SHM_DIR),
                    "group" if kill_group else "nogroup",
                ],
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the owner's group must not stop it first
            )
        except OSError as exc:  # no reaper: the owner's own cleanup and the next start's sweep remain
            logger.warning("could not start the reaper of Triton server %s: %s", server_pid, exc)
            self.process = None
            os.close(self._lifeline)
        finally:
            os.close(read_end)

    @property
    def pid(self) -> int | None:
        """The reaper's process id (``None`` when it could not be started)."""
        return self.process.pid if self.process is not None else None

    def release(self, timeout: float = 5.0) -> None:
        """The owner is done with the server: let the reaper clean what is left and exit."""
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            os.close(self._lifeline)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def terminate_group(
    process: subprocess.Popen[bytes],
    watch: ProcessWatch,
    *,
    name: str,
    timeout_s: float,
    grpc_port: int | None,
    graceful: bool = True,
) -> bool:
    """Stop a server and every process of its group; False if some survived SIGKILL.

    SIGTERM first (Triton unloads its models and ends its stubs; its gRPC shutdown is nudged
    awake), SIGKILL for the group after ``timeout_s``; ``graceful=False`` kills at once (a
    server already gone, or broken and not worth a graceful stop).
    """
    pgid = process.pid
    deadline = time.monotonic() + timeout_s
    if graceful and not watch.exited.is_set():
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        next_nudge = time.monotonic() + NUDGE_INTERVAL_S
        while not watch.exited.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL_S)
            if time.monotonic() >= next_nudge:
                await asyncio.to_thread(nudge, grpc_port)
                next_nudge = time.monotonic() + NUDGE_INTERVAL_S
    else:
        # The server is gone already (its orphaned stubs have nobody to answer), or it is
        # broken and not worth a graceful stop: end the whole group now.
        killpg(pgid, signal.SIGKILL)
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(group_members, pgid):
            return True
        await asyncio.sleep(POLL_INTERVAL_S)
    leftovers = await asyncio.to_thread(group_members, pgid)
    if leftovers:
        logger.warning(
            "Triton server %r did not stop within %gs; killing %s", name, timeout_s, [p.pid for p in leftovers]
        )
    killpg(pgid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 5.0
    while time.monotonic() < kill_deadline:
        if watch.exited.is_set() and not await asyncio.to_thread(group_members, pgid):
            return True
        await asyncio.sleep(POLL_INTERVAL_S)
    return False
