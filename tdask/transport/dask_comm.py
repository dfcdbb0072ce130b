"""A transport on a Dask comm: the broker's sessions, and direct sessions where the wire is not used.

Used wherever tdask's wire (:mod:`tdask.transport.wire`) is not (:mod:`tdask.transport.registry`
decides): every session with the scheduler's broker, and direct caller-to-worker sessions on
``ucx://`` clusters, with ``tdask.request.direct-transport: dask``, or to a worker whose wire
cannot be reached. The comm carries the client's or worker's ``connection_args``, so TLS and UCX
work unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack
from distributed.comm.core import CommClosedError

from tdask.transport.base import MessageHandler, ProtocolError, check_shape

logger = logging.getLogger(__name__)

__all__ = ["Session"]


class Session:
    """One comm carrying one-way messages both ways (the :class:`~tdask.transport.base.Transport` contract).

    A writer task sends what is queued, one msgpack-packed batch per write; :meth:`read_forever`
    hands each incoming message to ``on_message``.
    """

    #: Tensors go over Dask's comm as RPCs (``tdask_fetch``), with Dask's serialization (UCX:
    #: device to device), not as data calls on the session.
    carries_data = False

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

    def send_with_payload(self, message: dict[str, Any], key: str, payload: memoryview) -> None:
        """Queue ``message`` with ``payload`` as its field ``key`` (packed with it: one copy)."""
        self.send({**message, key: payload})

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
