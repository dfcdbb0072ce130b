"""Tensors between a worker and its Triton server through shared memory instead of the HTTP body.

Triton's shared-memory extension: tdask creates a region, registers it with the server
(``v2/systemsharedmemory/...`` for host memory, ``v2/cudasharedmemory/...`` for device memory
shared through a CUDA IPC handle), writes a request's large inputs into it and names the place in
the request; Triton reads them from there and writes the outputs tdask asked for into the same
region. The body then carries only the JSON header (and the small tensors).

- ``system``: a ``/dev/shm`` file mapped by both processes. Large tensors skip the socket, the
  HTTP parsing and Triton's body buffers: one memcpy in, one out.
- ``cuda``: memory tdask allocated on the model's GPU (``cudaMalloc``, not cupy's pool: an IPC
  handle names a whole allocation). Device (cupy) inputs are copied device to device into it,
  and outputs come back as cupy arrays on that device, kept as such in the worker's
  :class:`~tdask.data_plane.TensorStore`: no host copy between tdask and a ``KIND_GPU`` model.

Each operator has a small pool of regions (``tdask.triton.shared-memory-slots``, one per request
in flight), created on first use, registered once and reused; a request needing more room than a
free region has replaces it with a larger one (sizes grow in powers of two). When every region is
busy a request goes in the HTTP body, so the pool never makes anyone wait. Only tensors of at
least ``tdask.triton.shared-memory-threshold`` bytes use it (``cuda``: every device tensor).

Output sizes must be given in advance. An output whose dims are all fixed has an exact size; for
one with variable dims the pool guesses from the inputs' bytes times the largest ratio seen so
far (1 at first). When Triton says the room is too small ("should be at least N bytes") the
ratio is raised and the request sent once more with room enough: the model runs twice for that
request, so this is done only for models without ``sequence_batching`` (a stateful model's
variable-size outputs always come in the HTTP body).

Cleanup: regions are named with the server's shared-memory prefix (``TritonServer.
shm_region_prefix``), and a system region's ``/dev/shm`` name is unlinked as soon as Triton has
mapped it: the memory lives while tdask and Triton map it and is gone with both processes, even
when the worker is SIGKILLed. Between creating and registering, the server's reaper (which
removes ``/dev/shm/<prefix>*`` when the server dies) covers the name. At teardown every region
is unregistered. A region Triton no longer knows (its server restarted) makes the pool drop all
its regions and the request is sent once more in the body; a region whose call was abandoned
(timeout, cancellation, lost connection) is never reused, since Triton may still write into it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import mmap
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import dask.config
import numpy as np
from tritonclient.utils import triton_to_np_dtype

from tdask.config import get_bytes
from tdask.data_plane import count_host_copy, is_device_array
from tdask.triton.http_client import ShmTensor
from tdask.triton.interface import InferClient, InferResult, TritonInferError

__all__ = [
    "DEVICE_INPUT_IN_HTTP_BODY",
    "MODES",
    "SharedMemoryClient",
    "SharedMemoryPool",
    "ShmRegion",
    "ShmTransport",
    "choose_kind",
    "gpu_instance_device",
]

logger = logging.getLogger(__name__)

#: The :func:`~tdask.data_plane.count_host_copy` label of a device (cupy) input copied to the
#: host for Triton's HTTP body (tests look for it by name).
DEVICE_INPUT_IN_HTTP_BODY = "Triton input in the HTTP body: device to host"

Kind = Literal["system", "cuda"]
#: Values of ``tdask.triton.shared-memory``.
MODES = ("auto", "system", "cuda", "off")
SHM_DIR = "/dev/shm"
_ALIGN = 256  # offsets of tensors in a region (CUDA likes 256-byte alignment)
_MIN_REGION = 1 << 16
_TOO_SMALL = re.compile(r"output '([^']+)' \((\d+) bytes\) should be at least (\d+) bytes")
_LOST = "Unable to find shared memory region"


@runtime_checkable
class SharedMemoryClient(InferClient, Protocol):
    """An :class:`~tdask.triton.interface.InferClient` that speaks Triton's shared-memory extension.

    :class:`~tdask.triton.http_client.TritonHttpClient` does (a ``tritonserver``'s HTTP endpoint);
    the in-process client has no need to: Triton reads and writes tdask's buffers directly.
    """

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        *,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
        timeout: float | None = None,
        shm_inputs: Mapping[str, ShmTensor] | None = None,
        outputs: Mapping[str, ShmTensor | None] | None = None,
    ) -> InferResult:
        """Run one inference, with inputs in registered regions and outputs written into them.

        As :meth:`InferClient.infer <tdask.triton.interface.InferClient.infer>`; ``shm_inputs``
        are inputs already in a region (not in ``inputs``), ``outputs`` the outputs to return:
        name to the place Triton writes it to, or ``None`` for the answer itself.
        """
        ...

    async def register_shm(
        self, kind: Literal["system", "cuda"], name: str, request: Mapping[str, Any], timeout: float = 30.0
    ) -> None:
        """Register a region with Triton (``request``: the extension's JSON)."""
        ...

    async def unregister_shm(self, kind: Literal["system", "cuda"], name: str, timeout: float = 30.0) -> None:
        """Unregister a region (Triton unmaps it)."""
        ...


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def gpu_instance_device(config: Mapping[str, Any]) -> int | None:
    """The GPU of a model config's first ``KIND_GPU`` instance group, or ``None`` when it has none."""
    for group in config.get("instance_group") or []:
        if str(group.get("kind", "")).upper() == "KIND_GPU":
            gpus = group.get("gpus") or [0]
            return int(gpus[0])
    return None


def _cuda_reason() -> str | None:
    """Why CUDA shared memory cannot be used here, or ``None`` when it can."""
    try:
        import cupy
    except ImportError:
        return "cupy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # no driver, no device
        return f"CUDA is not usable: {exc}"
    return None


def choose_kind(mode: str, config: Mapping[str, Any]) -> Kind | None:
    """The kind of shared memory an operator uses for a model with this config.

    ``auto``: CUDA memory for a model with ``KIND_GPU`` instances where cupy and a device exist,
    else system memory. ``off``: none.

    Raises
    ------
    ValueError
        ``mode`` is not one of :data:`MODES`, or ``cuda`` where CUDA is not usable (the reason).
    """
    if mode not in MODES:
        raise ValueError(f"tdask.triton.shared-memory must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    if mode == "system":
        return "system"
    reason = _cuda_reason()
    if mode == "cuda":
        if reason is not None:
            raise ValueError(f"tdask.triton.shared-memory is 'cuda', but {reason}")
        return "cuda"
    if gpu_instance_device(config) is not None and reason is None:
        return "cuda"
    return "system"


class ShmRegion:
    """One registered region: ``/dev/shm`` memory, or device memory shared by a CUDA IPC handle."""

    def __init__(self, kind: Kind, name: str, size: int, device_id: int = 0) -> None:
        self.kind, self.name, self.size, self.device_id = kind, name, int(size), device_id
        self.registered = False
        self._mmap: mmap.mmap | None = None
        self._memory: Any = None
        if kind == "system":
            path = os.path.join(SHM_DIR, name)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, self.size)
                self._mmap = mmap.mmap(fd, self.size)
            except BaseException:
                os.unlink(path)
                raise
            finally:
                os.close(fd)
            self.host = np.frombuffer(self._mmap, dtype=np.uint8)
        else:
            import cupy

            with cupy.cuda.Device(device_id):
                self._memory = cupy.cuda.Memory(self.size)  # cudaMalloc: an IPC handle names it whole

    def register_request(self) -> dict[str, Any]:
        """The JSON Triton's register call takes for this region."""
        if self.kind == "system":
            return {"key": "/" + self.name, "offset": 0, "byte_size": self.size}
        import cupy

        handle = cupy.cuda.runtime.ipcGetMemHandle(self._memory.ptr)
        return {
            "raw_handle": {"b64": base64.b64encode(bytes(handle)).decode()},
            "device_id": self.device_id,
            "byte_size": self.size,
        }

    def unlink(self) -> None:
        """Remove a system region's ``/dev/shm`` name (the mappings stay valid)."""
        if self.kind == "system":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))

    def write(self, offset: int, array: Any) -> None:
        """Copy ``array`` (C-contiguous numpy, or cupy in a CUDA region) to ``offset``."""
        nbytes = int(array.nbytes)
        if self.kind == "system":
            self.host[offset : offset + nbytes] = np.require(array, requirements="C").reshape(-1).view(np.uint8)
            return
        import cupy

        view = self._device_view(offset, nbytes)
        if is_device_array(array):
            view[...] = cupy.ascontiguousarray(array).reshape(-1).view(cupy.uint8)
        else:  # a host input for a GPU model: the one host-to-device copy it needs
            view.set(np.require(array, requirements="C").reshape(-1).view(np.uint8))

    def read(self, offset: int, dtype: np.dtype[Any], shape: list[int]) -> Any:
        """A copy of the tensor at ``offset`` (numpy, or cupy on the region's device)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.kind == "system":
            return self.host[offset : offset + nbytes].view(dtype).reshape(shape).copy()
        return self._device_view(offset, nbytes).view(dtype).reshape(shape).copy()

    def synchronize(self) -> None:
        """Wait for this process's device copies (before Triton reads the region)."""
        if self.kind == "cuda":
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def _device_view(self, offset: int, nbytes: int) -> Any:
        import cupy

        return cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(self._memory, offset))

    def close(self) -> None:
        """Free the memory (after unregistering it)."""
        self.unlink()
        if self._mmap is not None:
            self.host = np.empty(0, dtype=np.uint8)
            with contextlib.suppress(BufferError):  # an output view still alive: the GC unmaps it
                self._mmap.close()
            self._mmap = None
        self._memory = None


