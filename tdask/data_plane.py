"""The data plane: a tensor store on every worker, and fetches over the cluster's comm.

Tensors up to ``tdask.data-plane.inline-threshold`` travel inside messages (plain numpy arrays as
dtype, shape and bytes; others serialized with Dask's own serialization). Larger ones stay in the
store of the worker that produced (or received) them, and messages carry a :class:`RemoteTensor`
descriptor. Whoever needs the bytes pulls them from the owner with a Dask RPC (``tdask_fetch``),
so they move once, over TCP or UCX, straight from owner to consumer; forwarding a descriptor
moves no bytes at all.

Lifetime: whoever receives a descriptor holds it and releases it when done (an operator's
received tensors are released when the request it serves finishes, unless it forwards them in its
own outputs, which hands them on). A time-to-live sweep drops what nobody released.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.core import send_recv
from distributed.protocol import to_serialize

from tdask import context
from tdask.config import get_seconds
from tdask.exceptions import DataPlaneError

if TYPE_CHECKING:
    from distributed.core import ConnectionPool

logger = logging.getLogger(__name__)

__all__ = ["RemoteTensor", "TensorStore"]

# The data plane's Dask comm handlers on every worker (both halves live in this file;
# tdask.protocol.Rpc lists them with the others).
FETCH = "tdask_fetch"
PUT = "tdask_put"
RELEASE = "tdask_release"
STORE_STATS = "tdask_store_stats"


def _device_of(array: Any) -> str:
    if isinstance(array, np.ndarray):
        return "cpu"
    return f"cuda:{array.device.id}"


@dataclass(frozen=True)
class RemoteTensor:
    """Descriptor of a tensor held in a worker's store.

    Passing it to another operator forwards a reference: only the consumer that calls
    :meth:`fetch` moves the bytes, straight from ``owner``.
    """

    owner: str
    tensor_id: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    device: str = "cpu"

    def to_msg(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "id": self.tensor_id,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "device": self.device,
        }

    @classmethod
    def from_msg(cls, msg: Mapping[str, Any]) -> RemoteTensor:
        return cls(
            owner=msg["owner"],
            tensor_id=msg["id"],
            dtype=msg["dtype"],
            shape=tuple(msg["shape"]),
            nbytes=msg["nbytes"],
            device=msg.get("device", "cpu"),
        )

    async def fetch(self) -> Any:
        """Pull the tensor's bytes from its owner (no-op copy when we are the owner)."""
        return await current_peer().fetch(self)

    def __repr__(self) -> str:
        return (
            f"RemoteTensor(owner={self.owner!r}, id={self.tensor_id[:8]}…, dtype={self.dtype}, "
            f"shape={self.shape}, device={self.device})"
        )


async def call_peer(pool: ConnectionPool, address: str, op: str, **kwargs: Any) -> Any:
    """One RPC to a worker, giving up on connecting after ``tdask.data-plane.connect-timeout``.

    Distributed's pooled calls retry a refused connection for the whole comm connect timeout
    (30 s); a peer that died should be noticed in seconds, not half a minute.
    """
    timeout = get_seconds("tdask.data-plane.connect-timeout")
    comm = await pool.connect(address, timeout=timeout)
    try:
        return await send_recv(comm=comm, op=op, **kwargs)
    finally:
        pool.reuse(address, comm)


class DataPlanePeer:
    """Fetches, places and releases tensors over an RPC pool (a Client's or a Worker's)."""

    def __init__(self, pool: ConnectionPool, address: str | None = None) -> None:
        self.pool = pool
        self.address = address
        self.pulls = 0
        self.pulled_bytes = 0

    async def fetch(self, tensor: RemoteTensor) -> Any:
        try:
            reply = await call_peer(self.pool, tensor.owner, FETCH, tensor_id=tensor.tensor_id)
        except (TimeoutError, OSError) as exc:
            raise DataPlaneError(
                f"could not fetch tensor {tensor.tensor_id} from {tensor.owner}: {exc}", worker=tensor.owner
            ) from exc
        if reply.get("status") != "OK":
            raise DataPlaneError(
                f"tensor {tensor.tensor_id} is not in the store of {tensor.owner} "
                "(released, expired, or its worker restarted)",
                worker=tensor.owner,
            )
        self.pulls += 1
        self.pulled_bytes += tensor.nbytes
        return reply["data"]

    async def place(self, address: str, array: Any) -> RemoteTensor:
        """Put ``array`` into the store of the worker at ``address``."""
        tensor = _describe(address, uuid.uuid4().hex, array)
        await call_peer(self.pool, address, PUT, tensor_id=tensor.tensor_id, data=to_serialize(array))
        return tensor

    async def release(self, tensors: Iterable[RemoteTensor]) -> None:
        """Tell owners that these tensors are no longer needed (best effort)."""
        by_owner: dict[str, list[str]] = {}
        for tensor in tensors:
            by_owner.setdefault(tensor.owner, []).append(tensor.tensor_id)
        for owner, ids in by_owner.items():
            try:
                await call_peer(self.pool, owner, RELEASE, tensor_ids=ids)
            except Exception as exc:  # owner gone: its store went with it
                logger.debug("release of %d tensors on %s failed: %s", len(ids), owner, exc)


