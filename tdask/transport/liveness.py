"""Peer liveness: which peers are known gone, and connecting to one that may be.

A worker that died leaves its address behind in registries and descriptors for a while. Dialing
it with distributed's ``connect`` retries a refused connection until the connect timeout (5 s
here, 30 s by default), on every call. Here a refusal is known after one short attempt, the
address is remembered as gone (for a minute, or until the registry lists it again), and every
later call to it fails at once with :class:`PeerGoneError`. Both transports and the data plane's
RPCs connect through :func:`connect_peer`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from distributed.comm import connect, parse_address, parse_host_port
from distributed.comm.core import CommClosedError
from distributed.core import send_recv

from tdask.config import get_seconds

if TYPE_CHECKING:
    from distributed.comm import Comm
    from distributed.core import ConnectionPool

logger = logging.getLogger(__name__)

__all__ = ["PeerGoneError", "call_peer", "connect_peer", "forget_gone", "is_gone", "mark_gone"]

# Worker addresses known to be gone (their connection was refused, or the scheduler removed them),
# and since when. Addresses of new workers are fresh ports, so a mark is rarely wrong; it expires
# anyway, and evidence of life (the registry listing the address) clears it.
_GONE_TTL_S = 60.0
_gone: dict[str, float] = {}
# The first connection attempt to a peer; a refusal is known after at most this long.
_FIRST_ATTEMPT_S = 0.1


class PeerGoneError(ConnectionError):
    """A peer is gone: it refused the connection, or the scheduler removed it."""


def mark_gone(address: str) -> None:
    """Remember that the worker at ``address`` is gone (its store went with it)."""
    if address not in _gone:
        logger.debug("peer %s is gone", address)
    _gone[address] = time.monotonic()


def is_gone(address: str) -> bool:
    """Whether ``address`` is known to be gone (one dict lookup when nothing is)."""
    since = _gone.get(address)
    if since is None:
        return False
    if time.monotonic() - since > _GONE_TTL_S:
        _gone.pop(address, None)
        return False
    return True


def forget_gone(addresses: Iterable[str], older_than: float = 0.0) -> None:
    """These addresses are alive after all, unless marked gone less than ``older_than`` s ago.

    The registry calls this with the hosts it lists: a worker the scheduler still lists seconds
    after it was marked gone is a new one that got the same port, not the dead one.
    """
    if _gone:
        now = time.monotonic()
        for address in addresses:
            since = _gone.get(address)
            if since is not None and now - since >= older_than:
                del _gone[address]


def _refused(exc: BaseException) -> bool:
    """Whether a connection error says the peer refused (no process listens there any more)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError) or "ConnectionRefusedError" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


async def connect_peer(
    address: str,
    timeout: float | None,
    *,
    pool: ConnectionPool | None = None,
    connection_args: dict[str, Any] | None = None,
    mark: bool = True,
) -> Comm:
    """A comm to ``address`` (from ``pool`` when given), failing at once when the peer is gone.

    distributed's ``connect`` retries a refused connection until its timeout (5 s here, 30 s by
    default): a peer that died would cost that much each time. Here the first attempt is bounded
    to 0.1 s, and a refusal raises :class:`PeerGoneError` at once (``mark``: and remembers the
    address as gone; not for a scheduler, which may come back at the same address). Attempts
    that merely time out are retried, longer each time, until ``timeout``.
    """
    if mark and is_gone(address):
        raise PeerGoneError(f"{address} is gone")
    deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
    attempt = _FIRST_ATTEMPT_S
    while True:
        left = max(deadline - time.monotonic(), 1e-3)
        try:
            if pool is not None:
                return await pool.connect(address, timeout=min(attempt, left))
            return await connect(address, timeout=min(attempt, left), **(connection_args or {}))
        except OSError as exc:
            # distributed keeps only its last attempt's error: a refusal followed by an attempt
            # cut short by the deadline reads as a timeout. Ask the port once more, directly.
            if _refused(exc) or await _refuses(address):
                if mark:
                    mark_gone(address)
                raise PeerGoneError(f"{address} refused the connection: it is gone") from exc
            if (mark and is_gone(address)) or time.monotonic() >= deadline:
                raise
            attempt *= 4


async def _refuses(address: str) -> bool:
    """Whether a plain TCP connection to ``address`` (``tcp://``/``tls://``) is refused right now."""
    try:
        scheme, location = parse_address(address)
        if scheme not in ("tcp", "tls"):
            return False
        host, port = parse_host_port(location)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()  # someone listens: the peer is alive, only slow
    return False


async def call_peer(pool: ConnectionPool, address: str, op: str, *, mark: bool = True, **kwargs: Any) -> Any:
    """One RPC to a worker (or, with ``mark=False``, the scheduler) over ``pool``.

    Gives up on connecting after ``tdask.data-plane.connect-timeout``, and at once when the
    peer is gone (:func:`connect_peer`). A pooled comm found broken is replaced once: a live
    peer answers on a fresh one, a dead one refuses it.
    """
    timeout = get_seconds("tdask.data-plane.connect-timeout")
    for fresh in (False, True):
        comm = await connect_peer(address, timeout, pool=pool, mark=mark)
        try:
            return await send_recv(comm=comm, op=op, **kwargs)
        except CommClosedError:
            if fresh:
                raise
        finally:
            pool.reuse(address, comm)
