"""The data plane: a tensor store on every worker, and fetches over the cluster's comm.

Tensors up to ``tdask.data-plane.inline-threshold`` travel inside messages (plain numpy arrays as
dtype, shape and bytes; others serialized with Dask's own serialization). Larger ones stay in the
store of the worker that produced (or received) them, and messages carry a :class:`RemoteTensor`
descriptor. Whoever needs the bytes pulls them from the owner with a Dask RPC (``tdask_fetch``),
so they move once, over TCP or UCX, straight from owner to consumer; forwarding a descriptor
moves no bytes at all. Where the request plane has a quicker route to the owner (the direct
plane's wire on ``tcp://`` and ``tls://`` clusters), host tensors up to
``tdask.data-plane.wire-max-bytes`` are fetched, placed and released over it instead
(:class:`Shortcut`); Dask's comm remains the route for device tensors, larger ones, and owners
the shortcut cannot reach.

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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from distributed.protocol import to_serialize

from tdask import context
from tdask.config import get_bytes, get_seconds
from tdask.exceptions import DataPlaneError
from tdask.transport.liveness import call_peer, is_gone, mark_gone

if TYPE_CHECKING:
    from distributed.core import ConnectionPool

logger = logging.getLogger(__name__)

__all__ = ["HOST_COPIES", "HostCopies", "RemoteTensor", "Shortcut", "TensorStore", "count_host_copy"]

# The data plane's Dask comm handlers on every worker (both halves live in this file;
# tdask.protocol.Rpc lists them with the others).
FETCH = "tdask_fetch"
PUT = "tdask_put"
RELEASE = "tdask_release"
STORE_STATS = "tdask_store_stats"
# distributed's stream message telling a worker that another worker was removed.
_REMOVE_WORKER = "remove-worker"


class HostCopies:
    """Bytes of device tensors copied through host memory on the data path, in this process.

    Counted where the copy happens: a cupy tensor serialized for a comm that carries no device
    buffers (TCP: Dask's ``dask`` serializer stages it through host memory) and put back on the
    device at the other end, a cupy tensor sent inline, a device input handed to Triton in an
    HTTP body, a ``KIND_GPU`` model's output that came back in one. Over UCX with CUDA shared
    memory between tdask and Triton, none of these happen and the counter stays 0.
    One per process (a worker process hosts one store), reported by :meth:`TensorStore.stats`.
    """

    def __init__(self) -> None:
        self.copies = 0
        self.bytes = 0
        self.by_where: dict[str, int] = {}

    def add(self, nbytes: int, where: str) -> None:
        """Count one copy of ``nbytes`` through host memory at ``where`` (a short label)."""
        self.copies += 1
        self.bytes += int(nbytes)
        self.by_where[where] = self.by_where.get(where, 0) + int(nbytes)


#: This process's count of device bytes copied through host memory (see :class:`HostCopies`).
HOST_COPIES = HostCopies()


def count_host_copy(nbytes: int, where: str) -> None:
    """Count a device tensor's ``nbytes`` copied through host memory at ``where``."""
    HOST_COPIES.add(nbytes, where)


def is_device_array(value: Any) -> bool:
    """Whether ``value`` is a device (cupy) array."""
    return type(value).__module__.split(".")[0] == "cupy"


def _carries_device_buffers(comm: Any) -> bool:
    """Whether ``comm`` moves device buffers as they are (UCX), rather than through host memory."""
    return "ucx" in type(comm).__module__.lower() or "ucx" in str(getattr(comm, "peer_address", "")).split("://")[0]


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
        """The descriptor as a message entry (see :mod:`tdask.protocol`)."""
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
        """Inverse of :meth:`to_msg`."""
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


class Shortcut(Protocol):
    """A quicker route to a tensor's owner than a Dask RPC (the direct plane's wire).

    Each method answers ``None`` when it cannot take this owner or tensor (no wire to it, the
    session dropped before the answer, a device tensor): the data plane then uses Dask's comm,
    which also reports an owner that is gone. Nothing is lost either way: a fetch or a release
    is idempotent, and a place that was not answered is made again under a new id.
    """

    def reaches(self, owner: str) -> bool:
        """Whether calls to ``owner`` may take this route at all (its transport carries them).

        Calls to an owner it does not reach go straight to Dask's comm and are not counted as
        declined.
        """
        ...

    async def fetch_tensor(self, owner: str, tensor_id: str, release: bool = False) -> tuple[bool, Any] | None:
        """``(True, array)``, or ``(False, None)`` when the owner does not hold it.

        ``release``: the owner drops it once it sent it (a fetch and a release in one call).
        """
        ...

    async def put_tensor(self, owner: str, tensor_id: str, array: Any) -> bool | None:
        """True once the owner holds ``array`` under ``tensor_id``."""
        ...

    async def release_tensors(self, owner: str, tensor_ids: list[str]) -> bool | None:
        """True once the owner dropped them (those it did not hold are ignored)."""
        ...


def shortcut_takes(tensor: RemoteTensor | Any) -> bool:
    """Whether a tensor (a descriptor or an array) may take the :class:`Shortcut`.

    Host memory, a plain dtype, at most ``tdask.data-plane.wire-max-bytes``.
    """
    if isinstance(tensor, RemoteTensor):
        if tensor.device != "cpu":
            return False
        nbytes = tensor.nbytes
    elif isinstance(tensor, np.ndarray) and tensor.dtype.kind != "O":
        nbytes = tensor.nbytes
    else:
        return False
    return nbytes <= get_bytes("tdask.data-plane.wire-max-bytes")


class DataPlanePeer:
    """Fetches, places and releases tensors over an RPC pool (a Client's or a Worker's).

    ``shortcut``, when set (by whoever owns this process's request plane), is tried first for
    host tensors (:class:`Shortcut`).
    """

    def __init__(self, pool: ConnectionPool, address: str | None = None) -> None:
        self.pool = pool
        self.address = address
        self.shortcut: Shortcut | None = None
        self.pulls = 0
        self.pulled_bytes = 0
        self.shortcut_calls = 0  # calls the shortcut answered
        self.shortcut_pulled_bytes = 0  # of pulled_bytes, those it fetched
        self.shortcut_declined = 0  # calls it left to Dask's comm
        self.release_calls = 0  # release calls made to other owners (one per owner per release)

    async def fetch(self, tensor: RemoteTensor, *, release: bool = False) -> Any:
        """Pull ``tensor``'s bytes from its owner (:class:`DataPlaneError` when they are gone).

        A host array comes back read-only, as inline tensors do, whichever route it took.
        ``release``: the owner drops it once it is fetched (the caller is its last user): one
        call on the wire's shortcut, where a fetch and then a release would be two round trips.
        """
        shortcut = self.shortcut
        if shortcut is not None and shortcut_takes(tensor) and shortcut.reaches(tensor.owner):
            answer = await shortcut.fetch_tensor(tensor.owner, tensor.tensor_id, release)
            if answer is not None:
                self.shortcut_calls += 1
                if not answer[0]:
                    raise self._missing(tensor)
                self.pulls += 1
                self.pulled_bytes += tensor.nbytes
                self.shortcut_pulled_bytes += tensor.nbytes
                return answer[1]
            self.shortcut_declined += 1
        data = await self._fetch_rpc(tensor)
        if release:
            await self.release([tensor])
        return data

    async def _fetch_rpc(self, tensor: RemoteTensor) -> Any:
        try:
            reply = await call_peer(self.pool, tensor.owner, FETCH, tensor_id=tensor.tensor_id)
        except (TimeoutError, OSError) as exc:
            raise DataPlaneError(
                f"could not fetch tensor {tensor.tensor_id} from {tensor.owner}: {exc}",
                worker=tensor.owner,
                owner=tensor.owner,
                tensor_id=tensor.tensor_id,
            ) from exc
        if reply.get("status") != "OK":
            raise self._missing(tensor)
        self.pulls += 1
        self.pulled_bytes += tensor.nbytes
        if reply.get("host_staged"):  # the owner staged a device tensor through host memory
            count_host_copy(tensor.nbytes, "fetch: host to device")
        data = reply["data"]
        if isinstance(data, np.ndarray):
            data.flags.writeable = False  # as over the wire and inline: the same on every route
        return data

    @staticmethod
    def _missing(tensor: RemoteTensor) -> DataPlaneError:
        return DataPlaneError(
            f"tensor {tensor.tensor_id} is not in the store of {tensor.owner} "
            "(released, expired, or its worker restarted)",
            worker=tensor.owner,
            owner=tensor.owner,
            tensor_id=tensor.tensor_id,
        )

    async def place(self, address: str, array: Any) -> RemoteTensor:
        """Put ``array`` into the store of the worker at ``address``."""
        shortcut = self.shortcut
        if shortcut is not None and shortcut_takes(array) and shortcut.reaches(address):
            tensor = _describe(address, uuid.uuid4().hex, array)
            if await shortcut.put_tensor(address, tensor.tensor_id, array):
                self.shortcut_calls += 1
                return tensor
            self.shortcut_declined += 1
        tensor = _describe(address, uuid.uuid4().hex, array)
        await call_peer(self.pool, address, PUT, tensor_id=tensor.tensor_id, data=to_serialize(array))
        return tensor

    async def release(self, tensors: Iterable[RemoteTensor]) -> None:
        """Tell owners that these tensors are no longer needed (best effort).

        Owners known to be gone are skipped: their store went with them.
        """
        by_owner: dict[str, list[str]] = {}
        for tensor in tensors:
            if not is_gone(tensor.owner):
                by_owner.setdefault(tensor.owner, []).append(tensor.tensor_id)
        for owner, ids in by_owner.items():
            self.release_calls += 1
            if self.shortcut is not None and self.shortcut.reaches(owner):
                if await self.shortcut.release_tensors(owner, ids):
                    self.shortcut_calls += 1
                    continue
                self.shortcut_declined += 1
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
        self._removed_handler: Any = None

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
        # The scheduler tells every worker when another one is removed ("remove-worker"): from
        # then on, its tensors are known gone here without dialling it.
        self._removed_handler = self.worker.stream_handlers.get(_REMOVE_WORKER)

        def removed(worker: str, **kwargs: Any) -> Any:
            mark_gone(worker)
            if self._removed_handler is not None:
                return self._removed_handler(worker=worker, **kwargs)
            return None

        self.worker.stream_handlers[_REMOVE_WORKER] = removed
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop the sweep, remove the handlers and drop every tensor still held."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for name in (FETCH, PUT, RELEASE, STORE_STATS):
            self.worker.handlers.pop(name, None)
        if self._removed_handler is not None:
            self.worker.stream_handlers[_REMOVE_WORKER] = self._removed_handler
        if self._tensors:
            logger.info("tensor store of %s closing with %d tensors", self.address, len(self._tensors))
        self._tensors.clear()

    def put(self, array: Any) -> RemoteTensor:
        """Keep ``array`` here and return its descriptor."""
        tensor = _describe(self.worker.address, uuid.uuid4().hex, array)
        self._tensors[tensor.tensor_id] = (array, time.monotonic() + self.ttl_s)
        self.puts += 1
        return tensor

    async def fetch(self, tensor: RemoteTensor, *, release: bool = False) -> Any:
        """The tensor's array: from this store when it is ours, else pulled from its owner.

        ``release``: dropped at its owner once fetched (see :meth:`DataPlanePeer.fetch`).
        """
        if tensor.owner == self.worker.address:
            entry = self._tensors.pop(tensor.tensor_id, None) if release else self._tensors.get(tensor.tensor_id)
            if entry is None:
                raise DataPlaneError(
                    f"tensor {tensor.tensor_id} is not in this worker's store",
                    worker=tensor.owner,
                    owner=tensor.owner,
                    tensor_id=tensor.tensor_id,
                )
            self.local_gets += 1
            if release:
                self.released += 1
            return entry[0]
        return await super().fetch(tensor, release=release)

    async def release(self, tensors: Iterable[RemoteTensor]) -> None:
        """Drop ours here; tell other owners about theirs (best effort)."""
        remote = []
        for tensor in tensors:
            if tensor.owner == self.worker.address:
                self.drop([tensor.tensor_id])
            else:
                remote.append(tensor)
        if remote:
            await super().release(remote)

    def drop(self, ids: Iterable[str]) -> None:
        """Forget these tensors (ids not held are ignored): what a release does at the owner."""
        for tensor_id in ids:
            if self._tensors.pop(tensor_id, None) is not None:
                self.released += 1

    def peek(self, tensor_id: str) -> Any | None:
        """The array held under ``tensor_id`` (None when it is not), without counting a serve."""
        entry = self._tensors.get(tensor_id)
        return None if entry is None else entry[0]

    def serve(self, tensor_id: str) -> Any | None:
        """The array a peer asked for (counted as served), or None when it is not held."""
        entry = self._tensors.get(tensor_id)
        if entry is None:
            return None
        array = entry[0]
        self.served += 1
        self.served_bytes += int(array.nbytes)
        return array

    def keep(self, tensor_id: str, array: Any) -> None:
        """Hold ``array`` under the id a peer chose for it (what a place does at the owner)."""
        self._tensors[tensor_id] = (array, time.monotonic() + self.ttl_s)
        self.puts += 1

    def _handle_fetch(self, comm: Any, tensor_id: str) -> dict[str, Any]:
        array = self.serve(tensor_id)
        if array is None:
            return {"status": "missing"}
        if is_device_array(array) and not _carries_device_buffers(comm):
            # Dask serializes a cupy array for a comm without device buffers (TCP) with its
            # "dask" serializer: device -> host here, host -> device at the receiver.
            count_host_copy(int(array.nbytes), "fetch: device to host")
            return {"status": "OK", "data": to_serialize(array), "host_staged": True}
        return {"status": "OK", "data": to_serialize(array)}

    def _handle_put(self, comm: Any, tensor_id: str, data: Any) -> None:
        if is_device_array(data) and not _carries_device_buffers(comm):
            count_host_copy(2 * int(data.nbytes), "put: device to host to device")
        self.keep(tensor_id, data)

    def _handle_release(self, tensor_ids: list[str]) -> None:
        self.drop(tensor_ids)

    def stats(self) -> dict[str, int]:
        """Counters used by tests and benchmarks to prove where bytes moved.

        ``host_copy_bytes``/``host_copies``: device tensor bytes this process copied through
        host memory on the data path (:class:`HostCopies`; 0 when device tensors stay on device).
        """
        return {
            "host_copies": HOST_COPIES.copies,
            "host_copy_bytes": HOST_COPIES.bytes,
            "tensors": len(self._tensors),
            "bytes": sum(int(a.nbytes) for a, _ in self._tensors.values()),
            "puts": self.puts,
            "served": self.served,
            "served_bytes": self.served_bytes,
            "pulls": self.pulls,
            "pulled_bytes": self.pulled_bytes,
            "shortcut_calls": self.shortcut_calls,
            "shortcut_declined": self.shortcut_declined,
            "shortcut_pulled_bytes": self.shortcut_pulled_bytes,
            "release_calls": self.release_calls,
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


# Kept among the client's extensions (``Client.extensions``), not as an attribute of the Client.
_CLIENT_EXTENSION = "tdask-data-plane"


def client_peer(client: Any) -> DataPlanePeer:
    """The data-plane endpoint of a Client (one per client, created on first use)."""
    peer = client.extensions.get(_CLIENT_EXTENSION)
    if not isinstance(peer, DataPlanePeer):
        peer = client.extensions[_CLIENT_EXTENSION] = DataPlanePeer(client.rpc)
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
