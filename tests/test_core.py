"""The core on a real cluster: worker processes hosting Python operators, a real scheduler."""

from __future__ import annotations

import asyncio
import time

import dask
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from distributed import Client
from hypothesis import HealthCheck, given, settings

from tdask import (
    ClientClosedError,
    Deployment,
    InvalidRequestError,
    OperatorConfig,
    OperatorError,
    OperatorUnavailableError,
    RemoteOperator,
    RemoteTensor,
    RequestCancelledError,
    RequestTimeoutError,
)
from tests.conftest import assert_no_children, run_async, store_stats, wait_for
from tests.operators import Add, Consumer, Echo, Fail, Forward, Identity, Producer, Streamer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", params=["queue", "direct", "direct-dask"])
def deployment(request):
    """The same cluster for each request plane, the direct one on either transport (tdask's wire,
    or Dask's comm); workers inherit the config through their Nanny."""
    operators = [
        (OperatorConfig(name="identity", implementation=Identity, max_inflight_requests=4), 1),
        (OperatorConfig(name="add", implementation=Add, max_inflight_requests=2), 2),
        (OperatorConfig(name="fail", implementation=Fail, max_inflight_requests=2), 1),
        (OperatorConfig(name="streamer", implementation=Streamer), 1),
        (OperatorConfig(name="forward", implementation=Forward, max_inflight_requests=4), 1),
        (OperatorConfig(name="producer", implementation="tests.operators:Producer"), 1),
        (OperatorConfig(name="consumer", implementation=Consumer, max_inflight_requests=4), 1),
        (OperatorConfig(name="echo", implementation=Echo, max_inflight_requests=4), 1),
    ]
    plane, _, transport = request.param.partition("-")
    with dask.config.set({"tdask.request.plane": plane, "tdask.request.direct-transport": transport or "wire"}):
        with Deployment(operators, dashboard_address="127.0.0.1:0") as dep:
            yield dep
    assert_no_children()


@pytest.fixture(scope="module")
def client(deployment) -> Client:
    return deployment.client


@pytest.mark.cluster
def test_sync_round_trip(client):
    op = RemoteOperator("add", client=client)
    response = op.infer(inputs={"a": np.arange(5), "b": np.ones(5, dtype=np.int64)})
    np.testing.assert_array_equal(response.outputs["out"], np.arange(5) + 1)
    assert response.final and response.operator == "add" and response.worker.startswith("tcp://127.0.0.1:")


@pytest.mark.cluster
def test_many_concurrent_requests_spread_and_bounded(deployment, client):
    async def go(c):
        op = RemoteOperator("add", client=c)
        rng = np.random.default_rng(0)
        inputs = [(rng.integers(0, 100, 50), rng.integers(0, 100, 50)) for _ in range(200)]
        responses = await asyncio.gather(
            *(op.infer(inputs={"a": a, "b": b}, parameters={"delay": 0.005}) for a, b in inputs)
        )
        for (a, b), r in zip(inputs, responses, strict=True):
            np.testing.assert_array_equal(r.outputs["out"], a + b)
        return responses

    responses = run_async(deployment.scheduler_address, go)
    workers = {r.worker for r in responses}
    assert len(workers) == 2, "load must be spread over both add workers"
    # Measured inside the operator: never more than max_inflight_requests=2 overlapping.
    assert max(r.parameters["peak"] for r in responses) == 2
    stats = client.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"](), workers=list(workers))
    for s in stats.values():
        assert s["add/1"]["max_inflight_seen"] <= 2


@pytest.mark.cluster
def test_broker_credits_come_back_to_the_limit(deployment, client):
    """After a burst, the broker holds exactly max_inflight_requests credits per worker: requests
    sent directly to a worker took none, so finishing them must not grant any."""
    from tdask.scheduler.broker import BROKER_NAME
    from tests.conftest import wait_for

    async def go(c):
        op = RemoteOperator("add", client=c)
        await asyncio.gather(*(op.infer(inputs={"a": np.arange(3), "b": np.arange(3)}) for _ in range(60)))

    run_async(deployment.scheduler_address, go)

    def credits(dask_scheduler):
        return dict(dask_scheduler.plugins[BROKER_NAME].credits["add/1"])

    def back_to_the_limit() -> bool:  # the last grants may still be on their way
        found = client.run_on_scheduler(credits)
        return len(found) == 2 and set(found.values()) == {2}

    wait_for(back_to_the_limit, message=lambda: f"broker credits of add/1: {client.run_on_scheduler(credits)}")


