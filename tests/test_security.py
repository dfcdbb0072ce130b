"""Dask TLS end to end: requests, large tensors and forwarding over tls:// with generated certificates."""

from __future__ import annotations

import numpy as np
import pytest

from tdask import Deployment, OperatorConfig, RemoteOperator
from tdask.host import PLUGIN_NAME
from tests.conftest import assert_no_children, child_pids, store_stats
from tests.operators import Consumer, Forward, Identity, Producer

pytestmark = pytest.mark.timeout(180)


def test_tls_end_to_end():
    pytest.importorskip("cryptography", reason="Security.temporary() generates its certificates with cryptography")
    from distributed.security import Security

    security = Security.temporary()  # a fresh CA and certificate, made in this test
    operators = [
        OperatorConfig(name="identity", implementation=Identity),
        OperatorConfig(name="forward", implementation=Forward),
        OperatorConfig(name="producer", implementation=Producer),
        OperatorConfig(name="consumer", implementation=Consumer),
    ]
    before = child_pids()
    with Deployment(operators, protocol="tls", security=security, dashboard_address=None) as dep:
        assert dep.scheduler_address.startswith("tls://127.0.0.1:")
        workers = dep.worker_addresses()
        assert all(addr.startswith("tls://127.0.0.1:") for addr in workers.values()), workers
        # tdask's wire has no TLS of its own: on tls:// every direct session is a Dask TLS comm.
        wires = dep.client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].direct._wire_address())
        assert set(wires.values()) == {None}, wires
        big = np.arange(1_000_000)
        response = RemoteOperator("identity", client=dep.client).infer(inputs={"x": big})
        np.testing.assert_array_equal(response.outputs["x"], big)
        n = 200_000
        response = RemoteOperator("forward", client=dep.client).infer(
            inputs={"start": np.array([0.0])}, parameters={"n": n}
        )
        assert response.outputs["sum"][0] == np.arange(n, dtype=np.float64).sum()
        stats = store_stats(dep.client)
        assert stats["forward.0"]["pulled_bytes"] == 0 and stats["consumer.0"]["pulled_bytes"] == n * 8
        assert all(s["tensors"] == 0 for s in stats.values())
    assert_no_children(ignore=before)
