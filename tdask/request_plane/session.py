"""A transport on a Dask comm: the broker's sessions, and direct sessions on ``tls://``/``ucx://``.

Used wherever tdask's wire (:mod:`tdask.request_plane.wire`) is not: every session with the
scheduler's broker, and direct caller-to-worker sessions on clusters whose comm is not plain TCP
(or with ``tdask.request.direct-transport: dask``). The comm carries the client's or worker's
``connection_args``, so TLS and UCX work unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack
from distributed.comm.core import CommClosedError

from tdask.data_plane import connect_peer
from tdask.protocol import ProtocolError, check_shape
from tdask.request_plane.base import MessageHandler

logger = logging.getLogger(__name__)

__all__ = ["Session", "open_session"]


class Session:
    """One comm carrying one-way messages both ways (the :class:`~tdask.request_plane.base.Transport` contract).

    A writer task sends what is queued, one msgpack-packed batch per write; :meth:`read_forever`
    hands each incoming message to ``on_message``.
    """

    def __init__(self, comm: Any, on_message: MessageHandler, name: str) -> None:
        self.comm = comm
        self.name = name
        self._on_message = on_message
        self._outbox: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self.closed = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the writer task."""
        if self.closed.is_set():
            raise CommClosedError(f"tdask session {self.name} is closed")
        self._outbox.append(message)
        self._wake.set()

    async def drain(self) -> None:
        """Dask's comm buffers writes itself (Tornado's IOStream): nothing to wait for here."""

    async def _write_forever(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._outbox = self._outbox, []
                if batch:
                    # Packed here, once: handed a nested message, distributed would walk it
                    # with sizeof to decide on offloading (35 us per reply, measured) and
                    # again to encode it; a bytes message costs it neither.
                    await self.comm.write(msgpack.packb(batch, use_bin_type=True))
        except (CommClosedError, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("tdask session %s: writing failed", self.name)
        finally:
            self.closed.set()

    async def read_forever(self) -> None:
        """Deliver incoming messages until the comm closes (or the peer breaks the protocol)."""
        try:
            while not self.closed.is_set():
                frame = await self.comm.read()
                if isinstance(frame, bytes):
                    frame = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=False)
                for message in frame if isinstance(frame, (list, tuple)) else [frame]:
                    check_shape(message)
                    try:
                        self._on_message(message)
                    except ProtocolError:
                        raise
                    except Exception:
                        logger.exception("tdask session %s: handling %s failed", self.name, message["op"])
        except (CommClosedError, OSError):
            pass
        except (ProtocolError, ValueError, msgpack.UnpackException) as exc:
            logger.warning("tdask session %s: closing after a bad message: %s", self.name, exc)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the writer and close the comm."""
        self.closed.set()
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        if not self.comm.closed():
            await self.comm.close()

    def abort(self) -> None:
        """Close at once, dropping what is queued."""
        self.closed.set()
        self._outbox.clear()
        self._writer.cancel()
        self.comm.abort()


async def open_session(
    address: str,
    handler: str,
    on_message: MessageHandler,
    *,
    name: str,
    connection_args: dict[str, Any],
    timeout: float | None = None,
    gone_if_refused: bool = False,
    **handshake: Any,
) -> Session:
    """Connect to ``address`` and open a session with its comm handler ``handler``.

    ``handshake`` is passed to the handler (e.g. ``requester=...``); the handler keeps the comm.
    A refused connection fails at once (``OSError``); with ``gone_if_refused`` (a worker, not
    the scheduler) the address is then remembered as gone (:func:`tdask.data_plane.connect_peer`).
    """
    comm = await connect_peer(address, timeout, connection_args=connection_args, mark=gone_if_refused)
    comm.name = name
    await comm.write({"op": handler, "reply": False, **handshake})
    return Session(comm, on_message, name)