@pytest.mark.cluster
def test_closing_a_client_closes_its_comms_to_workers(deployment, client):
    """distributed has no close hook for comms a Client did not open itself: the broker tells
    the workers, which close the direct-plane comms of that client, while its process (and
    event loop) lives on."""
    from tdask.host import PLUGIN_NAME
    from tests.conftest import async_wait_for

    def requesters(dask_worker):
        return sorted(set(dask_worker.plugins[PLUGIN_NAME].direct.sessions.values()))

    async def main():
        closed = await Client(deployment.scheduler_address, asynchronous=True)
        for name in ("identity", "echo"):
            await RemoteOperator(name, client=closed).infer(inputs={"x": np.arange(3)})
        async with Client(deployment.scheduler_address, asynchronous=True) as observer:

            async def all_requesters() -> list[str]:
                return [r for rs in (await observer.run(requesters)).values() for r in rs]

            async def gone() -> bool:
                return closed.id not in await all_requesters()

            before = await all_requesters()
            await closed.close()
            await async_wait_for(gone, message="a closed client's comms to workers stay open")
        return closed.id, before

    requester, before = asyncio.run(main())
    plane = dask.config.get("tdask.request.plane")
    assert (requester in before) == (plane == "direct"), before
    # The shared client's own comms are untouched and still serve.
    assert RemoteOperator("identity", client=client).infer(inputs={"x": np.arange(2)}).outputs["x"].tolist() == [0, 1]


@pytest.mark.cluster
def test_direct_sessions_ride_the_configured_transport(client):
    """On tcp:// the direct plane's sessions are tdask's wire unless configured to be Dask comms
    (then workers open no port of their own). Workers listen on their wire whichever plane
    they use themselves: each caller picks its own plane."""
    from tdask.host import PLUGIN_NAME

    for name in ("identity", "echo"):
        RemoteOperator(name, client=client).infer(inputs={"x": np.arange(3)})

    def transports(dask_worker):
        plugin = dask_worker.plugins[PLUGIN_NAME]
        return plugin.direct.listener.wire_address(), sorted({type(s).__name__ for s in plugin.direct.sessions})

    found = client.run(transports)
    if dask.config.get("tdask.request.direct-transport") == "wire":
        assert all(wire and wire.startswith("127.0.0.1:") for wire, _ in found.values()), found
    else:
        assert all(wire is None for wire, _ in found.values()), found
    kinds = {kind for _, used in found.values() for kind in used}
    if dask.config.get("tdask.request.plane") == "queue":
        assert kinds == set(), found
    elif dask.config.get("tdask.request.direct-transport") == "wire":
        assert kinds == {"WireSession"}, found
    else:
        assert kinds == {"Session"}, found


@pytest.mark.cluster
def test_large_tensors_travel_by_reference(deployment, client):
    before = store_stats(client)
    n = 10 * 2**20 // 8  # 10 MiB of float64
    response = RemoteOperator("forward", client=client).infer(inputs={"start": np.array([1.0])}, parameters={"n": n})
    expected = np.arange(1.0, 1.0 + n).sum()
    assert response.outputs["sum"][0] == expected
    after = store_stats(client)

    def delta(name, key):
        return after[name][key] - before[name][key]

    assert delta("producer.0", "served_bytes") == n * 8, "the producer served the 10 MiB exactly once"
    assert delta("consumer.0", "pulled_bytes") == n * 8, "the consumer pulled it straight from the producer"
    assert delta("forward.0", "pulled_bytes") == 0, "the orchestrator forwarded the descriptor, not the bytes"
    assert delta("forward.0", "served_bytes") == 0
    assert all(s["tensors"] == 0 for s in after.values()), after
    # 10 MiB is above tdask.data-plane.wire-max-bytes (1 MiB): Dask's comm on every plane.
    assert delta("consumer.0", "shortcut_pulled_bytes") == 0


