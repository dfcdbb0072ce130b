"""The benchmark's verdict logic (bench/run.py): ratios pair runs of the same round, targets use
the median over rounds. The benchmark itself runs by hand (`python -m bench`), not in CI."""

from __future__ import annotations

from bench.run import compare, render, targets


def row(system: str, rnd: int, conc: int, p50: float, rps: float) -> dict:
    return {
        "system": system,
        "size": 1000,
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
    # Sequential ratios 3.0, 5.0, 3.5 (one bad round); throughput ratios 0.5, 0.2, 0.3.
    runs = []
    for rnd, (tdask_p50, tdask_rps) in enumerate([(3.0, 500), (5.0, 200), (3.5, 300)], start=1):
        runs += [row("tdask", rnd, 1, tdask_p50, 100), row("triton_ensemble", rnd, 1, 1.0, 100)]
        runs += [row("tdask", rnd, 32, 10.0, tdask_rps), row("triton_ensemble", rnd, 32, 10.0, 1000)]
    out = {"sections": {"pipeline": {"runs": runs}}}
    compare(out, "pipeline", "triton_ensemble")
    targets(out)
    sequential, throughput = out["targets"]["sequential_p50"], out["targets"]["throughput_32_inflight"]
    assert sequential["rounds"] == [3.0, 5.0, 3.5] and sequential["ratio"] == 3.5 and sequential["met"]
    assert sequential["rounds_met"] == 2
    assert throughput["rounds"] == [0.5, 0.2, 0.3] and throughput["ratio"] == 0.3 and throughput["met"]
    assert throughput["rounds_met"] == 2
    out.update(
        versions={k: "x" for k in ("python", "dask", "distributed", "numpy", "tritonclient", "tritonserver")},
        machine={"cpu_count": 2, "platform": "test"},
        config={"scheduler": "embedded", "rounds": 3},
    )
    text = render(out)
    assert "tdask (round 2)" in text and "2/3: 3.0, 5.0, 3.5" in text
