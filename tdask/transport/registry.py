"""The one door to a peer: which transport carries a session, decided here and nowhere else.

As distributed's ``comm/registry.py`` picks a comm backend by an address's scheme, this module
keeps the transports tdask can run a session on (:data:`backends`, by name) and picks, for a
peer's address and ``tdask.request.direct-transport``, the ones to try in order
(:func:`routes`). Callers open sessions with :func:`connect`, workers accept them with a
:class:`Listener`, and the data plane asks :func:`carries_data` whether its shortcut applies to a
peer; none of them knows which transport it got.

=============== ======================================= =========================================
peer            ``tcp://``, ``tls://``                  ``ucx://``, ``inproc://``, other schemes
=============== ======================================= =========================================
a worker        the wire, else a Dask comm (a worker    a Dask comm
                whose wire cannot be reached)
the scheduler   a Dask comm                             a Dask comm
=============== ======================================= =========================================

Before all of these, a worker listening in the caller's own process and event loop (an operator
calling an operator of its own worker) is reached in process (:mod:`tdask.transport.loopback`),
unless ``tdask.request.in-process-calls`` is off.

With ``tdask.request.direct-transport: dask`` every session is a Dask comm. A new transport (a
UCX-native one, shared memory between processes of one host) is a :class:`Backend` added to
:data:`backends` and to :func:`routes`; the planes do not change.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import dask.config
from distributed.comm import get_address_host, parse_address
from distributed.core import send_recv

from tdask.transport import loopback, wire, wire_server
from tdask.transport.base import MessageHandler, Transport
from tdask.transport.dask_comm import Session
from tdask.transport.liveness import connect_peer

logger = logging.getLogger(__name__)

__all__ = [
    "WIRE_ADDRESS",
    "AcceptHandler",
    "Backend",
    "Listener",
    "PeerKind",
    "backends",
    "carries_data",
    "connect",
    "in_process",
    "routes",
]

#: The worker's Dask comm handler that says where its wire listens (None: it has none).
WIRE_ADDRESS = "tdask_wire_address"

#: Called with each accepted session and its hello (``requester`` and any other field the
#: caller sent); returns the handler of that session's messages.
AcceptHandler = Callable[[Transport, dict[str, Any]], MessageHandler]

#: Who is dialled: a worker (its address is remembered as gone when it refuses), or the
#: scheduler (which may come back at the same address, and listens on no wire).
PeerKind = Literal["worker", "scheduler"]

# Schemes whose sockets the wire can share the security of (plain TCP, and TLS with Dask's contexts).
_WIRE_SCHEMES = ("tcp", "tls")


class Backend(abc.ABC):
    """One transport a session can run on: its caller's and its listener's halves."""

    #: The name ``tdask.request.direct-transport`` and log lines use.
    name: ClassVar[str]
    #: Whether the data plane's shortcut rides its sessions (:attr:`Transport.carries_data`).
    carries_data: ClassVar[bool]

    @abc.abstractmethod
    async def connect(
        self,
        address: str,
        handler: str,
        on_message: MessageHandler,
        *,
        name: str,
        kind: PeerKind,
        connection_args: dict[str, Any],
        timeout: float | None,
        hello: dict[str, Any],
    ) -> Transport | None:
        """A session to the peer at ``address`` (its Dask address), or None: try the next backend.

        Raises ``OSError`` when the peer cannot be reached at all (refused: at once).
        """

    @abc.abstractmethod
    async def listen(self, listener: Listener) -> None:
        """Start accepting sessions for ``listener`` (raise ``OSError`` if it cannot)."""

    @abc.abstractmethod
    async def close(self, listener: Listener) -> None:
        """Stop accepting, and abort the sessions this backend accepted for ``listener``."""


class DaskCommBackend(Backend):
    """A session on a Dask comm to the peer's comm handler (every scheme Dask speaks)."""

    name = "dask"
    carries_data = Session.carries_data

    async def connect(
        self,
        address: str,
        handler: str,
        on_message: MessageHandler,
        *,
        name: str,
        kind: PeerKind,
        connection_args: dict[str, Any],
        timeout: float | None,
        hello: dict[str, Any],
    ) -> Transport:
        """Open a comm to ``address`` and hand it to the peer's ``handler`` with ``hello``."""
        comm = await connect_peer(address, timeout, connection_args=connection_args, mark=kind == "worker")
        comm.name = name
        await comm.write({"op": handler, "reply": False, **hello})
        return Session(comm, on_message, name)

    async def listen(self, listener: Listener) -> None:
        """Install ``listener.handler`` among the server's comm handlers."""

        async def serve(comm: Any, **hello: Any) -> None:
            session = Session(comm, _ignore, f"{listener.handler}-{hello.get('requester')}")
            session._on_message = listener.accept(session, hello)
            await session.read_forever()

        listener.server.handlers[listener.handler] = serve

    async def close(self, listener: Listener) -> None:
        """Remove the comm handler (sessions already accepted are the acceptor's to close)."""
        listener.server.handlers.pop(listener.handler, None)


