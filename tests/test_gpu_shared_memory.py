"""GPU tensors stay on the GPU: CUDA shared memory with Triton, cupy in the stores, UCX device to device.

Every test needs an NVIDIA GPU with cupy (and the UCX ones distributed-ucxx); elsewhere each
skips with the reason. ``bench/gpu_check.py`` runs them in one go on a GPU machine.
"""

from __future__ import annotations

import importlib.util

import dask.config
import pytest

from tdask import Deployment, OperatorConfig, RemoteOperator
from tdask.cli import gpu_unavailable_reason
from tdask.hello_world import MODEL_REPOSITORY
from tdask.triton.operator import KIND_GPU_OUTPUTS_IN_HOST_MEMORY
from tdask.triton.shared_memory import DEVICE_INPUT_IN_HTTP_BODY
from tests.conftest import store_stats
from tests.operators import CupyProducer, DeviceSum, Forward

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300), pytest.mark.gpu]

_GPU_REASON = gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(_GPU_REASON is not None, reason=f"no usable GPU: {_GPU_REASON}")
_UCX_REASON = _GPU_REASON or (
    None if importlib.util.find_spec("distributed_ucxx") else "distributed-ucxx is not installed (tdask[ucx])"
)
needs_ucx = pytest.mark.skipif(_UCX_REASON is not None, reason=f"UCX device-to-device: {_UCX_REASON}")

GPU = {"instance_group": [{"kind": "KIND_GPU", "count": 1}]}


def _host_copies(client) -> dict[str, dict[str, int]]:
    """Each worker's device bytes copied through host memory, by where (tdask.data_plane.HOST_COPIES)."""

    def where(dask_worker):
        from tdask.data_plane import HOST_COPIES

        return dict(HOST_COPIES.by_where)

    names = {a: str(w["name"]) for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    return {names[a]: v for a, v in client.run(where).items()}


@needs_gpu
def test_kind_gpu_outputs_come_back_as_cupy_through_cuda_shared_memory():
    """A KIND_GPU encoder: its output is written by Triton into CUDA memory tdask owns and kept
    as cupy in the worker's store; a cupy input reaches the model without a host copy."""
    import cupy

    encoder = OperatorConfig(
        name="encoder", implementation="triton", repository=MODEL_REPOSITORY, parameters={"config": GPU}
    )
    settings = {"tdask.triton.mode": "subprocess", "tdask.triton.shared-memory": "auto"}  # shm: subprocess mode's
    with dask.config.set(settings), Deployment([encoder], dashboard_address=None) as dep:
        op = RemoteOperator("encoder", client=dep.client)
        data = cupy.arange(200_000, dtype=cupy.int64)
        response = op.infer(inputs={"input": data}, parameters={"input_copies": 2})
        out = response.outputs["output"]
        assert type(out).__module__.startswith("cupy"), type(out)
        assert bool((out == cupy.invert(cupy.tile(data, 2))).all())
        where = _host_copies(dep.client)["encoder.0"]
        assert DEVICE_INPUT_IN_HTTP_BODY not in where, where
        assert KIND_GPU_OUTPUTS_IN_HOST_MEMORY not in where, where


@needs_gpu
def test_host_copies_are_counted_over_tcp():
    """Over TCP a device tensor is staged through host memory: the store counts those bytes."""
    operators = [
        OperatorConfig(name="forward", implementation=Forward, parameters={"first": "producer", "second": "consumer"}),
        OperatorConfig(name="producer", implementation=CupyProducer),
        OperatorConfig(name="consumer", implementation=DeviceSum),
    ]
    with Deployment(operators, dashboard_address=None) as dep:
        n = 1_000_000
        response = RemoteOperator("forward", client=dep.client).infer(inputs={}, parameters={"n": n})
        assert response.outputs["sum"][0] == pytest.approx(n * (n - 1) / 2, rel=1e-4)
        assert response.parameters["device"] == "cuda"
        stats = store_stats(dep.client)
        assert stats["producer.0"]["host_copy_bytes"] == n * 4, stats
        assert stats["consumer.0"]["host_copy_bytes"] == n * 4, stats


@needs_ucx
def test_ucx_moves_device_tensors_device_to_device():
    """Over UCX the producer's cupy output reaches the consumer's GPU with 0 host bytes copied."""
    operators = [
        OperatorConfig(name="forward", implementation=Forward, parameters={"first": "producer", "second": "consumer"}),
        OperatorConfig(name="producer", implementation=CupyProducer),
        OperatorConfig(name="consumer", implementation=DeviceSum),
    ]
    with Deployment(operators, protocol="ucxx", dashboard_address=None) as dep:
        n = 4_000_000
        response = RemoteOperator("forward", client=dep.client).infer(inputs={}, parameters={"n": n})
        assert response.parameters["device"] == "cuda"
        stats = store_stats(dep.client)
        assert stats["consumer.0"]["pulled_bytes"] == n * 4
        assert all(s["host_copy_bytes"] == 0 for s in stats.values()), stats


@needs_ucx
def test_hello_world_with_gpu_models_over_ucx_copies_nothing_through_host():
    """The hello world with KIND_GPU encoder and decoder over UCX: right answers, cupy on the
    way, and no device byte copied through host memory anywhere on the data path."""
    import cupy

    from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators

    operators = hello_world_operators(
        encoders=TritonGroup(workers=1, max_inflight=4, instances=1, kind="GPU"),
        decoders=TritonGroup(workers=1, max_inflight=4, instances=1, kind="GPU"),
        encoder_decoders=PythonGroup(workers=1, max_inflight=4),
    )
    with Deployment(operators, protocol="ucxx", dashboard_address=None) as dep:
        data = cupy.arange(1_000_000, dtype=cupy.int64)
        response = RemoteOperator("encoder_decoder", client=dep.client).infer(inputs={"input": data})
        out = response.outputs["output"]
        assert type(out).__module__.startswith("cupy") and bool((out == data).all())
        stats = store_stats(dep.client)
        assert all(s["host_copy_bytes"] == 0 for s in stats.values()), (stats, _host_copies(dep.client))
