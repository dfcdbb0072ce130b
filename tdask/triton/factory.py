"""One way to get the worker's Triton server, of the kind ``tdask.triton.mode`` names.

``in-process`` (the default): :class:`~tdask.triton.inprocess.InProcessServer`, Triton's core in
this process. ``subprocess``: :class:`~tdask.triton.server.TritonServer`, a ``tritonserver`` per
worker. Either is used through :class:`~tdask.triton.base.TritonServerBase` alone.
"""

from __future__ import annotations

import dask.config

from tdask.triton.base import TritonServerBase
from tdask.triton.options import TritonOptions

__all__ = ["MODES", "make_server", "start_server"]

#: The values of ``tdask.triton.mode``.
MODES = ("in-process", "subprocess")


def make_server(options: TritonOptions, *, mode: str | None = None) -> TritonServerBase:
    """Return a Triton server of the configured kind, not started yet.

    Parameters
    ----------
    options
        What to run.
    mode
        ``"in-process"`` or ``"subprocess"``; default ``tdask.triton.mode``.

    Returns
    -------
    TritonServerBase
        An :class:`~tdask.triton.inprocess.InProcessServer` or a
        :class:`~tdask.triton.server.TritonServer`.

    Raises
    ------
    ValueError
        ``mode`` is neither.
    """
    if mode is None:
        mode = str(dask.config.get("tdask.triton.mode", "in-process"))
    if mode == "in-process":
        from tdask.triton.inprocess import InProcessServer

        return InProcessServer.from_options(options)
    if mode == "subprocess":
        from tdask.triton.server import TritonServer

        return TritonServer.from_options(options)
    raise ValueError(f"tdask.triton.mode is {mode!r}; expected 'in-process' or 'subprocess'")


async def start_server(options: TritonOptions, *, mode: str | None = None) -> TritonServerBase:
    """Make a Triton server of the configured kind (:func:`make_server`) and start it.

    Raises
    ------
    TritonServerError
        It failed to start (nothing is left running; the message says why).
    ValueError
        ``mode`` is not a kind.
    """
    server = make_server(options, mode=mode)
    await server.start()
    return server