@pytest.mark.cluster
def test_host_tensors_up_to_wire_max_bytes_take_the_wire(deployment, client):
    """The direct plane's wire carries host tensors up to wire-max-bytes; Dask's comm on the
    queue plane and with direct-transport: dask."""
    before = store_stats(client)
    n = 2**19 // 8  # 512 KiB: by reference, under the wire's limit
    response = RemoteOperator("forward", client=client).infer(inputs={"start": np.array([1.0])}, parameters={"n": n})
    assert response.outputs["sum"][0] == np.arange(1.0, 1.0 + n).sum()
    after = store_stats(client)
    consumer = {key: after["consumer.0"][key] - before["consumer.0"][key] for key in after["consumer.0"]}
    assert consumer["pulled_bytes"] == n * 8
    assert after["producer.0"]["served_bytes"] - before["producer.0"]["served_bytes"] == n * 8
    if _wire_carries_data():
        assert consumer["shortcut_pulled_bytes"] == n * 8, consumer
        assert consumer["shortcut_calls"] >= 1 and consumer["shortcut_declined"] == 0, consumer
    else:
        assert consumer["shortcut_calls"] == consumer["shortcut_pulled_bytes"] == 0, consumer
    assert all(s["tensors"] == 0 for s in after.values()), after


@pytest.mark.cluster
def test_an_operator_sends_large_arrays_of_its_own_to_another(client):
    """Inside an operator, a large input it made itself is placed in its own worker's store (the
    worker's endpoint) and pulled from there by the operator it calls; released afterwards."""
    n = 100_000
    response = RemoteOperator("forward", client=client).infer(
        inputs={"start": np.array([2.0])}, parameters={"n": n, "copy": True}
    )
    assert response.outputs["sum"][0] == np.arange(2.0, 2.0 + n).sum()
    assert response.parameters == {"n": n}
    wait_for(lambda: all(s["tensors"] == 0 for s in store_stats(client).values()), message="tensors left in stores")


def _wire_carries_data() -> bool:
    return dask.config.get("tdask.request.plane") == "direct" and (
        dask.config.get("tdask.request.direct-transport") == "wire"
    )


def _set_everywhere(client, key, value):
    """Set a dask config value in this process and in every worker (the previous one is returned)."""

    def set_it(key=key, value=value):
        previous = dask.config.get(key)
        dask.config.set({key: value})
        return previous

    client.run(set_it)
    return set_it()


@pytest.mark.cluster
def test_tensors_above_wire_max_bytes_move_on_dasks_comm(deployment, client):
    """Above tdask.data-plane.wire-max-bytes the bytes take Dask's comm, on every plane; the
    answer is the same."""
    previous = _set_everywhere(client, "tdask.data-plane.wire-max-bytes", "64KiB")
    try:
        before = store_stats(client)
        n = 2**19 // 8  # 512 KiB: by reference, above the lowered wire limit
        response = RemoteOperator("forward", client=client).infer(
            inputs={"start": np.array([1.0])}, parameters={"n": n}
        )
        assert response.outputs["sum"][0] == np.arange(1.0, 1.0 + n).sum()
        after = store_stats(client)
    finally:
        _set_everywhere(client, "tdask.data-plane.wire-max-bytes", previous)
    assert after["consumer.0"]["pulled_bytes"] - before["consumer.0"]["pulled_bytes"] == n * 8
    assert after["consumer.0"]["shortcut_pulled_bytes"] == before["consumer.0"]["shortcut_pulled_bytes"]
    assert all(s["tensors"] == 0 for s in after.values()), after


@pytest.mark.cluster
def test_a_tensor_above_the_wire_frame_falls_back_to_dasks_comm(client):
    """wire-max-bytes set above tdask.wire.max-frame (64 MiB): the place is not tried on the
    wire, the owner refuses the fetch there, and both go over Dask's comm: nothing is lost."""
    from tdask.data_plane import client_peer

    peer = client_peer(client)
    declined = peer.shortcut_declined
    previous = _set_everywhere(client, "tdask.data-plane.wire-max-bytes", "1GiB")
    try:
        big = np.arange(9 * 2**20, dtype=np.int64)  # 72 MiB
        response = RemoteOperator("identity", client=client).infer(inputs={"x": big})
    finally:
        _set_everywhere(client, "tdask.data-plane.wire-max-bytes", previous)
    np.testing.assert_array_equal(response.outputs["x"], big)
    # On the wire the place was not tried and the fetch was refused: two calls left to Dask's comm.
    assert peer.shortcut_declined - declined == (2 if _wire_carries_data() else 0)
    assert not response.outputs["x"].flags.writeable
    assert all(s["tensors"] == 0 for s in store_stats(client).values())


