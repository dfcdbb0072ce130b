"""The caller's side of the scheduler's operator registry: who hosts what, and what failed.

The registry itself lives in the broker (:class:`tdask.request_plane.broker.RequestBroker`),
installed on the scheduler on first use by whoever needs it, so a plain ``dask scheduler`` works.
"""

from __future__ import annotations

import time
from typing import Any

from distributed.protocol.pickle import dumps

from tdask.protocol import Rpc
from tdask.request_plane.broker import BROKER_NAME, RequestBroker

__all__ = ["Registry"]

# How long a caller trusts the hosts the registry gave it; a host that cannot be reached drops
# the entry at once (forget_hosts).
_HOSTS_TTL_S = 1.0


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
        # Cached with the hosts, read on the caller's hot path: the operator's routing policy
        # (absent: least-loaded) and its hosts' worker names.
        self._routing: dict[str, dict[str, Any]] = {}
        self._names: dict[str, dict[str, str]] = {}

    @property
    def address(self) -> str:
        """The scheduler's address."""
        return str(self.scheduler.address)

    async def ensure_broker(self) -> None:
        """Install the broker on the scheduler once (idempotent across clients and workers)."""
        if not self._broker_ready:
            await self.scheduler.register_scheduler_plugin(
                plugin=dumps(RequestBroker()), name=BROKER_NAME, idempotent=True
            )
            self._broker_ready = True

    async def hosts(self, operator_key: str) -> list[str]:
        """Addresses of the workers hosting ``operator_key``, as the registry said at most a second ago."""
        now = time.monotonic()
        cached = self._hosts.get(operator_key)
        if cached is not None and now - cached[0] <= _HOSTS_TTL_S:
            return cached[1]
        await self.ensure_broker()
        answer = await getattr(self.scheduler, Rpc.HOSTS)(operator=operator_key, routing=True)
        hosts: list[str] = answer["hosts"]
        if answer["routing"] is None:
            self._routing.pop(operator_key, None)
        else:
            self._routing[operator_key] = answer["routing"]
        self._names[operator_key] = answer["names"]
        if hosts:  # an empty answer is asked again next time
            self._hosts[operator_key] = (now, hosts)
        return hosts

    def routing(self, operator_key: str) -> dict[str, Any] | None:
        """The routing policy of ``operator_key`` learnt with its hosts (``None``: least-loaded)."""
        return self._routing.get(operator_key)

    def address_of(self, operator_key: str, name: str) -> str | None:
        """The address of the host of ``operator_key`` whose worker name is ``name``, as last learnt."""
        return self._names.get(operator_key, {}).get(name)

    def forget_hosts(self, operator_key: str) -> None:
        """Drop the cached hosts of ``operator_key`` (one of them could not be reached)."""
        self._hosts.pop(operator_key, None)

    async def operators(self) -> dict[str, Any]:
        """The registry: hosts per operator, setup failures, queue depths and serving counters."""
        await self.ensure_broker()
        return await getattr(self.scheduler, Rpc.OPERATORS)()

    async def register(
        self, worker: str, requester: str, operators: list[dict[str, Any]], failures: dict[str, str]
    ) -> None:
        """Announce the operators ``worker`` hosts (and those whose setup failed there)."""
        await self.ensure_broker()
        await getattr(self.scheduler, Rpc.REGISTER)(
            worker=worker, requester=requester, operators=operators, failures=failures
        )

    async def unregister(self, worker: str, *, release_leases: bool) -> None:
        """Stop giving ``worker`` requests; with ``release_leases``, re-queue what it holds."""
        await getattr(self.scheduler, Rpc.UNREGISTER)(worker=worker, release_leases=release_leases)