class WireBackend(Backend):
    """tdask's wire (:mod:`tdask.transport.wire`): found through the peer's ``tdask_wire_address``."""

    name = "wire"
    carries_data = wire.WireSession.carries_data

    async def connect(
        self,
        address: str,
        handler: str,
        on_message: MessageHandler,
        *,
        name: str,
        kind: PeerKind,
        connection_args: dict[str, Any],
        timeout: float | None,
        hello: dict[str, Any],
    ) -> Transport | None:
        """Ask the worker where its wire listens, and connect there; None when it has none.

        A worker that cannot be asked raises (it is unreachable); one whose wire cannot be
        reached (a firewall that only opens the worker's Dask port) answers None, so that the
        next backend (its Dask comm) is tried.
        """
        comm = await connect_peer(address, timeout, connection_args=connection_args)  # refused: at once
        try:
            where = await send_recv(comm=comm, op=WIRE_ADDRESS)
        finally:
            await comm.close()
        if not where:
            return None
        try:
            return await wire.open_session(
                where,
                str(hello["requester"]),
                on_message,
                timeout=timeout,
                ssl_context=wire.wire_ssl_context(address, connection_args),
            )
        except (OSError, TimeoutError) as exc:
            logger.warning("cannot reach the wire of %s at %s (%s); using Dask's comm instead", address, where, exc)
            return None

    async def listen(self, listener: Listener) -> None:
        """Listen on the host of the server's own address (``tdask.worker.wire-port``)."""
        server = wire_server.WireServer(lambda session, requester: listener.accept(session, {"requester": requester}))
        port = int(dask.config.get("tdask.worker.wire-port") or 0)
        address = listener.server.address
        ssl_context = wire.wire_ssl_context(address, listener.server.security.get_listen_args("worker"))
        await server.start(get_address_host(address), port, ssl_context=ssl_context)
        listener.wire = server
        listener.server.handlers[WIRE_ADDRESS] = listener.wire_address

    async def close(self, listener: Listener) -> None:
        """Stop advertising the wire, stop listening and abort its sessions."""
        listener.server.handlers.pop(WIRE_ADDRESS, None)
        if listener.wire is not None:
            await listener.wire.close()  # and connections that never said hello
            listener.wire = None


class LoopbackBackend(Backend):
    """Sessions within one process and event loop (:mod:`tdask.transport.loopback`): no socket.

    Its listeners are the workers of this process; a caller whose loop is not the listener's
    (a client on another thread) is not taken (None: the next backend).
    """

    name = "loopback"
    carries_data = loopback.LoopbackSession.carries_data

    def __init__(self) -> None:
        self._listeners: dict[tuple[str, str], tuple[Listener, Any]] = {}  # (address, handler) -> it, its loop
        # The sessions accepted per listener, aborted with it (one that ended goes by itself).
        self._accepted: dict[Listener, weakref.WeakSet[loopback.LoopbackSession]] = {}

    def listens_at(self, address: str) -> bool:
        """Whether a worker of this process listens at ``address`` (on any handler)."""
        return any(where == address for where, _ in self._listeners)

    async def connect(
        self,
        address: str,
        handler: str,
        on_message: MessageHandler,
        *,
        name: str,
        kind: PeerKind,
        connection_args: dict[str, Any],
        timeout: float | None,
        hello: dict[str, Any],
    ) -> Transport | None:
        """Pair with the listener of ``handler`` at ``address`` in this process and loop; None if there is none."""
        entry = self._listeners.get((address, handler))
        if entry is None or entry[1] is not asyncio.get_running_loop():
            return None
        listener = entry[0]
        caller, accepted = loopback.pair(name, on_message, f"{handler}-{hello.get('requester')}")
        self._accepted.setdefault(listener, weakref.WeakSet()).add(accepted)
        accepted._on_message = listener.accept(accepted, hello)
        return caller

    async def listen(self, listener: Listener) -> None:
        """Take this process's callers of ``listener`` (its server's address and handler)."""
        self._listeners[(listener.server.address, listener.handler)] = (listener, asyncio.get_running_loop())

    async def close(self, listener: Listener) -> None:
        """Stop taking callers, and abort the sessions accepted for ``listener``."""
        key = (listener.server.address, listener.handler)
        if self._listeners.get(key, (None,))[0] is listener:
            del self._listeners[key]
        for session in list(self._accepted.pop(listener, ())):
            session.abort()


_LOOPBACK = LoopbackBackend()

#: The transports, by name (``tdask.request.direct-transport``; ``loopback`` is never asked for by name).
backends: dict[str, Backend] = {backend.name: backend for backend in (WireBackend(), DaskCommBackend(), _LOOPBACK)}


def _ignore(message: dict[str, Any]) -> None:
    """The handler of a session not yet accepted (it reads nothing before)."""


