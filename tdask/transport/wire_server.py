"""A worker's wire listener: callers' connections become :class:`~tdask.transport.wire.WireSession` objects.

The listening half of tdask's wire (:mod:`tdask.transport.wire` has the session and its framing,
both ends'). It enforces what a connection must do before it is served: say a valid hello
within ``tdask.wire.hello-timeout`` (a TLS handshake included), in a first frame of at most 64
KiB; and it holds at most ``tdask.wire.max-connections`` connections, closing the rest at once.
Refusals and silent peers are logged at most once a minute each.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import dask.config

from tdask.config import get_seconds
from tdask.transport.base import MessageHandler
from tdask.transport.wire import _HANDSHAKE_TIMEOUT, WIRE_VERSION, WireProtocolError, WireSession, _preview

logger = logging.getLogger(__name__)

__all__ = ["AcceptHandler", "WireServer"]

_LOG_EVERY = 60.0  # seconds between two warnings of one kind from one server (refusals, silent peers)

# Called with a new session and its requester's name; returns the handler of its messages.
AcceptHandler = Callable[[WireSession, str], MessageHandler]


class _Refused(asyncio.Protocol):
    """A connection beyond ``tdask.wire.max-connections``: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class WireServer:
    """A worker's wire listener: each caller's connection becomes a :class:`WireSession`.

    Parameters
    ----------
    accept : callable
        Called with each session that said a valid hello and its requester's name; returns the
        handler of that session's messages.

    Attributes
    ----------
    address : str or None
        ``host:port`` once started.
    """

    def __init__(self, accept: AcceptHandler) -> None:
        self._accept = accept
        self._server: asyncio.Server | None = None
        self._sessions: set[WireSession] = set()  # until they close: aborted with the server
        self._waiting: dict[WireSession, asyncio.TimerHandle] = {}  # no hello yet: their deadlines
        self._max_connections = 0
        self._hello_timeout: float | None = None
        self._refused = 0
        self._silent = 0
        self._logged: dict[str, float] = {}
        self.address: str | None = None

    async def start(self, host: str, port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on ``host:port`` (0: any free port).

        Parameters
        ----------
        host, port
            Where to listen.
        ssl_context : ssl.SSLContext, optional
            The worker's own Dask listen context on ``tls://`` clusters (:func:`wire_ssl_context`).

        Returns
        -------
        str
            The address bound, ``host:port``.
        """
        self._max_connections = int(dask.config.get("tdask.wire.max-connections"))
        self._hello_timeout = get_seconds("tdask.wire.hello-timeout")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection,
            host,
            port,
            backlog=int(dask.config.get("distributed.comm.socket-backlog")),
            ssl=ssl_context,
            # A handshake that does not finish counts against the hello deadline too.
            ssl_handshake_timeout=(self._hello_timeout or None) if ssl_context is not None else None,
        )
        bound = self._server.sockets[0].getsockname()
        self.address = f"[{host}]:{bound[1]}" if ":" in host else f"{host}:{bound[1]}"
        return self.address

    def _new_connection(self) -> asyncio.BaseProtocol:
        if len(self._sessions) >= self._max_connections:
            self._refused += 1
            self._warn(
                "refused",
                "wire on %s: %d connections open (tdask.wire.max-connections); refusing more (%d so far)",
                self.address,
                len(self._sessions),
                self._refused,
            )
            return _Refused()
        session = WireSession("incoming", on_close=lambda: self._forget(session))
        session._on_message = lambda message: self._hello(session, message)
        # Without a hello deadline, still one for a TLS handshake that fails: asyncio then never
        # tells the session (no connection_made, no connection_lost), and it would stay counted.
        deadline = self._hello_timeout if self._hello_timeout is not None else _HANDSHAKE_TIMEOUT
        self._waiting[session] = asyncio.get_running_loop().call_later(deadline, self._hello_missed, session)
        self._sessions.add(session)
        return session

    def _forget(self, session: WireSession) -> None:
        self._sessions.discard(session)
        timer = self._waiting.pop(session, None)
        if timer is not None:
            timer.cancel()

    def _hello_missed(self, session: WireSession) -> None:
        self._waiting.pop(session, None)
        if self._hello_timeout is None and session._transport is not None:
            return  # no hello deadline, and connected: forgotten when its connection is lost
        self._silent += 1
        self._warn(
            "silent",
            "wire on %s: closing %s, which said no hello within %ss (tdask.wire.hello-timeout; %d so far)",
            self.address,
            session.peer,
            self._hello_timeout,
            self._silent,
        )
        self._forget(session)  # now: its transport may not exist yet (a TLS handshake under way)
        session.abort()

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """Log ``message`` at most once per minute per ``kind`` (a flood must not flood the log)."""
        now = time.monotonic()
        if now - self._logged.get(kind, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[kind] = now
            logger.warning(message, *args)

    def _hello(self, session: WireSession, message: dict[str, Any]) -> None:
        if message["op"] != "hello" or message.get("wire") != WIRE_VERSION or not message.get("requester"):
            raise WireProtocolError(f"expected a wire version {WIRE_VERSION} hello, got {_preview(message)}")
        timer = self._waiting.pop(session, None)
        if timer is not None:
            timer.cancel()
        requester = str(message["requester"])
        session.name = f"from {requester}"
        session._limit = session._max_frame
        session._on_message = self._accept(session, requester)

    async def close(self) -> None:
        """Stop listening and abort every session (those that never said hello too)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self._sessions):
            session.abort()
        for timer in self._waiting.values():
            timer.cancel()
        self._waiting.clear()
