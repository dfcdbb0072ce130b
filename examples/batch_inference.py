"""Offline and online inference on one deployment: a ``dask.array`` scored partition by partition.

    python examples/batch_inference.py [--rows 20000] [--chunk 1000]

The ``score`` operator (two workers) serves online requests; meanwhile a ``dask.array`` job on the
same cluster scores every chunk of a large array by calling the same operator from inside its
tasks. Batch and online traffic share the operator's workers and its ``max_inflight_requests``
slots: no second copy of the model, no second cluster; Dask schedules the batch, tdask serves
both. The batch result is checked against the same computation done here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dask.array as da
import numpy as np

from tdask import Deployment, Operator, OperatorConfig, RemoteOperator

FEATURES = 16


def weights() -> np.ndarray:
    return np.random.default_rng(7).standard_normal(FEATURES)


class Score(Operator):
    """A logistic-regression "model": one score per row."""

    async def setup(self):
        self.w = weights()

    async def execute(self, requests):
        for request in requests:
            x = (await request.fetch_inputs())["x"]
            score = 1 / (1 + np.exp(-(x @ self.w)))
            await request.response_sender().send(outputs={"score": score}, parameters={"by": self.context.worker.name})


def score_chunk(chunk: np.ndarray) -> np.ndarray:
    """A Dask task: one request to ``score`` through the worker's own client (``get_client()``)."""
    return RemoteOperator("score").infer(inputs={"x": np.ascontiguousarray(chunk)}, timeout=60).outputs["score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=1_000)
    args = parser.parse_args()
    operators = [(OperatorConfig(name="score", implementation=Score, max_inflight_requests=4), 2)]
    with Deployment(operators, dashboard_address=None) as deployment:
        client = deployment.client
        x = da.random.RandomState(0).standard_normal((args.rows, FEATURES), chunks=(args.chunk, FEATURES))
        scores = x.map_blocks(score_chunk, drop_axis=1, meta=np.empty((0,), np.float64))
        batch = client.compute(scores)  # offline: runs on the cluster's workers, in the background
        online = RemoteOperator("score", client=client)
        rng = np.random.default_rng(1)
        latencies, served = [], {}
        while not batch.done() or not latencies:  # online: one request at a time meanwhile
            start = time.perf_counter()
            response = online.infer(inputs={"x": rng.standard_normal((1, FEATURES))}, timeout=60)
            latencies.append(time.perf_counter() - start)
            served[response.parameters["by"]] = served.get(response.parameters["by"], 0) + 1
        result = batch.result()
        expected = 1 / (1 + np.exp(-(x.compute() @ weights())))
    ok = result.shape == (args.rows,) and np.allclose(result, expected)
    print(f"offline: {args.rows} rows in {x.numblocks[0]} partitions scored, {'correct' if ok else 'WRONG'}")
    print(
        f"online meanwhile: {len(latencies)} requests, p50 {statistics.median(latencies) * 1e3:.1f} ms, "
        f"served by {', '.join(f'{w} x{n}' for w, n in sorted(served.items()))}"
    )


if __name__ == "__main__":
    main()
