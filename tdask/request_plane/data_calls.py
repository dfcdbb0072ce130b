"""Data calls on the direct plane's wire, both halves: the data plane's shortcut.

Caller side (:class:`DataCalls`, one per :class:`~tdask.request_plane.direct.DirectRequestPlane`,
and the :class:`~tdask.data_plane.Shortcut` of its process's data plane): fetch, place and release
host tensors of a worker's store with one ``data`` / ``data-reply`` frame pair on the caller's
wire session to that worker, instead of a Dask RPC per tensor. A tensor travels as ``tensor``
(``[dtype, shape]``) and ``bytes`` (its memory, the last field: the wire sends it without a copy,
:meth:`~tdask.transport.Transport.send_with_payload`).

Worker side (:func:`answer_data_call`, called by the worker's
:class:`~tdask.request_plane.direct.DirectServer`): answers from the worker's
:class:`~tdask.data_plane.TensorStore`, refusing what it cannot serve on the wire (a device
tensor, one above ``tdask.wire.max-frame``); a malformed call closes the session.

Whatever a call cannot carry (no wire to the worker, the session closed before the answer, a
refusal) answers ``None`` on the caller's side: the data plane then makes the Dask RPC, which
also reports a worker that is gone. docs/design.md, "Host tensors on the wire".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from distributed.comm.core import CommClosedError

from tdask import protocol, transport
from tdask.config import get_bytes
from tdask.data_plane import TensorStore
from tdask.exceptions import TdaskError
from tdask.protocol import DataAction, ProtocolError, decode_inline, encode_inline
from tdask.transport import MessageTooLargeError, Transport, is_gone

logger = logging.getLogger(__name__)

__all__ = ["DataCalls", "answer_data_call"]

# Room left in a wire frame beside a tensor a data call carries (the message around it).
_FRAME_ROOM = 64 * 1024


class DataCalls:
    """A caller's data calls to workers over its wire sessions (a :class:`~tdask.data_plane.Shortcut`).

    Parameters
    ----------
    session_for
        The caller's session to a worker (opened when needed; raises when it cannot be reached).
    closed
        Whether the caller's plane is closed (no call is made then).
    """

    def __init__(self, session_for: Callable[[str], Awaitable[Transport]], closed: Callable[[], bool]) -> None:
        self._session_for = session_for
        self._closed = closed
        self._calls: dict[int, tuple[str, asyncio.Future[dict[str, Any] | None]]] = {}
        self._next_call = 0

    def reaches(self, owner: str) -> bool:
        """Whether the transport to ``owner`` carries data calls (the door decides: the wire)."""
        return transport.carries_data(owner)

    def on_reply(self, worker: str, message: dict[str, Any]) -> None:
        """A ``data-reply`` arrived from ``worker``: resolve its call."""
        call = self._calls.pop(message["call"], None)
        if call is not None and call[0] == worker and not call[1].done():
            call[1].set_result(message)

    def worker_lost(self, worker: str) -> None:
        """The session to ``worker`` closed: its unanswered calls answer None (Dask's comm then)."""
        for number, (owner, future) in list(self._calls.items()):
            if owner == worker:
                del self._calls[number]
                if not future.done():
                    future.set_result(None)

    async def _call(
        self, worker: str, action: str, payload: memoryview | None = None, **fields: Any
    ) -> dict[str, Any] | None:
        """One data call to ``worker`` over its wire session; None: use Dask's comm.

        ``payload``, when given, travels as the message's ``bytes`` field without a copy here.
        """
        if self._closed() or is_gone(worker):
            return None
        try:
            session = await self._session_for(worker)
        except Exception as exc:  # unreachable: Dask's comm says so, with the data plane's errors
            logger.debug("no session to %s for a data call: %s", worker, exc)
            return None
        if not session.carries_data or session.closed.is_set():  # it fell back to a Dask comm
            return None
        self._next_call += 1
        number = self._next_call
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._calls[number] = (worker, future)
        try:
            await session.drain()
            message = protocol.data(number, action, **fields)
            if payload is None:
                session.send(message)
            else:
                session.send_with_payload(message, "bytes", payload)
            reply = await future
        except (MessageTooLargeError, CommClosedError, OSError):
            return None
        finally:
            self._calls.pop(number, None)
        if reply is None or reply["status"] == "refused":
            return None
        return reply

    async def fetch_tensor(self, owner: str, tensor_id: str, release: bool = False) -> tuple[bool, Any] | None:
        """Fetch a host tensor of ``owner``'s store (see :class:`~tdask.data_plane.Shortcut`)."""
        if release:
            reply = await self._call(owner, DataAction.FETCH, tensor_id=tensor_id, release=True)
        else:
            reply = await self._call(owner, DataAction.FETCH, tensor_id=tensor_id)
        if reply is None:
            return None
        if reply["status"] != "OK":
            return (False, None)
        try:
            return (True, decode_inline({"nd": [*reply["tensor"], reply["bytes"]]}))
        except Exception as exc:  # a malformed answer: Dask's comm gets a second chance
            logger.warning(
                "tensor %s from %s could not be decoded (%s); fetching it over Dask's comm", tensor_id, owner, exc
            )
            return None

    async def put_tensor(self, owner: str, tensor_id: str, array: Any) -> bool | None:
        """Place a host array in ``owner``'s store."""
        if array.nbytes > get_bytes("tdask.wire.max-frame") - _FRAME_ROOM:
            return None
        form, shape, data = encode_inline(array)["nd"]
        reply = await self._call(owner, DataAction.PUT, data, tensor_id=tensor_id, tensor=[form, shape])
        return None if reply is None else reply["status"] == "OK"

    async def release_tensors(self, owner: str, tensor_ids: list[str]) -> bool | None:
        """Release tensors of ``owner``'s store."""
        reply = await self._call(owner, DataAction.RELEASE, tensor_ids=tensor_ids)
        return None if reply is None else reply["status"] == "OK"


def answer_data_call(store: TensorStore | None, session: Transport, message: dict[str, Any]) -> None:
    """Answer a data call from ``store`` (None: every call is refused).

    A malformed one closes the session (its caller's calls then go over Dask's comm) rather
    than leaving it without an answer.

    Raises
    ------
    ProtocolError
        The call lacks its fields or carries no tensor.
    """
    try:
        _answer(store, session, message)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"a malformed data call ({type(exc).__name__}: {exc})") from None


