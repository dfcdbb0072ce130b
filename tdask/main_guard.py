"""Fail fast when a script starts a :class:`~tdask.Deployment` without ``if __name__ == "__main__":``.

Dask starts worker processes with multiprocessing's *spawn* method (``distributed.worker.
multiprocessing-method``): each new process imports the main script again (as ``__mp_main__``),
so a deployment started at the script's top level would be started again in every worker,
which then never comes up, and the script hangs. :func:`check_main_guard` finds this before
anything starts: in the script's process, from the line of the script's top-level code that is
running (inside an ``if __name__ == "__main__":`` block or not); in a spawned process, from
multiprocessing's own "still importing the parent's main module" state.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from types import FrameType
from typing import TypeVar

import dask.config

from tdask.exceptions import MainGuardError

__all__ = ["check_main_guard", "watch_for_spawned_start"]

T = TypeVar("T")


def _message(where: str) -> str:
    return (
        f'a tdask Deployment is started at the top level of {where}, outside `if __name__ == "__main__":`. '
        "Its workers are new Python processes that import this script again (multiprocessing's spawn), and "
        "each would start the deployment again: put the code that starts it under "
        '`if __name__ == "__main__":` (as for multiprocessing and Dask\'s LocalCluster).'
    )


def _main_frame(frame: FrameType | None) -> FrameType | None:
    """The frame running the main script's top-level code, if it is on this stack.

    The one of ``sys.modules["__main__"]``'s file (a runner such as ``coverage run`` or ``pdb``
    runs the script as ``__main__`` under its own guarded one), else the outermost.
    """
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    found = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") in ("__main__", "__mp_main__"):
            if main_file is not None and frame.f_code.co_filename == main_file:
                return frame
            found = frame
        frame = frame.f_back
    return found


def _guarded(source: str, line: int) -> bool:
    """Whether top-level line ``line`` of ``source`` lies in an ``if __name__ == "__main__":`` block."""
    for node in ast.parse(source).body:
        if not (node.lineno <= line <= (node.end_lineno or node.lineno)):
            continue
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "__name__" in test and "__main__" in test:
                return True
        return False  # a top-level statement that is not the guard (or the else of one)
    return True  # not found: say nothing rather than guess


def check_main_guard() -> None:
    """Raise :class:`MainGuardError` when a deployment is being started by unguarded top-level script code.

    Does nothing unless workers are spawned (Dask's default) and the call comes from the main
    script's top-level code (a ``python script.py`` or ``python -m module`` run; not an
    interactive session, a notebook or a test runner).

    Raises
    ------
    MainGuardError
        This process is a spawned worker importing the script (the parent's script lacks the
        guard), or the script's running top-level statement is not under the guard.
    """
    if str(dask.config.get("distributed.worker.multiprocessing-method", "spawn")) != "spawn":
        return
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
        message = _message(str(getattr(main, "__file__", None) or "the main script"))
        with contextlib.suppress(OSError):  # tell the parent (watch_for_spawned_start), which would wait for ever
            marker_path(os.getppid()).write_text(message)
        raise MainGuardError(message)
    frame = _main_frame(sys._getframe(1))
    if frame is None:
        return
    filename = frame.f_code.co_filename
    try:
        source = Path(filename).read_text()
        guarded = _guarded(source, frame.f_lineno)
    except (OSError, SyntaxError, ValueError):
        return
    if not guarded:
        raise MainGuardError(_message(f"{filename} (line {frame.f_lineno})"))


def marker_path(pid: int) -> Path:
    """Where a spawned process tells process ``pid`` (its parent) that it re-ran the parent's deployment."""
    return Path(tempfile.gettempdir()) / f"tdask-main-guard-{pid}"


async def watch_for_spawned_start(starting: Awaitable[T], poll_s: float = 0.2) -> T:
    """Await ``starting`` (the deployment's processes), failing fast if a worker process re-ran the script's start.

    A worker process that raised :class:`MainGuardError` as it imported the script (see
    :func:`check_main_guard`) dies and is started again by its nanny, for ever; it leaves a
    marker for this process, which then stops waiting and raises the same error.

    Raises
    ------
    MainGuardError
        A worker process of this one found the script starting a deployment as it imported it.
    """
    marker = marker_path(os.getpid())
    marker.unlink(missing_ok=True)
    task = asyncio.ensure_future(starting)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if marker.exists():
                message = marker.read_text() or _message("the main script")
                await _close_starting_nannies()
                raise MainGuardError(message)
    finally:
        marker.unlink(missing_ok=True)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _close_starting_nannies() -> None:
    """Close this process's nannies still starting (they would restart their dying worker for ever)."""
    from distributed import Nanny
    from distributed.core import Status

    starting = [n for n in list(Nanny._instances) if n.status in (Status.init, Status.starting)]
    await asyncio.gather(
        *(asyncio.wait_for(n.close(timeout=5, reason="tdask-main-guard"), 15) for n in starting),
        return_exceptions=True,
    )
