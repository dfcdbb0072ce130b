"""What the gateway accepts from the network: sizes, timeouts, connections, TLS and a bearer token.

Both frontends read :class:`Limits` and :class:`FrontDoor` from their
:class:`~tdask.gateway.Gateway`; ``python -m tdask.gateway`` sets them from its flags.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["FrontDoor", "Limits", "accept_with_backoff", "check_shape", "check_parameters"]

MiB = 1 << 20

# Element counts and dimensions: what numpy and msgpack can carry (int64).
_MAX_DIM = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The most the gateway takes from one request or one peer.

    Parameters
    ----------
    max_request_bytes
        The largest request body (HTTP, after decompression) or gRPC message, in bytes; larger
        ones are refused before they are buffered (HTTP 413, gRPC ``RESOURCE_EXHAUSTED``). Also the
        largest gRPC message sent.
    max_inflated_bytes
        Compressed HTTP bodies (``Content-Encoding: gzip`` or ``deflate``) are inflated up to this
        many bytes (413 past it); ``0`` (the default) refuses compressed bodies (400).
    header_timeout
        Seconds a connection may take to send a request's headers, and may stay idle between
        requests (HTTP; on gRPC, the connection handshake and the idle connection).
    body_timeout
        Seconds a request may take to send its body (HTTP).
    max_connections
        Open connections at most (HTTP: past it, a new connection is answered 503 and closed;
        gRPC: calls in flight at most, past it ``RESOURCE_EXHAUSTED``).
    """

    max_request_bytes: int = 256 * MiB
    max_inflated_bytes: int = 0
    header_timeout: float = 30.0
    body_timeout: float = 120.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0 or self.max_request_bytes >= 1 << 31:
            raise ValueError(f"max_request_bytes must be in (0, 2 GiB), got {self.max_request_bytes}")
        if self.max_inflated_bytes < 0:
            raise ValueError(f"max_inflated_bytes must be >= 0, got {self.max_inflated_bytes}")
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("header_timeout and body_timeout must be positive")
        if self.max_connections <= 0:
            raise ValueError(f"max_connections must be positive, got {self.max_connections}")


@dataclass(frozen=True, kw_only=True)
class FrontDoor:
    """TLS and authentication of both frontends.

    Parameters
    ----------
    tls_cert, tls_key
        PEM files of the servers' certificate (chain) and key: both protocols serve TLS only.
    tls_ca
        PEM file of the CAs whose client certificates are accepted: clients must present one
        (mutual TLS). Needs ``tls_cert``.
    auth_token
        A bearer token every call must carry (HTTP ``Authorization: Bearer <token>``, gRPC
        ``authorization`` metadata ``Bearer <token>``), else HTTP 401 / ``UNAUTHENTICATED``.
        The health endpoints (HTTP ``/v2/health/live`` and ``/v2/health/ready``, gRPC
        ``ServerLive`` and ``ServerReady``) stay open, for load balancers.
    insecure
        Serve plain text in front of a ``tls://`` cluster (refused otherwise).
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    auth_token: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca (client certificates) needs tls_cert and tls_key")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("auth_token must not be empty")

    @property
    def tls(self) -> bool:
        """True when both protocols serve TLS."""
        return self.tls_cert is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTP server's TLS context (``None`` without TLS)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca is not None:
            context.load_verify_locations(self.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def authorized(self, header: str | None) -> bool:
        """True when no token is set, or ``header`` (an ``Authorization`` value) carries it."""
        if self.auth_token is None:
            return True
        if header is None:
            return False
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.auth_token.encode())


def check_shape(name: str, shape: Any) -> list[int]:
    """A KServe shape as a list of non-negative ints; ``ValueError`` otherwise."""
    if not isinstance(shape, (list, tuple)) or len(shape) > 64:
        raise ValueError(f"input {name!r}: the shape must be a list of at most 64 dimensions")
    out = []
    count = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= _MAX_DIM:
            raise ValueError(
                f"input {name!r}: shape {str(list(shape))[:100]} has a dimension that is not in [0, 2**63)"
            )
        count *= dim
        out.append(dim)
    if count > _MAX_DIM:
        raise ValueError(f"input {name!r}: shape {str(out)[:100]} has more than 2**63 elements")
    return out


def check_parameters(parameters: Any, where: str = "the request") -> dict[str, Any]:
    """KServe ``parameters``: a JSON object of strings, bools, int64s and finite floats; ``ValueError`` otherwise."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}'s 'parameters' must be a JSON object, not {type(parameters).__name__}")
    for key, value in parameters.items():
        if isinstance(value, bool) or isinstance(value, str):
            continue
        if isinstance(value, int):
            if not -(1 << 63) <= value < 1 << 64:
                raise ValueError(f"{where}'s parameter {key!r} is out of the int64 range")
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{where}'s parameter {key!r} is not a finite number")
        else:
            raise ValueError(f"{where}'s parameter {key!r} must be a string, a bool or a number")
    return parameters


# Errors of accept() that mean "out of a resource": back off instead of spinning on them.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def accept_with_backoff(
    sock: socket.socket,
    callback: Callable[[socket.socket, Any], None],
    *,
    first_backoff: float = 0.05,
    max_backoff: float = 1.0,
) -> Callable[[], None]:
    """Call ``callback(connection, address)`` for each connection accepted on ``sock``.

    Like :func:`tornado.netutil.add_accept_handler`, except that when ``accept()`` fails for
    want of a resource (``EMFILE``: out of file descriptors, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``),
    the socket is left alone for a growing pause (50 ms up to 1 s) and one warning is logged per
    10 s, instead of an error with a traceback for every attempt. Returns a function that stops
    accepting.
    """
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"backoff": first_backoff, "warned": 0.0, "failed": 0, "timer": None, "on": True}

    def resume() -> None:
        state["timer"] = None
        if state["on"]:
            loop.add_reader(sock, accept)

    def accept() -> None:
        for _ in range(128):  # as tornado: a bounded burst per wake-up
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                state["failed"] += 1
                now = time.monotonic()
                if now - state["warned"] >= 10.0:
                    logger.warning(
                        "gateway: cannot accept connections on %s (%s); pausing %.2f s (%d failures so far)",
                        sock.getsockname(),
                        exc.strerror,
                        state["backoff"],
                        state["failed"],
                    )
                    state["warned"] = now
                loop.remove_reader(sock)
                state["timer"] = loop.call_later(state["backoff"], resume)
                state["backoff"] = min(state["backoff"] * 2, max_backoff)
                return
            state["backoff"] = first_backoff
            callback(connection, address)

    def stop() -> None:
        state["on"] = False
        if state["timer"] is not None:
            state["timer"].cancel()
        loop.remove_reader(sock)

    loop.add_reader(sock, accept)
    return stop
