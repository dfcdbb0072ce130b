"""The benchmark's verdict logic (bench/run.py): ratios pair runs of the same round, targets use
the median over rounds. The benchmark itself runs by hand (`python -m bench`), not in CI."""

from __future__ import annotations

import pytest

from bench.run import compare, render, targets


def row(system: str, rnd: int, conc: int, p50: float, rps: float, size: int = 1000) -> dict:
    return {
        "system": system,
        "size": size,
        "concurrency": conc,
        "round": rnd,
        "requests": 10,
        "errors": 0,
        "req_per_s": rps,
        "p50_ms": p50,
        "p99_ms": 2 * p50,
        "cpu_ms_per_request": {},
    }


def test_targets_are_judged_on_the_median_round():
    # 1e3 elements: sequential ratios 1.5, 3.0, 1.55 (one bad round); throughput ratios 0.9, 0.2, 0.7.
    # 1e5 elements: sequential ratios 0.9, 1.2, 1.3.
    runs = []
    for rnd, (tdask_p50, tdask_rps, large_p50) in enumerate([(1.5, 900, 0.9), (3.0, 200, 1.2), (1.55, 700, 1.3)], 1):
        runs += [row("tdask", rnd, 1, tdask_p50, 100), row("triton_ensemble", rnd, 1, 1.0, 100)]
        runs += [row("tdask", rnd, 32, 10.0, tdask_rps), row("triton_ensemble", rnd, 32, 10.0, 1000)]
        runs += [row("tdask", rnd, 1, large_p50, 10, 100_000), row("triton_ensemble", rnd, 1, 1.0, 10, 100_000)]
    out = {"sections": {"pipeline": {"runs": runs}}}
    compare(out, "pipeline", "triton_ensemble")
    targets(out)
    found = out["targets"]
    sequential, throughput = found["sequential_p50"], found["throughput_32_inflight"]
    large = found["sequential_p50_1e5"]
    assert sequential["rounds"] == [1.5, 3.0, 1.55] and sequential["ratio"] == 1.55 and sequential["met"]
    assert sequential["rounds_met"] == 2 and sequential["target"] == "<= 1.6"
    assert throughput["rounds"] == [0.9, 0.2, 0.7] and throughput["ratio"] == 0.7 and not throughput["met"]
    assert throughput["rounds_met"] == 1 and throughput["target"] == ">= 0.8"
    assert large["rounds"] == [0.9, 1.2, 1.3] and large["ratio"] == 1.2 and not large["met"]
    assert large["rounds_met"] == 1 and large["target"] == "<= 1.0"
    out.update(
        versions={k: "x" for k in ("python", "dask", "distributed", "numpy", "tritonclient", "tritonserver")},
        machine={"cpu_count": 2, "platform": "test"},
        config={"scheduler": "embedded", "rounds": 3},
    )
    text = render(out)
    assert "tdask (round 2)" in text and "2/3: 1.5, 3.0, 1.55" in text and "1/3: 0.9, 1.2, 1.3" in text


def test_each_topology_is_judged_against_the_ensemble_on_its_own():
    """``--topology spread,colocated``: each tdask system pairs with the ensemble of its round,
    and gets its own verdicts (the co-located ones named so)."""
    runs = []
    for rnd in (1, 2, 3):
        runs += [row("triton_ensemble", rnd, 1, 1.0, 100), row("tdask", rnd, 1, 2.0, 50)]
        runs += [row("tdask_colocated", rnd, 1, 1.2 + rnd / 100, 80)]
    out = {"sections": {"pipeline": {"runs": runs}}}
    compare(out, "pipeline", "triton_ensemble")
    targets(out)
    spread, colocated = out["targets"]["sequential_p50"], out["targets"]["sequential_p50 (colocated)"]
    assert spread["rounds"] == [2.0, 2.0, 2.0] and not spread["met"] and spread["system"] == "tdask"
    assert colocated["rounds"] == [1.21, 1.22, 1.23] and colocated["met"] and colocated["system"] == "tdask_colocated"
    out.update(
        versions={k: "x" for k in ("python", "dask", "distributed", "numpy", "tritonclient", "tritonserver")},
        machine={"cpu_count": 2, "platform": "test"},
        config={"scheduler": "embedded", "rounds": 3},
    )
    text = render(out)
    line = next(x for x in text.splitlines() if "tdask_colocated (round 2)" in x)
    assert "1.22" in line and "0.8" in line  # its own ratios, not the spread system's