@pytest.mark.cluster
def test_a_workers_wire_answers_data_calls_and_closes_on_a_malformed_one(client):
    """A raw wire peer: a fetch of an unknown tensor is answered "missing", a release "OK"; a
    data call lacking its fields closes the connection (so a caller waiting on it falls back to
    Dask's comm) instead of going unanswered."""
    import struct

    import msgpack

    from tdask.host import PLUGIN_NAME
    from tests.test_wire import HELLO, frame, raw_connect

    if not _wire_carries_data():
        pytest.skip("only the direct plane on the wire answers data calls")
    wires = client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].direct.listener.wire_address())
    wire = next(iter(wires.values()))

    async def main():
        reader, writer = await raw_connect(
            wire,
            frame([HELLO])
            + frame([{"op": "data", "call": 1, "action": "fetch", "tensor_id": "nope"}])
            + frame([{"op": "data", "call": 2, "action": "release", "tensor_ids": ["nope"]}]),
        )
        replies = []
        while len(replies) < 2:
            (length,) = struct.unpack("<I", await asyncio.wait_for(reader.readexactly(4), 10))
            replies.extend(msgpack.unpackb(await reader.readexactly(length)))
        writer.write(frame([{"op": "data", "call": 3, "action": "fetch"}]))  # no tensor_id
        rest = await asyncio.wait_for(reader.read(), 10)  # b"" once the worker closed it
        writer.close()
        return replies, rest

    replies, rest = asyncio.run(main())
    assert [(r["op"], r["call"], r["status"]) for r in replies] == [
        ("data-reply", 1, "missing"),
        ("data-reply", 2, "OK"),
    ]
    assert rest == b"", "the malformed call was answered instead of closing the connection"


@pytest.mark.cluster
def test_a_released_tensor_fails_its_fetch_with_a_data_plane_error(client):
    """Fetching what its owner no longer holds names the tensor and its owner (wire or comm)."""
    from tdask import DataPlaneError
    from tdask.data_plane import client_peer

    big = np.arange(20_000, dtype=np.int64)  # 160 KB: placed, then handed back by reference
    lazy = RemoteOperator("identity", client=client).infer(inputs={"x": big}, fetch=False)
    tensor = lazy.outputs["x"]
    assert isinstance(tensor, RemoteTensor)
    np.testing.assert_array_equal(client.sync(tensor.fetch), big)  # held: served (not released)
    peer = client_peer(client)
    calls = peer.shortcut_calls
    client.sync(lazy.release)
    with pytest.raises(DataPlaneError, match=f"tensor {tensor.tensor_id} is not in the store of") as info:
        client.sync(tensor.fetch)
    assert info.value.owner == tensor.owner and info.value.tensor_id == tensor.tensor_id
    assert (peer.shortcut_calls > calls) == _wire_carries_data()
    assert all(s["tensors"] == 0 for s in store_stats(client).values())


@pytest.mark.cluster
def test_large_client_input_and_output(client):
    big = np.arange(2_000_000, dtype=np.int64)  # 16 MB: placed in a worker's store first
    response = RemoteOperator("identity", client=client).infer(inputs={"x": big})
    np.testing.assert_array_equal(response.outputs["x"], big)
    lazy = RemoteOperator("identity", client=client).infer(inputs={"x": big}, fetch=False)
    assert isinstance(lazy.outputs["x"], RemoteTensor) and lazy.outputs["x"].nbytes == big.nbytes
    client.sync(lazy.release)
    assert all(s["tensors"] == 0 for s in store_stats(client).values())


@pytest.mark.cluster
def test_a_client_releases_nothing_its_workers_drop_as_they_answer(client):
    """A large input a client placed for one request is dropped by the worker holding it as it
    answers, and an output the client fetches is released in the same call: the client makes no
    release call of its own on any plane, and every store is empty when the call returns."""
    from tdask.remote import _ClientEndpoint

    peer = _ClientEndpoint.of(client).peer
    big = np.arange(200_000, dtype=np.int64)  # 1.6 MB: placed at the consumer's worker, not echoed
    before = peer.release_calls
    response = RemoteOperator("consumer", client=client).infer(inputs={"data": big})
    assert response.outputs["sum"][0] == big.sum()
    assert peer.release_calls == before, "the worker that answered dropped the placed input itself"
    assert all(s["tensors"] == 0 for s in store_stats(client).values())
    # Echoed: kept by the worker (it is the output), fetched and released by the client at once.
    response = RemoteOperator("identity", client=client).infer(inputs={"x": big})
    np.testing.assert_array_equal(response.outputs["x"], big)
    stats = store_stats(client)
    assert all(s["tensors"] == 0 for s in stats.values()), stats
    # One release call per output only where the fetch took Dask's comm (no shortcut on the queue plane).
    assert peer.release_calls - before == (0 if _wire_carries_data() else 1)


