"""The caller's side of the scheduler's operator registry: who hosts what, and what failed.

The registry itself lives in the broker (:class:`tdask.scheduler.broker.RequestBroker`),
installed on the scheduler on first use by whoever needs it, so a plain ``dask scheduler`` works.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from distributed.core import PooledRPCCall
from distributed.protocol.pickle import dumps

from tdask.exceptions import SchedulerLostError
from tdask.protocol import Rpc
from tdask.scheduler.broker import BROKER_NAME, RequestBroker
from tdask.transport import call_peer, forget_gone

logger = logging.getLogger(__name__)

__all__ = ["Registry"]

# How long a caller trusts the hosts the registry gave it; a host that cannot be reached drops
# the entry at once (forget_hosts).
_HOSTS_TTL_S = 1.0
# A mark "gone" older than this on a host the scheduler lists is a new worker on the same port.
_GONE_STALE_S = 5.0


class Registry:
    """Registry calls over an RPC to the scheduler (``client.scheduler`` or ``worker.scheduler``).

    Parameters
    ----------
    scheduler
        A ``distributed.core.rpc`` (or ``PooledRPCCall``) to the scheduler.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._broker_ready = False
        self._hosts: dict[str, tuple[float, list[str]]] = {}
        # While the scheduler cannot be reached: when to ask it again (hosts come from the cache).
        self._retry_at = 0.0
        # Cached with the hosts, read on the caller's hot path: the operator's routing policy
        # (absent: least-loaded) and its hosts' worker names.
        self._routing: dict[str, dict[str, Any]] = {}
        self._names: dict[str, dict[str, str]] = {}
        self._slots: dict[str, dict[str, int]] = {}  # operator -> host -> its max_inflight_requests
        # name -> (when, the highest version hosted): callers that name no version
        self._latest: dict[str, tuple[float, int]] = {}

    @property
    def address(self) -> str:
        """The scheduler's address."""
        return str(self.scheduler.address)

    async def _call(self, op: str, **kwargs: Any) -> Any:
        """One RPC to the scheduler; a scheduler that is gone fails at once (``OSError``).

        Over the caller's connection pool when it has one (a ``Client``'s or a ``Worker``'s), so
        that a refused connection is not retried for distributed's whole connect timeout.
        """
        try:
            if isinstance(self.scheduler, PooledRPCCall):
                return await call_peer(self.scheduler.pool, self.address, op, mark=False, **kwargs)
            return await getattr(self.scheduler, op)(**kwargs)
        except OSError:
            self._broker_ready = False  # a scheduler that comes back has no broker yet
            raise

    def broker_lost(self) -> None:
        """The session with the broker closed: install it again before the next use."""
        self._broker_ready = False

    async def ensure_broker(self) -> None:
        """Install the broker on the scheduler once (idempotent across clients and workers)."""
        if not self._broker_ready:
            await self._call(
                "register_scheduler_plugin", plugin=dumps(RequestBroker()), name=BROKER_NAME, idempotent=True
            )
            self._broker_ready = True

    async def _broker_call(self, op: str, **kwargs: Any) -> Any:
        """A broker RPC; installs the broker again when the scheduler has none (it restarted)."""
        await self.ensure_broker()
        result = await self._call(op, **kwargs)
        if result is None:  # distributed answers None for a handler it does not have
            self._broker_ready = False
            await self.ensure_broker()
            result = await self._call(op, **kwargs)
        return result

    async def hosts(self, operator_key: str) -> list[str]:
        """Addresses of the workers hosting ``operator_key``, as the registry said at most a second ago.

        When the scheduler cannot be reached, the hosts last known are used (and the scheduler
        asked again at most once a second); with none known, :class:`SchedulerLostError`.
        """
        now = time.monotonic()
        cached = self._hosts.get(operator_key)
        if cached is not None and (now - cached[0] <= _HOSTS_TTL_S or now < self._retry_at):
            return cached[1]
        try:
            answer = await self._broker_call(Rpc.HOSTS, operator=operator_key, routing=True)
        except OSError as exc:
            self._retry_at = now + _HOSTS_TTL_S
            if cached is not None:
                logger.warning(
                    "the scheduler at %s cannot be reached (%s); using the hosts of %s known %.1fs ago",
                    self.address,
                    exc,
                    operator_key,
                    now - cached[0],
                )
                return cached[1]
            raise SchedulerLostError(
                f"the scheduler at {self.address} cannot be reached ({exc}), and no host of {operator_key} "
                "is known here"
            ) from None
        self._retry_at = 0.0
        hosts: list[str] = answer["hosts"]
        if answer["routing"] is None:
            self._routing.pop(operator_key, None)
        else:
            self._routing[operator_key] = answer["routing"]
        self._names[operator_key] = answer["names"]
        self._slots[operator_key] = answer.get("slots") or {}  # a broker of before: none known
        if hosts:  # an empty answer is asked again next time
            self._hosts[operator_key] = (now, hosts)
            forget_gone(hosts, older_than=_GONE_STALE_S)
        return list(hosts or [])

    def routing(self, operator_key: str) -> dict[str, Any] | None:
        """The routing policy of ``operator_key`` learnt with its hosts (``None``: least-loaded)."""
        return self._routing.get(operator_key)

    def slots(self, operator_key: str, host: str) -> int:
        """``host``'s ``max_inflight_requests`` for ``operator_key``, as learnt with the hosts (0: unknown)."""
        return self._slots.get(operator_key, {}).get(host, 0)

    def address_of(self, operator_key: str, name: str) -> str | None:
        """The address of the host of ``operator_key`` whose worker name is ``name``, as last learnt."""
        return self._names.get(operator_key, {}).get(name)

    def forget_hosts(self, operator_key: str) -> None:
        """Drop the cached hosts of ``operator_key`` (one of them could not be reached)."""
        self._hosts.pop(operator_key, None)

    async def operators(self) -> dict[str, Any]:
        """The registry: hosts per operator, setup failures, queue depths and serving counters."""
        return await self._broker_call(Rpc.OPERATORS)

    async def signatures(self) -> dict[str, Any]:
        """Each hosted operator's signature (``None``: undeclared), by ``name/version``."""
        result: dict[str, Any] = await self._broker_call(Rpc.SIGNATURES)
        return result

    async def register(
        self, worker: str, requester: str, operators: list[dict[str, Any]], failures: dict[str, str]
    ) -> None:
        """Announce the operators ``worker`` hosts (and those whose setup failed there)."""
        await self.ensure_broker()
        await self._call(Rpc.REGISTER, worker=worker, requester=requester, operators=operators, failures=failures)

    async def unregister(
        self, worker: str, *, release_leases: bool, operators: list[str] | None = None, removing: bool = True
    ) -> None:
        """Stop giving ``worker`` requests; with ``release_leases``, re-queue what it holds.

        ``operators``: only for these keys (``name/version``); default: every operator it hosts.
        ``removing=False``: they may come back (autoscaling), so their callers wait for a host.
        """
        if operators is None:
            await self._call(Rpc.UNREGISTER, worker=worker, release_leases=release_leases)
        else:
            await self._call(
                Rpc.UNREGISTER, worker=worker, release_leases=release_leases, operators=operators, removing=removing
            )

    async def latest(self, name: str) -> int | None:
        """The highest version of ``name`` hosted now, as the registry said at most a second ago.

        While none is hosted (an operator autoscaled to zero), the version last seen here; ``None``
        when none ever was (then a caller asks for version 1 and waits for it, as before). While
        the scheduler cannot be reached, the version last known.
        """
        now = time.monotonic()
        cached = self._latest.get(name)
        if cached is not None and (now - cached[0] <= _HOSTS_TTL_S or now < self._retry_at):
            return cached[1]
        try:
            answer = await self._broker_call(Rpc.LATEST, name=name)
        except OSError:
            self._retry_at = now + _HOSTS_TTL_S  # ask a scheduler that cannot be reached once a second
            if cached is not None:
                return cached[1]
            return None  # the request's own send reports the lost scheduler
        version = answer.get("version") if isinstance(answer, dict) else None
        if version is None and cached is not None:  # none hosted now (scaled to zero): the last one seen
            version = cached[1]
        if version is not None:
            self._latest[name] = (now, int(version))
        return None if version is None else int(version)