class SharedMemoryPool:
    """Up to ``slots`` registered regions of one kind, reused across requests.

    Parameters
    ----------
    client
        The Triton server's client (registration calls, and the calls through the regions).
    kind
        ``"system"`` or ``"cuda"``.
    prefix
        Names start with it (the server's shared-memory prefix, so its reaper finds them).
    slots
        Most regions at once.
    device_id
        The GPU of ``cuda`` regions.
    """

    def __init__(self, client: SharedMemoryClient, kind: Kind, prefix: str, slots: int, device_id: int = 0) -> None:
        self.client, self.kind, self.prefix, self.slots, self.device_id = client, kind, prefix, slots, device_id
        self._free: list[ShmRegion] = []
        self._busy: set[ShmRegion] = set()
        self._lock = asyncio.Lock()
        self.created = 0
        self.fallbacks = 0

    @property
    def regions(self) -> int:
        """Regions held now (free and busy)."""
        return len(self._free) + len(self._busy)

    async def acquire(self, nbytes: int) -> ShmRegion | None:
        """A region of at least ``nbytes``, or ``None`` when all ``slots`` are busy."""
        async with self._lock:
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
            else:
                if self.regions >= self.slots:
                    if not self._free:
                        self.fallbacks += 1
                        return None
                    await self._drop(self._free.pop(0))  # too small: make room for a larger one
                region = await self._create(max(_MIN_REGION, 1 << math.ceil(math.log2(max(nbytes, 1)))))
            self._busy.add(region)
            return region

    def release(self, region: ShmRegion) -> None:
        """Give ``region`` back for reuse."""
        if region in self._busy:
            self._busy.discard(region)
            self._free.append(region)

    async def discard(self, region: ShmRegion) -> None:
        """Never reuse ``region`` (Triton may still write into it): unregister and free it."""
        self._busy.discard(region)
        with contextlib.suppress(Exception):
            await self._drop(region)

    async def reset(self) -> None:
        """Forget every free region (Triton lost them); busy ones are freed when released."""
        async with self._lock:
            free, self._free = self._free, []
        for region in free:
            await self._drop(region)

    async def close(self) -> None:
        """Unregister and free every region."""
        regions = [*self._free, *self._busy]
        self._free, self._busy = [], set()
        for region in regions:
            await self._drop(region)

    async def _create(self, size: int) -> ShmRegion:
        name = f"{self.prefix}io-{uuid.uuid4().hex[:12]}"
        region = ShmRegion(self.kind, name, size, self.device_id)
        try:
            await self.client.register_shm(self.kind, name, region.register_request())
            region.registered = True
        except BaseException:
            region.close()
            raise
        region.unlink()  # Triton has mapped it: no name left behind, whatever happens next
        self.created += 1
        logger.debug("registered %s shared-memory region %s (%d bytes)", self.kind, name, size)
        return region

    async def _drop(self, region: ShmRegion) -> None:
        try:
            if region.registered:
                await self.client.unregister_shm(self.kind, region.name)
        except Exception as exc:  # the server is gone: nothing to unregister
            logger.debug("unregistering %s failed: %s", region.name, exc)
        finally:
            region.close()