@pytest.mark.cluster
def test_workers_collect_garbage_at_the_configured_thresholds(client):
    """tdask.worker.gc-threshold reaches every worker hosting operators (set at their setup)."""
    import gc

    wanted = tuple(dask.config.get("tdask.worker.gc-threshold"))
    found = client.run(gc.get_threshold)
    assert found and all(tuple(t) == wanted for t in found.values()), found


@pytest.mark.cluster
def test_streaming(client):
    responses = list(RemoteOperator("streamer", client=client).stream(parameters={"count": 4}))
    assert [int(r.outputs["i"][0]) for r in responses] == [0, 1, 2, 3]
    assert [r.final for r in responses] == [False, False, False, True]


@pytest.mark.cluster
def test_async_stream_and_infer(deployment):
    async def go(c):
        op = RemoteOperator("streamer", client=c)
        got = [r async for r in op.stream(parameters={"count": 3})]
        last = await op.infer(parameters={"count": 2})
        return got, last

    got, last = run_async(deployment.scheduler_address, go)
    assert len(got) == 3 and got[-1].final
    assert int(last.outputs["i"][0]) == 1


@pytest.mark.cluster
def test_operator_raises(client):
    with pytest.raises(OperatorError) as info:
        RemoteOperator("fail", client=client).infer(parameters={"mode": "raise"}, request_id="req-raise")
    err = info.value
    assert err.operator == "fail" and err.request_id == "req-raise" and err.worker
    assert err.remote_type == "ZeroDivisionError" and "boom from Fail" in str(err)
    # The worker keeps serving.
    assert RemoteOperator("fail", client=client).infer(parameters={"mode": "sleep", "seconds": 0}).final


@pytest.mark.cluster
@pytest.mark.parametrize(
    "mode, error, text",
    [
        ("no-final", OperatorError, "without sending a final response"),
        ("bad-output", OperatorError, "output 'x' is a list"),
        ("invalid", InvalidRequestError, "the input is unacceptable"),
    ],
)
def test_operator_misbehaves(client, mode, error, text):
    with pytest.raises(error, match=text) as info:
        RemoteOperator("fail", client=client).infer(parameters={"mode": mode})
    assert info.value.operator == "fail"


@pytest.mark.cluster
def test_bad_input_on_the_caller(client):
    op = RemoteOperator("add", client=client)
    with pytest.raises(InvalidRequestError, match="input 'a' is a list"):
        op.infer(inputs={"a": [1, 2], "b": np.ones(2)})
    with pytest.raises(InvalidRequestError, match="parameters must be str, int, float or bool"):
        op.infer(inputs={"a": np.ones(2), "b": np.ones(2)}, parameters={"p": [1]})
    with pytest.raises(InvalidRequestError, match="Add needs inputs 'a' and 'b'"):
        op.infer(inputs={"a": np.ones(2)})
    with pytest.raises(InvalidRequestError, match="max-input-bytes"):
        import dask

        with dask.config.set({"tdask.request.max-input-bytes": "1KiB"}):
            op.infer(inputs={"a": np.ones(1000), "b": np.ones(1000)})


@pytest.mark.cluster
def test_unknown_operator_fails_after_bounded_wait(client):
    import dask

    start = time.monotonic()
    with dask.config.set({"tdask.request.unavailable-timeout": "0.5s"}):
        with pytest.raises(OperatorUnavailableError, match="no worker hosts operator nope/1") as info:
            RemoteOperator("nope", client=client).infer(request_id="r-unknown")
    assert time.monotonic() - start < 10
    assert info.value.request_id == "r-unknown"
    assert "add/1" in str(info.value), "the error lists the operators that are hosted"
    with dask.config.set({"tdask.request.unavailable-timeout": "0.5s"}):
        with pytest.raises(OperatorUnavailableError):
            RemoteOperator("add", version=7, client=client).infer(inputs={"a": np.ones(1), "b": np.ones(1)})


@pytest.mark.cluster
@pytest.mark.parametrize("timeout", [-1, -0.5, "-1s", 0, "soon", [1]])
def test_bad_timeouts_are_invalid_requests(client, timeout):
    with pytest.raises(InvalidRequestError, match="timeout") as info:
        RemoteOperator("identity", client=client).infer(inputs={"x": np.ones(1)}, timeout=timeout, request_id="bad-t")
    assert info.value.operator == "identity" and info.value.request_id == "bad-t"