def routes(address: str, kind: PeerKind = "worker") -> list[Backend]:
    """The backends to try, in order, for a session with the peer at ``address``.

    Parameters
    ----------
    address : str
        The peer's Dask address; its scheme decides.
    kind : {"worker", "scheduler"}
        Who the peer is: the scheduler listens on no wire.

    Returns
    -------
    list of Backend
        The wire first, then Dask's comm, on ``tcp://`` and ``tls://`` workers (unless
        ``tdask.request.direct-transport`` is ``dask``); Dask's comm alone otherwise. Before
        them, the in-process route to a worker of this process (:func:`in_process`).
    """
    found: list[Backend] = [_LOOPBACK] if kind == "worker" and in_process(address) else []
    if kind == "worker" and dask.config.get("tdask.request.direct-transport") == "wire":
        try:
            scheme = parse_address(address)[0]
        except ValueError:
            scheme = ""
        if scheme in _WIRE_SCHEMES:
            return [*found, backends["wire"], backends["dask"]]
    return [*found, backends["dask"]]


def in_process(address: str) -> bool:
    """Whether the worker at ``address`` listens in this process, and calls to it go in process.

    True for an operator's calls to operators of its own worker, unless
    ``tdask.request.in-process-calls`` is off (then they cross the wire as any other call).
    """
    return _LOOPBACK.listens_at(address) and bool(dask.config.get("tdask.request.in-process-calls", True))


def carries_data(address: str) -> bool:
    """Whether the data plane's shortcut applies to the worker at ``address``.

    It does where that worker's sessions prefer a backend that carries data calls (the wire);
    a session that fell back to a Dask comm still says no (:attr:`Transport.carries_data`).
    """
    return routes(address)[0].carries_data


async def connect(
    address: str,
    handler: str,
    on_message: MessageHandler,
    *,
    requester: str,
    connection_args: dict[str, Any] | None = None,
    timeout: float | None = None,
    kind: PeerKind = "worker",
    name: str | None = None,
    **hello: Any,
) -> Transport:
    """Open a session with the peer at ``address``, on the first of its :func:`routes` that answers.

    Parameters
    ----------
    address : str
        The peer's Dask address.
    handler : str
        The peer's comm handler for the session (``tdask_direct``, ``tdask_session``); a
        :class:`Listener` of that name accepts it on every backend.
    on_message : callable
        Called with every message from the peer.
    requester : str
        This caller's name, told to the peer.
    connection_args : dict, optional
        The client's or worker's ``connection_args`` (TLS, UCX).
    timeout : float, optional
        Seconds to connect.
    kind : {"worker", "scheduler"}
        Who the peer is (see :data:`PeerKind`).
    name : str, optional
        For log lines.
    **hello
        More fields for the peer's acceptor (e.g. ``worker=`` on the broker's session).

    Returns
    -------
    Transport
        Open; reading starts with its :meth:`~Transport.read_forever`.

    Raises
    ------
    OSError
        The peer cannot be reached (refused: at once, and a worker is remembered as gone).
    """
    for backend in routes(address, kind):
        session = await backend.connect(
            address,
            handler,
            on_message,
            name=name or f"{handler}-{requester}",
            kind=kind,
            connection_args=connection_args or {},
            timeout=timeout,
            hello={"requester": requester, **hello},
        )
        if session is not None:
            return session
    raise OSError(f"no transport reaches {address}")  # Dask's comm answers or raises: unreachable


class Listener:
    """An acceptor of sessions for one comm handler, on every backend the server's address allows.

    Parameters
    ----------
    server : distributed.Worker or distributed.Scheduler
        The server whose comm handlers (and address, and security) it uses.
    handler : str
        The comm handler name callers :func:`connect` to.
    accept : callable
        :data:`AcceptHandler`: called with each new session and its hello; the session is read
        by the listener, the acceptor sees its messages and watches ``session.closed``.
    kind : {"worker", "scheduler"}
        Who listens (the scheduler takes sessions on its Dask comm only).

    Attributes
    ----------
    wire : tdask.transport.wire_server.WireServer or None
        The wire listener, where the address's routes include the wire and it could bind.
    """

    def __init__(self, server: Any, handler: str, accept: AcceptHandler, *, kind: PeerKind = "worker") -> None:
        self.server = server
        self.handler = handler
        self.accept = accept
        self.kind = kind
        self.wire: wire_server.WireServer | None = None
        self._backends: list[Backend] = []
        self._advertise = True

    async def start(self) -> None:
        """Accept on every backend of the server's routes; one that cannot listen is skipped, with a warning.

        A worker's listener also takes callers of its own process (:func:`in_process`).
        """
        if self.kind == "worker":
            await _LOOPBACK.listen(self)
            self._backends.append(_LOOPBACK)
        for backend in routes(self.server.address, self.kind):
            if backend is _LOOPBACK:
                continue
            try:
                await backend.listen(self)
            except OSError as exc:
                logger.warning(
                    "no %s on %s (%s): direct callers use Dask's comm", backend.name, self.server.address, exc
                )
                continue
            self._backends.append(backend)

    def wire_address(self) -> str | None:
        """Where callers reach the wire (None: use Dask's comm), the ``tdask_wire_address`` handler."""
        return self.wire.address if self.wire is not None and self._advertise else None

    def stop_advertising(self) -> None:
        """Tell no new caller about backends other than Dask's comm (the worker is leaving)."""
        self._advertise = False

    async def close(self) -> None:
        """Stop accepting on every backend."""
        for backend in self._backends:
            await backend.close(self)
        self._backends = []