def _describe(owner: str, tensor_id: str, array: Any) -> RemoteTensor:
    return RemoteTensor(
        owner=owner,
        tensor_id=tensor_id,
        dtype=str(array.dtype),
        shape=tuple(int(s) for s in array.shape),
        nbytes=int(array.nbytes),
        device=_device_of(array),
    )


class TensorStore(DataPlanePeer):
    """A worker's tensors, served to other workers through Dask comm handlers."""

    def __init__(self, worker: Any) -> None:
        super().__init__(worker.rpc, worker.address)
        self.worker = worker
        self._tensors: dict[str, tuple[Any, float]] = {}
        self.ttl_s = get_seconds("tdask.data-plane.ttl") or 600.0
        self.puts = 0
        self.served = 0
        self.served_bytes = 0
        self.local_gets = 0
        self.released = 0
        self.expired = 0
        self._sweeper: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Register the comm handlers and start the time-to-live sweep."""
        self.worker.handlers.update(
            {
                FETCH: self._handle_fetch,
                PUT: self._handle_put,
                RELEASE: self._handle_release,
                STORE_STATS: self.stats,
            }
        )
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for name in (FETCH, PUT, RELEASE, STORE_STATS):
            self.worker.handlers.pop(name, None)
        if self._tensors:
            logger.info("tensor store of %s closing with %d tensors", self.address, len(self._tensors))
        self._tensors.clear()

    def put(self, array: Any) -> RemoteTensor:
        """Keep ``array`` here and return its descriptor."""
        tensor = _describe(self.worker.address, uuid.uuid4().hex, array)
        self._tensors[tensor.tensor_id] = (array, time.monotonic() + self.ttl_s)
        self.puts += 1
        return tensor

    async def fetch(self, tensor: RemoteTensor) -> Any:
        if tensor.owner == self.worker.address:
            entry = self._tensors.get(tensor.tensor_id)
            if entry is None:
                raise DataPlaneError(f"tensor {tensor.tensor_id} is not in this worker's store", worker=tensor.owner)
            self.local_gets += 1
            return entry[0]
        return await super().fetch(tensor)

    async def release(self, tensors: Iterable[RemoteTensor]) -> None:
        remote = []
        for tensor in tensors:
            if tensor.owner == self.worker.address:
                self._drop([tensor.tensor_id])
            else:
                remote.append(tensor)
        if remote:
            await super().release(remote)

    def _drop(self, ids: Iterable[str]) -> None:
        for tensor_id in ids:
            if self._tensors.pop(tensor_id, None) is not None:
                self.released += 1

    def _handle_fetch(self, tensor_id: str) -> dict[str, Any]:
        entry = self._tensors.get(tensor_id)
        if entry is None:
            return {"status": "missing"}
        self.served += 1
        self.served_bytes += int(entry[0].nbytes)
        return {"status": "OK", "data": to_serialize(entry[0])}

    def _handle_put(self, tensor_id: str, data: Any) -> None:
        self._tensors[tensor_id] = (data, time.monotonic() + self.ttl_s)
        self.puts += 1

    def _handle_release(self, tensor_ids: list[str]) -> None:
        self._drop(tensor_ids)

    def stats(self) -> dict[str, int]:
        """Counters used by tests and benchmarks to prove where bytes moved."""
        return {
            "tensors": len(self._tensors),
            "bytes": sum(int(a.nbytes) for a, _ in self._tensors.values()),
            "puts": self.puts,
            "served": self.served,
            "served_bytes": self.served_bytes,
            "pulls": self.pulls,
            "pulled_bytes": self.pulled_bytes,
            "local_gets": self.local_gets,
            "released": self.released,
            "expired": self.expired,
        }

    async def _sweep_forever(self) -> None:
        interval = get_seconds("tdask.data-plane.sweep-interval") or 5.0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            expired = [tid for tid, (_, expires) in self._tensors.items() if expires < now]
            for tensor_id in expired:
                del self._tensors[tensor_id]
            if expired:
                self.expired += len(expired)
                logger.warning(
                    "tensor store of %s dropped %d tensors nobody released within %.0fs",
                    self.address,
                    len(expired),
                    self.ttl_s,
                )


# -- who is fetching: the operator's worker, else the default client ------------------------


def current_peer() -> DataPlanePeer:
    """The data-plane endpoint of the running code: its worker's store, or the client's."""
    serving = context.current.get()
    if serving is not None:
        return serving.store
    from distributed import get_client

    return client_peer(get_client())


def client_peer(client: Any) -> DataPlanePeer:
    """The data-plane endpoint of a Client (one per client, created on first use)."""
    peer = getattr(client, "_tdask_peer", None)
    if peer is None:
        peer = DataPlanePeer(client.rpc)
        client._tdask_peer = peer
    return peer


class TensorScope:
    """The descriptors an operator received while serving one request.

    Released when the request finishes, except those it forwarded in its own outputs: their
    ownership moves on with the response.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, RemoteTensor] = {}

    def add(self, tensors: Iterable[RemoteTensor]) -> None:
        for tensor in tensors:
            self.tensors[tensor.tensor_id] = tensor

    def hand_on(self, tensors: Iterable[RemoteTensor]) -> None:
        for tensor in tensors:
            self.tensors.pop(tensor.tensor_id, None)
