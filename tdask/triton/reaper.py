"""The reaper: a small process that ends what a Triton server leaves when its owner or the server dies.

:class:`tdask.triton.process.Reaper` starts one per server and holds the other end of its
lifeline, a pipe. The reaper waits until the lifeline reads end-of-file (the owner died, by any
signal, or released it) or the server exits (a pidfd), or until it gets SIGTERM. Then, for at
most :data:`KILL_WINDOW_S`, it SIGKILLs every live process of the server's process group (unless
told ``nogroup``) and every process whose command line carries the server's shared-memory prefix
(the python-backend stubs: their region name is an argument), unlinks ``<shm dir>/<prefix>*`` and
exits.

Command line: ``LIFELINE_FD SERVER_PID SHM_PREFIX SHM_DIR [group|nogroup]``. The owner runs this
file by its path (``python -P .../reaper.py``): ``python -m tdask.triton.reaper`` runs the same
program, but imports the ``tdask`` package first (dask and distributed with it: about half a
second and 90 MB more, per server). So this module imports only the standard library and psutil.
"""

from __future__ import annotations

import argparse
import glob
import os
import select
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from types import FrameType

import psutil

__all__ = ["KILL_WINDOW_S", "leftovers", "main", "reap", "remove_regions", "wait_for_either"]

#: How long the reaper goes on killing what it finds (a stub may be forking as it is killed).
KILL_WINDOW_S = 10.0
#: Pause between two sweeps of the process table.
SWEEP_INTERVAL_S = 0.05
#: Without a pidfd (Linux < 5.3): how often the server's life is checked.
_POLL_S = 1.0


def leftovers(server: int, prefix: str, *, group: bool) -> list[psutil.Process]:
    """Return the live processes the server left: its process group's, and those naming ``prefix``.

    Parameters
    ----------
    server
        The server's pid, which is also its process group's id.
    prefix
        The server's shared-memory prefix; a process whose command line carries it is one of the
        server's stubs.
    group
        Whether the members of process group ``server`` count (a ``tritonserver`` leads its own;
        Triton in a worker's process does not).

    Returns
    -------
    list of psutil.Process
        Every such process except zombies and this one.
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if group and os.getpgid(proc.pid) == server:
                found.append(proc)
                continue
        except OSError:  # gone meanwhile
            continue
        if any(prefix in argument for argument in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def kill(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL each of ``processes``; one already gone (or not ours to kill) is skipped."""
    for proc in processes:
        try:
            proc.kill()  # psutil checks the pid was not reused since the process was listed
        except psutil.Error:
            continue


def remove_regions(shm_dir: str, prefix: str) -> None:
    """Unlink the shared-memory regions named ``prefix*`` in ``shm_dir``; errors are ignored."""
    for region in glob.glob(os.path.join(shm_dir, glob.escape(prefix) + "*")):
        try:
            os.unlink(region)
        except OSError:
            continue


def reap(server: int, prefix: str, shm_dir: str, *, group: bool, window_s: float = KILL_WINDOW_S) -> None:
    """Kill what the server left until nothing is found (at most ``window_s``), then remove its regions.

    Parameters
    ----------
    server, prefix, group
        As for :func:`leftovers`.
    shm_dir
        Where the python backend keeps its shared-memory regions (``/dev/shm``).
    window_s
        How long to go on finding and killing.
    """
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        found = leftovers(server, prefix, group=group)
        if not found:
            break
        kill(found)
        time.sleep(SWEEP_INTERVAL_S)
    remove_regions(shm_dir, prefix)


def _server_gone(server: int) -> bool:
    try:
        return psutil.Process(server).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def wait_for_either(lifeline: int, server: int) -> None:
    """Return once ``lifeline`` reads end-of-file (or data), the server exits, or SIGTERM arrives.

    Parameters
    ----------
    lifeline
        The read end of the pipe whose write end only the owner holds.
    server
        The server's pid, watched through a pidfd (polled where the kernel has none).
    """
    try:
        pidfd: int | None = os.pidfd_open(server)
    except ProcessLookupError:
        return  # the server is gone already: clean up now
    except InterruptedError:  # SIGTERM (see main)
        return
    except (OSError, AttributeError):  # no pidfd here: poll the server's life instead
        pidfd = None
    watched = [lifeline] if pidfd is None else [lifeline, pidfd]
    try:
        while True:
            ready, _, _ = select.select(watched, [], [], _POLL_S if pidfd is None else None)
            if ready or _server_gone(server):
                return
    except InterruptedError:  # SIGTERM (see main): stop watching, clean up now
        return
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise InterruptedError


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tdask.triton.reaper",
        description="End a Triton server's leftovers once its owner or the server dies.",
    )
    parser.add_argument("lifeline", type=int, help="read end of the owner's pipe (end-of-file: the owner is gone)")
    parser.add_argument("server", type=int, help="the server's pid (and process group id)")
    parser.add_argument("prefix", help="the server's shared-memory prefix")
    parser.add_argument("shm_dir", help="where the shared-memory regions are (/dev/shm)")
    parser.add_argument(
        "scope",
        nargs="?",
        choices=("group", "nogroup"),
        default="group",
        help="also kill the server's process group (default), or only the processes naming the prefix",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reaper: wait (:func:`wait_for_either`), then :func:`reap`.

    Parameters
    ----------
    argv
        The arguments (see the module doc); default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status, 0.
    """
    args = _parse(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the owner's terminal is not the owner's end
    signal.signal(signal.SIGTERM, _interrupt)
    wait_for_either(args.lifeline, args.server)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleaning up now: a second SIGTERM changes nothing
    reap(args.server, args.prefix, args.shm_dir, group=args.scope == "group")
    return 0


if __name__ == "__main__":
    sys.exit(main())
