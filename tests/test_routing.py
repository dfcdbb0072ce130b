"""Routing: by target (a worker's address or name), and by the policy an operator declares."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import dask
import pytest
from distributed import Client

from tdask import Deployment, InvalidRequestError, OperatorConfig, OperatorUnavailableError, RemoteOperator
from tests.conftest import assert_no_children, child_pids, run_async

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def client():
    operators = [
        (OperatorConfig(name="echo", implementation="tests.operators:Echo"), 2),
        (OperatorConfig(name="affine", implementation="tests.operators:Echo", routing="hash:session_id"), 3),
    ]
    with Deployment(operators, dashboard_address="127.0.0.1:0") as deployment:
        yield deployment.client
    assert_no_children()


def _hosts(client, operator="echo"):
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if str(w["name"]).startswith(f"{operator}."))


def _names(client, operator="echo"):
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {str(w["name"]): a for a, w in workers.items() if str(w["name"]).startswith(f"{operator}.")}


@pytest.mark.cluster
def test_target_pins_every_request_to_the_chosen_worker(client):
    echo = RemoteOperator("echo", client=client)
    hosts = _hosts(client)
    assert len(hosts) == 2
    for host in hosts:
        assert {echo.infer(target=host).worker for _ in range(10)} == {host}
        assert [r.worker for r in echo.stream(target=host)] == [host]
    # Without a target, least-loaded spreads sequential calls over both.
    assert {echo.infer().worker for _ in range(10)} == set(hosts)


@pytest.mark.cluster
def test_a_gone_target_is_a_typed_error_or_falls_back(client):
    echo = RemoteOperator("echo", client=client)
    gone = "tcp://127.0.0.1:1"
    with pytest.raises(OperatorUnavailableError, match="target worker tcp://127.0.0.1:1 does not host echo") as info:
        echo.infer(target=gone, request_id="r-gone")
    assert info.value.request_id == "r-gone"
    assert echo.infer(target=gone, target_lost="fallback").worker in _hosts(client)
    with pytest.raises(InvalidRequestError, match="target_lost"):
        echo.infer(target=gone, target_lost="maybe")


@pytest.mark.cluster
def test_target_may_be_a_worker_name(client):
    echo = RemoteOperator("echo", client=client)
    for name, address in _names(client).items():
        assert {echo.infer(target=name).worker for _ in range(5)} == {address}
    with pytest.raises(OperatorUnavailableError, match="target worker echo.9 does not host echo"):
        echo.infer(target="echo.9")


@pytest.mark.cluster
def test_the_queue_plane_refuses_a_target_with_a_typed_error(client):
    with dask.config.set({"tdask.request.plane": "queue"}), Client(client.scheduler.address) as queued:
        echo = RemoteOperator("echo", client=queued)
        assert echo.infer().worker in _hosts(client)
        with pytest.raises(InvalidRequestError, match="queue plane routes by load only") as info:
            echo.infer(target=_hosts(client)[0], request_id="r-queued")
        assert (info.value.operator, info.value.request_id) == ("echo", "r-queued")


@pytest.mark.cluster
def test_hash_policy_keeps_each_key_on_one_worker_and_spreads_keys(client):
    """routing="hash:session_id": 60 keys x 4 interleaved requests, from two callers."""
    affine = RemoteOperator("affine", client=client)
    hosts = _hosts(client, "affine")
    assert len(hosts) == 3
    keys = [f"session-{i}" for i in range(60)]
    seen: dict[str, set[str]] = {key: set() for key in keys}
    for _ in range(4):
        for key in keys:
            seen[key].add(affine.infer(parameters={"session_id": key}).worker)
    assert all(len(workers) == 1 for workers in seen.values()), seen
    mapping = {key: next(iter(workers)) for key, workers in seen.items()}
    spread = Counter(mapping.values())
    assert set(spread) == set(hosts) and min(spread.values()) >= 8, spread  # ~20 each

    async def other_caller(c):  # another client, concurrent requests: the same choice
        op = RemoteOperator("affine", client=c)
        answers = await asyncio.gather(*(op.infer(parameters={"session_id": key}) for key in keys))
        return {key: r.worker for key, r in zip(keys, answers, strict=True)}

    assert run_async(client.scheduler.address, other_caller) == mapping
    # Without the parameter: least-loaded, sequential calls spread over every host.
    assert {affine.infer().worker for _ in range(12)} == set(hosts)


@pytest.mark.cluster
def test_pinned_policy_sends_everything_to_one_host_until_it_dies():
    before = child_pids()  # the module's deployment, when it is up
    pinned = OperatorConfig(name="pinned", implementation="tests.operators:Echo", routing={"policy": "pinned"})
    with Deployment([(pinned, 2)], dashboard_address="127.0.0.1:0") as deployment:
        client = deployment.client
        op = RemoteOperator("pinned", client=client)
        first, second = _hosts(client, "pinned")

        async def concurrent(c):
            return {
                r.worker for r in await asyncio.gather(*(RemoteOperator("pinned", client=c).infer() for _ in range(20)))
            }

        assert {op.infer().worker for _ in range(10)} == {first}
        assert run_async(client.scheduler.address, concurrent) == {first}  # no spreading under load
        (pid,) = client.run(os.getpid, workers=[first]).values()
        os.kill(pid, signal.SIGKILL)
        # Traffic moves to the other host at once (the dead one may come back under a new address).
        after = [op.infer().worker for _ in range(10)]
        assert first not in after and after[0] == second, after
    assert_no_children(ignore=before)


def test_routing_declarations_are_checked():
    for bad in ("nearest", "hash", {"policy": "hash"}, {"policy": "pinned", "parameter": "x"}, 3):
        with pytest.raises(ValueError, match="routing"):
            OperatorConfig(name="x", implementation="tests.operators:Echo", routing=bad)
    config = OperatorConfig(name="x", implementation="tests.operators:Echo", routing="hash:user")
    assert config.routing == {"policy": "hash", "parameter": "user"}
    assert OperatorConfig(name="x", implementation="tests.operators:Echo").routing == {"policy": "least-loaded"}
