"""A three-stage pipeline of Python operators behind one orchestrator: normalize -> linear -> softmax.

    python examples/three_stage_pipeline.py [--requests 20]

``classify`` calls the three stages in turn and forwards each stage's output to the next. Outputs
above ``tdask.data-plane.inline-threshold`` (64 KiB: here the normalized rows, 200 x 64 floats)
stay with the worker that made them and go to the next stage by reference, worker to worker,
never through ``classify`` or the client. Each answer is checked against the same computation
done here.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np

from tdask import Deployment, Operator, OperatorConfig, RemoteOperator

FEATURES, CLASSES = 64, 10


def weights() -> np.ndarray:
    """The linear stage's weights (the same in every process: a fixed seed)."""
    return np.random.default_rng(42).standard_normal((FEATURES, CLASSES))


def reference(x: np.ndarray) -> np.ndarray:
    """What the pipeline computes, in one process: each row's class."""
    z = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-9)
    return np.argmax(z @ weights(), axis=1)


class Normalize(Operator):
    async def execute(self, requests):
        for request in requests:
            x = (await request.fetch_inputs())["x"]
            z = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-9)
            await request.response_sender().send(outputs={"x": z}, parameters={"by": self.context.worker.name})


class Linear(Operator):
    async def setup(self):
        self.w = weights()

    async def execute(self, requests):
        for request in requests:
            x = (await request.fetch_inputs())["x"]
            await request.response_sender().send(outputs={"x": x @ self.w}, parameters={"by": self.context.worker.name})


class Softmax(Operator):
    async def execute(self, requests):
        for request in requests:
            x = (await request.fetch_inputs())["x"]
            e = np.exp(x - x.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            outputs = {"probabilities": p, "label": np.argmax(p, axis=1)}
            await request.response_sender().send(outputs=outputs, parameters={"by": self.context.worker.name})


class Classify(Operator):
    """The orchestrator: each stage's outputs become the next stage's inputs, descriptors included."""

    async def setup(self):
        self.stages = [RemoteOperator(name) for name in ("normalize", "linear", "softmax")]

    async def execute(self, requests):
        await asyncio.gather(*(self.serve(request) for request in requests))

    async def serve(self, request):
        tensors, path = {"x": request.inputs["x"]}, []
        for stage in self.stages:
            response = await stage.infer(inputs=tensors)  # inherits the request's deadline
            tensors = response.outputs
            path.append(response.parameters["by"])
        await request.response_sender().send(outputs=tensors, parameters={"path": " -> ".join(path)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--rows", type=int, default=200, help="rows of FEATURES floats per request")
    args = parser.parse_args()
    operators = [
        (OperatorConfig(name="normalize", implementation=Normalize, max_inflight_requests=4), 1),
        (OperatorConfig(name="linear", implementation=Linear, max_inflight_requests=4), 2),
        (OperatorConfig(name="softmax", implementation=Softmax, max_inflight_requests=4), 1),
        (OperatorConfig(name="classify", implementation=Classify, max_inflight_requests=8), 1),
    ]
    rng = np.random.default_rng(0)
    with Deployment(operators, dashboard_address=None) as deployment:
        classify = RemoteOperator("classify", client=deployment.client)
        correct, paths = 0, {}
        for _ in range(args.requests):
            x = rng.standard_normal((args.rows, FEATURES))
            response = classify.infer(inputs={"x": x}, timeout=60)
            correct += int(np.array_equal(response.outputs["label"], reference(x)))
            paths[response.parameters["path"]] = paths.get(response.parameters["path"], 0) + 1
    print(f"correct: {correct}/{args.requests}")
    for path, count in sorted(paths.items()):
        print(f"  classify -> {path}: {count}")


if __name__ == "__main__":
    main()