@pytest.mark.cluster
def test_a_request_in_flight_when_its_client_closes(deployment):
    """The request ends with ClientClosedError naming it; a request through the closed client too."""
    from tests.conftest import async_wait_for

    async def main():
        async with Client(deployment.scheduler_address, asynchronous=True) as observer:

            async def running() -> int:
                stats = await observer.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
                return sum(s.get("fail/1", {"inflight": 0})["inflight"] for s in stats.values())

            c = await Client(deployment.scheduler_address, asynchronous=True)
            op = RemoteOperator("fail", client=c)
            task = asyncio.create_task(
                op.infer(parameters={"mode": "sleep", "seconds": 30}, timeout=60, request_id="in-flight")
            )
            await async_wait_for(running, message="the request never started on the worker")
            await c.close()
            with pytest.raises(ClientClosedError) as in_flight:
                await asyncio.wait_for(task, 20)
            with pytest.raises(ClientClosedError) as after:
                await op.infer(inputs={}, request_id="after-close")

            async def idle() -> bool:
                return await running() == 0

            # The operator sleeps 30 s: only the worker cancelling the closed client's request frees it.
            await async_wait_for(idle, timeout=20, message="the closed client's request still runs on the worker")
            return in_flight.value, after.value

    in_flight, after = asyncio.run(main())
    assert (in_flight.operator, in_flight.request_id) == ("fail", "in-flight"), in_flight
    assert (after.operator, after.request_id) == ("fail", "after-close"), after


@pytest.mark.cluster
def test_an_operator_task_cancelled_on_its_worker_is_request_cancelled(client):
    with pytest.raises(RequestCancelledError, match="cancelled on worker") as info:
        RemoteOperator("fail", client=client).infer(parameters={"mode": "cancel"}, request_id="cancelled-there")
    assert info.value.operator == "fail" and info.value.request_id == "cancelled-there"


@pytest.mark.cluster
def test_reading_a_closed_stream_is_request_cancelled(deployment):
    async def go(c):
        call = RemoteOperator("streamer", client=c).stream(parameters={"count": 3}, request_id="closed-early")
        first = await call.__anext__()
        await call.aclose()
        with pytest.raises(RequestCancelledError) as info:
            await call.__anext__()
        return first, info.value

    first, error = run_async(deployment.scheduler_address, go)
    assert first.outputs["i"].tolist() == [0]
    assert error.operator == "streamer" and error.request_id == "closed-early"


@pytest.mark.cluster
def test_unknown_operator_fails_at_once_in_a_started_cluster(client):
    """Nobody ever registered the name and every worker has finished starting: no wait."""
    import dask

    start = time.monotonic()
    with dask.config.set({"tdask.request.unavailable-timeout": "60s"}):
        with pytest.raises(OperatorUnavailableError, match="none ever did") as info:
            RemoteOperator("no-such-op", client=client).infer(request_id="r-wrong-name")
    assert time.monotonic() - start < 10, "answered at once, not after the 60 s wait"
    assert info.value.operator == "no-such-op" and info.value.request_id == "r-wrong-name"
    assert "add/1" in str(info.value), "the error lists the operators that are hosted"


@pytest.mark.cluster
def test_deadline_then_slot_is_free(client):
    op = RemoteOperator("fail", client=client)
    with pytest.raises(RequestTimeoutError) as info:
        op.infer(parameters={"mode": "sleep", "seconds": 30}, timeout=0.5, request_id="slow")
    assert isinstance(info.value, TimeoutError) and info.value.request_id == "slow"
    # The running request was cancelled on the worker: both slots serve again at once.
    start = time.monotonic()
    for _ in range(3):
        op.infer(parameters={"mode": "sleep", "seconds": 0}, timeout=10)
    assert time.monotonic() - start < 10
    stats = client.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
    assert all(s.get("fail/1", {"inflight": 0})["inflight"] == 0 for s in stats.values())


@pytest.mark.cluster
def test_cancelling_the_caller_cancels_the_request(deployment, client):
    from tests.conftest import async_wait_for

    async def go(c):
        async def inflight() -> int:
            stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
            return sum(s.get("fail/1", {"inflight": 0})["inflight"] for s in stats.values())

        async def idle() -> bool:
            return await inflight() == 0

        op = RemoteOperator("fail", client=c)
        task = asyncio.create_task(op.infer(parameters={"mode": "sleep", "seconds": 30}))
        await async_wait_for(inflight, message="the request never started on the worker")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The operator sleeps 30 s: only the cancellation reaching the worker frees its slot sooner.
        await async_wait_for(idle, message="the cancelled request still runs on the worker")

    run_async(deployment.scheduler_address, go)


