"""Routing by target: a caller sends a request to the worker it chose, or learns that it is gone."""

from __future__ import annotations

import pytest

from tdask import Deployment, InvalidRequestError, OperatorConfig, OperatorUnavailableError, RemoteOperator
from tests.conftest import assert_no_children

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def client():
    with Deployment(
        [(OperatorConfig(name="echo", implementation="tests.operators:Echo"), 2)], dashboard_address="127.0.0.1:0"
    ) as deployment:
        yield deployment.client
    assert_no_children()


def _hosts(client):
    workers = client.scheduler_info()["workers"]
    return sorted(workers)


def test_target_pins_every_request_to_the_chosen_worker(client):
    echo = RemoteOperator("echo", client=client)
    hosts = _hosts(client)
    assert len(hosts) == 2
    for host in hosts:
        assert {echo.infer(target=host).worker for _ in range(10)} == {host}
        assert [r.worker for r in echo.stream(target=host)] == [host]
    # Without a target, least-loaded spreads sequential calls over both.
    assert {echo.infer().worker for _ in range(10)} == set(hosts)


def test_a_gone_target_is_a_typed_error_or_falls_back(client):
    echo = RemoteOperator("echo", client=client)
    gone = "tcp://127.0.0.1:1"
    with pytest.raises(OperatorUnavailableError, match="target worker tcp://127.0.0.1:1 does not host echo") as info:
        echo.infer(target=gone, request_id="r-gone")
    assert info.value.request_id == "r-gone"
    assert echo.infer(target=gone, target_lost="fallback").worker in _hosts(client)
    with pytest.raises(InvalidRequestError, match="target_lost"):
        echo.infer(target=gone, target_lost="maybe")