def test_the_soak_fails_on_anything_lost_wrong_untyped_or_left():
    from bench.soak import failed
    from bench.soak import render as render_soak

    def out(**changes):
        requests = {
            "requests": 100,
            "answered_right": 98,
            "wrong": 0,
            "lost": 0,
            "duplicated": 0,
            "answers_per_id": {"1": 100},
            "typed_errors": {"WorkerLostError": 2},
            "untyped_errors": 0,
            "first_untyped": [],
            "p50_ms": 1.0,
            "p99_ms": 5.0,
            "max_ms": 9.0,
            "elapsed_s": 1.0,
            "req_per_s": 98.0,
        }
        leftovers = {
            "store_tensors": 0,
            "store_bytes": 0,
            "shm_regions_left": [],
            "triton_processes_left": [],
            "servers_seen": 3,
            "triton_processes_seen": 9,
        }
        executions = {
            "max_retries": 2,
            "executions_per_id": {"1": 98, "2": 2},
            "answered_executions_per_id": {"1": 100},
            "over_executed": 0,
            "re_executed": 0,
            "never_executed": 0,
            "examples": [],
            "processes": 3,
            "killed_processes": 1,
        }
        growth = {"worker encoder.0": 1.0, "worker encoder.1": None}
        for key, value in changes.items():
            if key == "growth":
                growth.update(value)
                continue
            for part in (requests, executions, leftovers):
                if key in part:
                    part[key] = value
                    break
            else:
                raise KeyError(key)
        return {
            "requests": requests,
            "leftovers": leftovers,
            "executions": executions,
            "kills": [{"t": 1.0, "kind": "stub", "of": "encoder.0", "pid": 1}],
            "rss_mb": {"worker encoder.0": [(0.0, 90.0), (1.0, 91.0)], "worker encoder.1": [(0.0, 90.0), (1.0, 9.0)]},
            "rss_growth_mb": growth,
            "config": {"kill_every": "3s", "plane": "direct", "max_rss_growth_mb": 32},
        }

    assert not failed(out()), "typed errors alone are an outcome, and a restarted row has no growth to judge"
    text = render_soak(out())
    assert "WorkerLostError 2" in text and "kills: stub 1" in text and "worker encoder.0" in text
    assert "restarted" in text  # worker encoder.1's row compares two processes: no growth shown
    for change in (
        {"lost": 1},
        {"wrong": 1},
        {"duplicated": 1},
        {"untyped_errors": 1},
        {"over_executed": 1},
        {"re_executed": 1},
        {"never_executed": 1},
        {"growth": {"worker encoder.0": 32.5}},
        {"store_tensors": 1},
        {"shm_regions_left": ["tdask1-ab_x"]},
        {"triton_processes_left": ["7 stub"]},
    ):
        assert failed(out(**change)), change


def test_the_soak_times_each_kill_to_the_last_answer_in_flight_at_it():
    """Per kind of kill: the longest wait, past the kill, of the requests in flight at it."""
    from bench.soak import _after_kills

    kills = [
        {"t": 1.0, "kind": "stub", "of": "encoder.0", "pid": 1},
        {"t": 5.0, "kind": "stub", "of": "decoder.0", "pid": 2},
        {"t": 9.0, "kind": "worker", "of": "decoder.1", "pid": 3},
        {"t": 20.0, "kind": "worker", "of": "decoder.1", "pid": 4},  # nothing in flight: not counted
    ]
    spans = [(0.5, 1.2), (0.9, 1.4), (4.0, 9.5), (8.0, 9.1), (1.5, 1.6)]
    after = _after_kills(kills, spans)
    assert after["stub"] == {"kills": 2, "p50_ms": 2450.0, "max_ms": 4500.0, "over_3s": 1}
    assert after["worker"] == {"kills": 1, "p50_ms": 500.0, "max_ms": 500.0, "over_3s": 0}


def test_the_autoscale_bench_judges_recovery_and_failures():
    from bench.autoscale import failed, recovery

    # answers (time, latency): slow for 4 s after the step at t=0, then fast
    answers = [(t / 10, 0.3 if t < 40 else 0.05) for t in range(100)]
    recovered, share, windows = recovery(answers, 0.0, 10.0, 2.0, bound=0.06)
    assert recovered == 6.0 and share == 1.0, windows  # the window starting at 4 s is the first under
    never, share, _ = recovery(answers, 0.0, 10.0, 2.0, bound=0.01)
    assert never is None and share == 0.0
    good = {"failed": {}, "lost": 0, "duplicated": 0, "workers_added": 3, "shrunk_back_after_s": 7.0}
    assert failed({"results": good}) == []
    for bad, text in [
        ({"failed": {"OperatorError": 1}}, "failed"),
        ({"lost": 1}, "lost"),
        ({"duplicated": 2}, "twice"),
        ({"workers_added": 0}, "did not grow"),
        ({"shrunk_back_after_s": None}, "did not shrink"),
    ]:
        problems = failed({"results": {**good, **bad}})
        assert len(problems) == 1 and text in problems[0], problems


