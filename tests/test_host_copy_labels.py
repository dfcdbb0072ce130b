"""The host-copy labels the GPU tests look for are the ones the code emits, checked without a GPU.

``tests/test_gpu_shared_memory.py`` asserts that some labels of
:data:`tdask.data_plane.HOST_COPIES` are absent on the CUDA shared-memory path; an absent label
proves nothing if the code can never emit it. Here the code paths that count those copies run
with fakes (a fake Triton server and client, a fake cupy array) and must count them under the
very constants the GPU tests import.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

import tdask.data_plane
from tdask.data_plane import HostCopies
from tdask.operator import Request
from tdask.triton.interface import InferResult
from tdask.triton.operator import KIND_GPU_OUTPUTS_IN_HOST_MEMORY, TritonCoreOperator
from tdask.triton.shared_memory import DEVICE_INPUT_IN_HTTP_BODY, host_array


@pytest.fixture
def host_copies(monkeypatch) -> HostCopies:
    """A fresh per-process counter in place of ``tdask.data_plane.HOST_COPIES``."""
    copies = HostCopies()
    monkeypatch.setattr(tdask.data_plane, "HOST_COPIES", copies)
    return copies


class _FakeClient:
    """Triton's HTTP client, answering every inference with ``output = ~input`` (not shared memory)."""

    async def model_metadata(self, model: str) -> dict[str, Any]:
        return {
            "inputs": [{"name": "input", "datatype": "INT64", "shape": [-1]}],
            "outputs": [{"name": "output", "datatype": "INT64", "shape": [-1]}],
            "versions": ["1"],
        }

    async def infer(self, model: str, inputs: dict[str, tuple[np.ndarray, str]], **call: Any) -> InferResult:
        array, _ = inputs["input"]
        return InferResult(outputs={"output": np.invert(array)}, datatypes={"output": "INT64"}, parameters={})

    async def close(self) -> None:
        pass


class _FakeServer:
    """A worker's Triton server, enough for ``TritonCoreOperator.setup``."""

    address = "fake"
    pid = 0
    shm_region_prefix = "fake"

    def __init__(self) -> None:
        self._client = _FakeClient()

    async def load_model(self, model: str, override: Any, timeout_s: float) -> None:
        pass

    def client(self) -> _FakeClient:
        return self._client

    def model_config(self, model: str, override: dict[str, Any] | None) -> dict[str, Any]:
        return {"name": model, **(override or {})}

    def add_exit_callback(self, callback: Any) -> None:
        pass

    def remove_exit_callback(self, callback: Any) -> None:
        pass


class _FakeContext:
    async def triton_server(self) -> _FakeServer:
        return _FakeServer()


async def _infer_once(kind: str) -> dict[str, np.ndarray]:
    operator = TritonCoreOperator(
        name="encoder",
        version=1,
        parameters={"config": {"instance_group": [{"kind": kind, "count": 1}]}},
        repository=None,
        logger=logging.getLogger("tests.host_copy_labels"),
        context=_FakeContext(),  # type: ignore[arg-type]
    )
    await operator.setup()
    request = Request(
        request_id="r1",
        operator="encoder",
        version=1,
        inputs={"input": np.arange(1000, dtype=np.int64)},
        parameters={},
        deadline=None,
        store=None,  # type: ignore[arg-type]  # no remote inputs to fetch
        send=None,  # type: ignore[arg-type]  # _infer does not answer
    )
    try:
        outputs, _ = await operator._infer(request)
    finally:
        await operator.teardown()
    return outputs


@pytest.mark.parametrize("kind", ["KIND_GPU", "KIND_CPU"])
def test_a_kind_gpu_model_answering_over_http_counts_its_outputs_under_the_label_the_gpu_test_checks(host_copies, kind):
    """A KIND_GPU model whose outputs come back in Triton's HTTP body (no shared memory) counts
    them under KIND_GPU_OUTPUTS_IN_HOST_MEMORY, the label test_gpu_shared_memory.py asserts absent
    on the CUDA shared-memory path; a KIND_CPU model counts nothing."""
    outputs = asyncio.run(_infer_once(kind))
    assert np.array_equal(outputs["output"], np.invert(np.arange(1000, dtype=np.int64)))
    expected = {KIND_GPU_OUTPUTS_IN_HOST_MEMORY: outputs["output"].nbytes} if kind == "KIND_GPU" else {}
    assert host_copies.by_where == expected, host_copies.by_where


class _FakeCupyArray:
    """Looks like a cupy array to ``is_device_array``: a device array whose ``get()`` copies it to the host."""

    __module__ = "cupy._core.core"

    def __init__(self, host: np.ndarray) -> None:
        self._host = host
        self.nbytes = host.nbytes

    def get(self) -> np.ndarray:
        return self._host.copy()


def test_a_device_input_put_in_the_http_body_is_counted_under_the_label_the_gpu_test_checks(host_copies):
    """A cupy input headed for Triton's HTTP body is copied to the host and counted under
    DEVICE_INPUT_IN_HTTP_BODY, the other label test_gpu_shared_memory.py asserts absent."""
    data = np.arange(500, dtype=np.int32)
    assert np.array_equal(host_array(_FakeCupyArray(data)), data)
    assert host_copies.by_where == {DEVICE_INPUT_IN_HTTP_BODY: data.nbytes}, host_copies.by_where
    host_array(data)  # a host array: no copy counted
    assert host_copies.copies == 1
