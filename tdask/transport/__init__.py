"""Transports: how two tdask processes exchange one-way messages, and how a peer is reached.

=============== ==========================================================================
module          role
=============== ==========================================================================
``base``        the contract (:class:`Transport`), the shape every message must have
``registry``    the one door: :func:`connect`, :class:`Listener`, :func:`carries_data`;
                which transport reaches a peer is decided there and nowhere else
``wire``        tdask's lean transport (an ``asyncio`` protocol) for direct sessions on
                ``tcp://`` and ``tls://``: a session and its framing, both ends'
``wire_server`` the wire's listening half on a worker: hello deadline, connection cap
``loopback``    sessions within one process and event loop (an operator calling its own
                worker's operators): no socket
``dask_comm``   a transport on a Dask comm (TCP, TLS, UCX): the broker's sessions, and direct
                sessions where the wire is not used
``liveness``    peers known gone, and connecting to one that may be
=============== ==========================================================================

Nothing here knows a plane, an operator or the meaning of a message beyond its ``op``.
"""

from __future__ import annotations

from tdask.transport.base import MessageHandler, MessageTooLargeError, ProtocolError, Transport, check_shape
from tdask.transport.liveness import PeerGoneError, call_peer, connect_peer, forget_gone, is_gone, mark_gone
from tdask.transport.registry import (
    WIRE_ADDRESS,
    AcceptHandler,
    Backend,
    Listener,
    PeerKind,
    backends,
    carries_data,
    connect,
    in_process,
    routes,
)

__all__ = [
    "WIRE_ADDRESS",
    "AcceptHandler",
    "Backend",
    "Listener",
    "MessageHandler",
    "MessageTooLargeError",
    "PeerGoneError",
    "PeerKind",
    "ProtocolError",
    "Transport",
    "backends",
    "call_peer",
    "carries_data",
    "check_shape",
    "connect",
    "connect_peer",
    "forget_gone",
    "in_process",
    "is_gone",
    "mark_gone",
    "routes",
]