def test_the_gateway_bench_judges_each_round_against_its_own_direct_row():
    from bench.gateway import judge
    from bench.gateway import render as render_gateway

    rows = []
    # round: (direct p50 at 1, http p50 at 1, direct req/s at 8, http req/s at 8)
    # and the protocol's floor (a server that only echoes) at 1 in flight: 0.4, 0.6, 0.5 ms
    for rnd, (d1, h1, d8, h8, f1) in enumerate(
        [(2.0, 2.5, 1000, 850, 0.4), (3.0, 4.5, 1200, 900, 0.6), (2.0, 2.9, 1000, 810, 0.5)], 1
    ):
        for path, p50, rps, conc in (("direct", d1, 500, 1), ("gateway-http", h1, 400, 1), ("floor-http", f1, 2000, 1)):
            rows.append(row(path, rnd, conc, p50, rps) | {"path": path})
        for path, rps in (("direct", d8), ("gateway-http", h8), ("floor-http", 4000)):
            rows.append(row(path, rnd, 8, 5.0, rps) | {"path": path})
    compared, found = judge(rows)
    added, ratio = found["gateway-http added_p50_ms_at_1"], found["gateway-http throughput_ratio_at_8"]
    assert added["rounds"] == [0.5, 1.5, 0.9] and added["median"] == 0.9 and added["met"] and added["rounds_met"] == 2
    assert ratio["rounds"] == [0.85, 0.75, 0.81] and ratio["median"] == 0.81 and ratio["rounds_met"] == 2
    assert not any("floor" in name for name in found), "a floor is not a gateway: no target of its own"
    # Each gateway row against its own round's floor: 0.5 - 0.4, 1.5 - 0.6, 0.9 - 0.5.
    at_1 = [c for c in compared if c["concurrency"] == 1]
    assert [c["floor_p50_ms"] for c in at_1] == [0.4, 0.6, 0.5]
    assert [c["beyond_floor_ms"] for c in at_1] == [0.1, 0.9, 0.4]
    text = render_gateway(rows, compared, found)
    assert "2/3: 0.5, 1.5, 0.9" in text and "2/3: 0.85, 0.75, 0.81" in text
    floors = text.split("== protocol floors")[1].splitlines()
    assert any(line.split()[:9] == ["http", "1000", "1", "0.5", "2000", "0", "0", "0.9", "0.4"] for line in floors), (
        floors
    )


@pytest.mark.cluster
def test_the_wire_floor_moves_the_bytes_it_times():
    """The dataplane section's wire floor: each rep a real payload frame between two processes
    (a short answer raises), and its sender is gone afterwards."""
    import psutil

    from bench.common import wire_loopback_seconds

    before = {p.pid for p in psutil.Process().children()}
    times = wire_loopback_seconds(1_000_000, 3)
    assert len(times) == 3 and all(t > 0 for t in times), times
    assert {p.pid for p in psutil.Process().children()} == before


@pytest.mark.cluster
def test_the_protocol_floor_echoes_over_both_protocols_with_the_gateways_clients():
    """bench.protocol_floor answers tritonclient's HTTP and gRPC calls with the input as ``output``,
    and stops when its standard input closes."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from bench.gateway import start_floor

    proc, http, grpc = start_floor("asyncio")
    try:
        x = np.arange(1000, dtype=np.int64)
        inp = httpclient.InferInput("input", [x.size], "INT64")
        inp.set_data_from_numpy(x, binary_data=True)
        np.testing.assert_array_equal(
            httpclient.InferenceServerClient(http).infer("encoder_decoder", [inp]).as_numpy("output"), x
        )
        ginp = grpcclient.InferInput("input", [x.size], "INT64")
        ginp.set_data_from_numpy(x)
        client = grpcclient.InferenceServerClient(grpc)
        np.testing.assert_array_equal(client.infer("encoder_decoder", [ginp]).as_numpy("output"), x)
        client.close()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(30) == 0