class ShmTransport:
    """An operator's inference calls with large tensors in shared memory (see the module doc).

    Parameters
    ----------
    pool
        The operator's regions.
    output_specs
        The model's outputs: name to (Triton datatype, dims with -1 for variable ones).
    threshold
        Tensors from this many bytes on use the pool (``cuda``: and every device tensor).
    """

    def __init__(
        self,
        pool: SharedMemoryPool,
        output_specs: Mapping[str, tuple[str, list[int]]],
        threshold: int,
        may_call_twice: bool = True,
    ):
        self.pool, self.threshold = pool, int(threshold)
        # False for stateful (sequence-batched) models: a second call would advance their state,
        # so their variable-size outputs come in the HTTP body, never from a guessed region.
        self.may_call_twice = may_call_twice
        self.outputs = {
            name: (datatype, dims, np.dtype(triton_to_np_dtype(datatype)))
            for name, (datatype, dims) in output_specs.items()
            if datatype != "BYTES" and triton_to_np_dtype(datatype) is not None
        }
        self.all_outputs = list(output_specs)
        # Per variable-size output: the largest output bytes per input byte seen so far.
        self.ratios: dict[str, float] = {}
        self.shm_calls = 0

    @classmethod
    def from_config(
        cls,
        client: SharedMemoryClient,
        config: Mapping[str, Any],
        output_specs: Mapping[str, tuple[str, list[int]]],
        prefix: str,
    ) -> ShmTransport | None:
        """The transport ``tdask.triton.shared-memory`` asks for with this model config, or ``None``."""
        mode = str(dask.config.get("tdask.triton.shared-memory", "off"))
        kind = choose_kind(mode, config)
        if kind is None:
            return None
        slots = int(dask.config.get("tdask.triton.shared-memory-slots", 8))
        device = gpu_instance_device(config) or 0
        pool = SharedMemoryPool(client, kind, prefix, slots, device_id=device)
        threshold = get_bytes("tdask.triton.shared-memory-threshold")
        return cls(pool, output_specs, threshold, may_call_twice="sequence_batching" not in config)

    @property
    def kind(self) -> Kind:
        """``"system"`` or ``"cuda"``."""
        return self.pool.kind

    def _estimate(self, name: str, dims: list[int], itemsize: int, in_bytes: int) -> int:
        if dims and all(d >= 0 for d in dims):
            return int(np.prod(dims, dtype=np.int64)) * itemsize
        if not dims:
            return itemsize
        return int(math.ceil(self.ratios.get(name, 1.0) * in_bytes))

    def plan(self, inputs: Mapping[str, tuple[Any, str]]) -> tuple[dict[str, int], dict[str, int], int]:
        """Which inputs and outputs go through the pool: name to offset, for each; and the room needed."""
        in_bytes = sum(int(a.nbytes) for a, dt in inputs.values() if dt != "BYTES")
        offset = 0
        shm_in: dict[str, int] = {}
        for name, (array, datatype) in inputs.items():
            device = is_device_array(array)
            if datatype != "BYTES" and (array.nbytes >= self.threshold or (device and self.kind == "cuda")):
                shm_in[name] = offset
                offset += _align(max(int(array.nbytes), 1))
        shm_out: dict[str, int] = {}
        for name, (_, dims, dtype) in self.outputs.items():
            if not self.may_call_twice and not (dims and all(d >= 0 for d in dims)):
                continue  # a guess could be too small, and this model must not run twice
            estimate = self._estimate(name, dims, dtype.itemsize, in_bytes)
            if estimate >= self.threshold or self.kind == "cuda":  # cuda: outputs stay on the device
                shm_out[name] = offset
                offset += _align(max(estimate, 1))
        return shm_in, shm_out, offset

    async def infer(self, model: str, inputs: Mapping[str, tuple[Any, str]], **kwargs: Any) -> InferResult | None:
        """One inference, on the pool's client, with the planned tensors in a region, or ``None`` (then use the body).

        ``None`` when nothing is worth shared memory, no region is free, or Triton lost its regions.

        Raises what :meth:`SharedMemoryClient.infer` raises, after at most one retry with more room.
        """
        client = self.pool.client
        for attempt in range(2):
            shm_in, shm_out, room = self.plan(inputs)
            if not shm_in and not shm_out:
                return None
            region = await self.pool.acquire(room)
            if region is None:
                return None
            try:
                result = await self._call(client, model, region, inputs, shm_in, shm_out, **kwargs)
            except TritonInferError as exc:
                self.pool.release(region)
                if _LOST in exc.message:
                    logger.warning("Triton lost the shared-memory regions of model %r: making new ones", model)
                    await self.pool.reset()
                    return None
                too_small = _TOO_SMALL.search(exc.message)
                if too_small is None or attempt:
                    raise
                name, needed = too_small.group(1), int(too_small.group(3))
                in_bytes = max(1, sum(int(a.nbytes) for a, dt in inputs.values() if dt != "BYTES"))
                self.ratios[name] = max(self.ratios.get(name, 1.0), needed / in_bytes)
                continue
            except BaseException:
                await self.pool.discard(region)  # abandoned: Triton may still write into it
                raise
            self.pool.release(region)
            return result
        return None  # not reached

    async def _call(
        self,
        client: SharedMemoryClient,
        model: str,
        region: ShmRegion,
        inputs: Mapping[str, tuple[Any, str]],
        shm_in: Mapping[str, int],
        shm_out: Mapping[str, int],
        **kwargs: Any,
    ) -> InferResult:
        body: dict[str, tuple[np.ndarray, str]] = {}
        places: dict[str, ShmTensor] = {}
        for name, (array, datatype) in inputs.items():
            if name in shm_in:
                region.write(shm_in[name], array)
                places[name] = ShmTensor(region.name, shm_in[name], int(array.nbytes), tuple(array.shape), datatype)
            else:
                body[name] = (host_array(array), datatype)
        region.synchronize()
        ends = sorted([*shm_in.values(), *shm_out.values(), region.size])
        outputs: dict[str, ShmTensor | None] = {}
        for name in self.all_outputs:
            if name in shm_out:
                start = shm_out[name]
                end = next(e for e in ends if e > start)
                outputs[name] = ShmTensor(region.name, start, end - start)
            else:
                outputs[name] = None
        result = await client.infer(model, body, shm_inputs=places, outputs=outputs, **kwargs)
        for name, shape in result.in_shm.items():
            _, _, dtype = self.outputs[name]
            result.outputs[name] = region.read(shm_out[name], dtype, shape)
        self.learn(inputs, result)
        self.shm_calls += 1
        return result

    def learn(self, inputs: Mapping[str, tuple[Any, str]], result: InferResult) -> None:
        """Remember how large the variable-size outputs were relative to the inputs."""
        in_bytes = max(1, sum(int(a.nbytes) for a, dt in inputs.values() if dt != "BYTES"))
        for name, array in result.outputs.items():
            spec = self.outputs.get(name)
            if spec is not None and not (spec[1] and all(d >= 0 for d in spec[1])):
                self.ratios[name] = max(self.ratios.get(name, 1.0), int(array.nbytes) / in_bytes)

    async def close(self) -> None:
        """Unregister and free the pool's regions."""
        await self.pool.close()


def host_array(value: Any) -> np.ndarray:
    """A C-contiguous numpy array for an HTTP body; a cupy array is copied to the host (counted)."""
    # np.require, not np.ascontiguousarray: the latter turns a 0-d array into a 1-d one.
    if isinstance(value, np.ndarray):  # on every Triton input: the common case costs one flag test
        return value if value.flags.c_contiguous else np.require(value, requirements="C")
    if is_device_array(value):
        count_host_copy(int(value.nbytes), DEVICE_INPUT_IN_HTTP_BODY)
        return np.require(value.get(), requirements="C")
    raise TypeError(f"is a {type(value).__name__}, expected a numpy or cupy array")