def _answer(store: TensorStore | None, session: Transport, message: dict[str, Any]) -> None:
    number, action = message["call"], message["action"]
    if store is None:
        session.send(protocol.data_reply(number, "refused"))
        return
    if action == DataAction.FETCH:
        array = store.peek(message["tensor_id"])
        if array is None:
            session.send(protocol.data_reply(number, "missing"))
            return
        if not isinstance(array, np.ndarray) or array.dtype.kind == "O":  # a device tensor: UCX moves it
            session.send(protocol.data_reply(number, "refused"))
            return
        form, shape, data = encode_inline(array)["nd"]
        try:  # the tensor's memory, handed to the socket as it is (on the wire)
            session.send_with_payload(protocol.data_reply(number, "OK", tensor=[form, shape]), "bytes", data)
        except MessageTooLargeError:  # above tdask.wire.max-frame: Dask's comm moves it
            session.send(protocol.data_reply(number, "refused"))
            return
        store.serve(message["tensor_id"])  # counted once it left
        if message.get("release") is True:  # its caller is its last user (the payload holds the memory)
            store.drop([message["tensor_id"]])
    elif action == DataAction.PUT:
        try:
            array = decode_inline({"nd": [*message["tensor"], message["bytes"]]})
        except TdaskError as exc:  # not a tensor's bytes
            raise ProtocolError(f"a data call carried no tensor: {exc}") from None
        store.keep(message["tensor_id"], array)
        session.send(protocol.data_reply(number, "OK"))
    elif action == DataAction.RELEASE:
        store.drop(message["tensor_ids"])
        session.send(protocol.data_reply(number, "OK"))
    else:
        session.send(protocol.data_reply(number, "refused"))