@pytest.mark.cluster
def test_a_killed_caller_has_its_requests_cancelled(deployment, client):
    """A caller process that dies mid-request (SIGKILL: no goodbye on any comm): the worker
    cancels what it was running for it, whichever plane and transport carried the request."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from tests.conftest import wait_for

    script = textwrap.dedent(
        f"""
        import asyncio
        from distributed import Client
        from tdask import RemoteOperator
        async def main():
            async with Client({deployment.scheduler_address!r}, asynchronous=True) as c:
                op = RemoteOperator("fail", client=c)
                await op.infer(parameters={{"mode": "sleep", "seconds": 120}}, timeout=300)
        asyncio.run(main())
        """
    )

    def inflight() -> int:
        stats = client.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
        return sum(s.get("fail/1", {"inflight": 0})["inflight"] for s in stats.values())

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        # The caller uses the plane and transport of this module's variant.
        "DASK_TDASK__REQUEST__PLANE": dask.config.get("tdask.request.plane"),
        "DASK_TDASK__REQUEST__DIRECT_TRANSPORT": dask.config.get("tdask.request.direct-transport"),
    }

    def running() -> int:
        assert caller.poll() is None, "the caller exited before its request ran"
        return inflight()

    caller = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        wait_for(running, timeout=60, interval=0.1, message="the caller's request never started")
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    wait_for(lambda: inflight() == 0, timeout=30, message="the dead caller's request still runs on the worker")


@pytest.mark.cluster
def test_duplicate_request_id_in_flight(deployment):
    from tests.conftest import async_wait_for

    async def go(c):
        async def running() -> int:
            stats = await c.run(lambda dask_worker: dask_worker.handlers["tdask_host_stats"]())
            return sum(s.get("fail/1", {"inflight": 0})["inflight"] for s in stats.values())

        op = RemoteOperator("fail", client=c)
        first = asyncio.create_task(op.infer(parameters={"mode": "sleep", "seconds": 0.5}, request_id="same"))
        await async_wait_for(running, message="the first request never started on the worker")
        with pytest.raises(InvalidRequestError, match="already in flight"):
            await op.infer(parameters={"mode": "sleep", "seconds": 0}, request_id="same")
        return await first

    assert run_async(deployment.scheduler_address, go).final


_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint64", "float16", "float32", "float64", "bool", "complex128"]
_SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
)


@pytest.mark.cluster
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays=st.dictionaries(
        st.text(alphabet="abcdefghij_", min_size=1, max_size=8),
        st.sampled_from(_DTYPES).flatmap(
            lambda dtype: hnp.arrays(
                dtype,
                st.one_of(
                    hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), st.sampled_from([(20_000,), (0,), (3, 0)])
                ),
            )
        ),
        max_size=3,
    ),
    parameters=st.dictionaries(
        st.text(max_size=10, alphabet=st.characters(blacklist_categories=("Cs",))), _SCALARS, max_size=4
    ),
)
def test_property_any_tensor_and_parameters_round_trip(client, arrays, parameters):
    """Any dtype/shape (inline or through a worker's store) and any scalar parameters come back intact."""
    response = RemoteOperator("echo", client=client).infer(inputs=arrays, parameters=parameters, timeout=30)
    assert set(response.outputs) == set(arrays)
    for name, array in arrays.items():
        got = response.outputs[name]
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    assert response.parameters == parameters


@pytest.mark.cluster
@settings(max_examples=30, deadline=None)
@given(
    bad=st.one_of(
        st.lists(st.integers(), max_size=3),
        st.none(),
        st.dictionaries(st.text(), st.integers(), max_size=2),
        st.text(max_size=5),
        st.builds(object),
    )
)
def test_property_non_array_inputs_and_parameters_are_refused(client, bad):
    op = RemoteOperator("echo", client=client)
    with pytest.raises(InvalidRequestError, match="input 'x' is a"):
        op.infer(inputs={"x": bad})
    if not isinstance(bad, str):
        with pytest.raises(InvalidRequestError, match="parameter 'p' is a"):
            op.infer(parameters={"p": bad})


@pytest.mark.cluster
def test_stores_empty_after_run(client):
    stats = store_stats(client)
    assert all(s["tensors"] == 0 for s in stats.values()), stats


@pytest.mark.cluster
def test_every_listener_is_loopback(deployment):
    """Scheduler, nannies and workers bind 127.0.0.1 only (HTTP servers included)."""
    import psutil

    from tests.conftest import children

    listening = []
    for proc in [psutil.Process(), *children()]:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append((proc.pid, conn.laddr.ip, conn.laddr.port))
    assert len(listening) >= 9, listening
    assert {ip for _, ip, _ in listening} == {"127.0.0.1"}, listening


@pytest.mark.cluster
def test_dashboard_pages(deployment, client):
    """/tdask/operators.json serves the registry and what workers served; /tdask is the dashboard's page."""
    import json
    import urllib.request

    from tests.conftest import wait_for

    base = deployment.dashboard_link.rsplit("/status", 1)[0]
    assert base.startswith("http://127.0.0.1:")
    state = json.loads(urllib.request.urlopen(base + "/tdask/operators.json", timeout=10).read())
    assert len(state["hosts"]["add/1"]) == 2
    # Every worker reports what it served, whichever plane brought it (every 2 s, when changed).
    before = sum(w.get("add/1", {}).get("started", 0) for w in state["workers"].values())
    answered_before = state["counts"].get("answered", 0)
    op = RemoteOperator("add", client=client)
    for _ in range(5):
        op.infer(inputs={"a": np.arange(3), "b": np.arange(3)})
    if dask.config.get("tdask.request.plane") == "queue":  # direct requests bypass the broker
        after = json.loads(urllib.request.urlopen(base + "/tdask/operators.json", timeout=10).read())
        assert after["counts"]["answered"] == answered_before + 5, (answered_before, after["counts"])

    def served() -> int:
        nonlocal state
        state = json.loads(urllib.request.urlopen(base + "/tdask/operators.json", timeout=10).read())
        return sum(w.get("add/1", {}).get("started", 0) for w in state["workers"].values())

    wait_for(lambda: served() >= before + 5, interval=0.2, message=lambda: f"5 requests unreported: {state['workers']}")
    assert sum(1 for w in state["workers"].values() if "add/1" in w) == 2
    # /tdask is the dashboard's tdask page (Bokeh, drawn by a browser in tests/test_dashboard.py).
    page = urllib.request.urlopen(base + "/tdask", timeout=10).read().decode()
    assert 'href="tdask"' in page and 'href="individual-tdask"' in page  # in its navigation


def test_operator_config_validation():
    with pytest.raises(ValueError, match="max_inflight_requests"):
        OperatorConfig(name="x", implementation=Identity, max_inflight_requests=0)
    with pytest.raises(ValueError, match="not an Operator subclass"):
        OperatorConfig(name="x", implementation=int)
    with pytest.raises(ValueError, match="'module:Class'"):
        OperatorConfig(name="x", implementation="nocolon")
    with pytest.raises(ValueError, match="model repository"):
        OperatorConfig(name="x", implementation="triton")
    assert OperatorConfig(name="x", implementation=Producer, version=2).key == "x/2"


def test_session_writes_in_order_through_a_suspending_write():
    """A message large enough for Dask to offload its encoding makes ``comm.write`` suspend;
    what is sent meanwhile follows it, in order, nothing lost."""
    import msgpack
    from distributed.comm import connect, listen
    from distributed.comm.utils import OFFLOAD_THRESHOLD

    from tdask.transport.dask_comm import Session
    from tests.conftest import async_wait_for

    async def go():
        received: list[dict] = []
        done = asyncio.Event()

        async def serve(comm):
            while len(received) < 6:
                batch = await comm.read()
                received.extend(msgpack.unpackb(batch, raw=False) if isinstance(batch, bytes) else batch)
            done.set()

        listener = listen("tcp://127.0.0.1:0", serve)
        await listener.start()
        try:
            comm = await connect(listener.contact_address)
            session = Session(comm, lambda message: None, "test")
            session.send({"n": 0, "big": b"x" * (OFFLOAD_THRESHOLD + 1)})
            await asyncio.sleep(0)  # the write starts and suspends on the offload thread
            session.send({"n": 1})
            session.send({"n": 2})
            # The suspended write completes (the big message arrives); the session writes on.
            await async_wait_for(lambda: received, message="the big message never arrived")
            for n in (3, 4, 5):
                session.send({"n": n})
            await asyncio.wait_for(done.wait(), 10)
            await session.close()
        finally:
            listener.stop()
        return received

    received = asyncio.run(go())
    assert [m["n"] for m in received] == [0, 1, 2, 3, 4, 5]
    assert len(received[0]["big"]) > 10 * 2**20
