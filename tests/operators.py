"""Python operators used by the tests (real classes, hosted on real workers)."""

from __future__ import annotations

import asyncio
import os

import numpy as np

from tdask import InvalidRequestError, Operator, RemoteOperator, RemoteTensor
from tests.executions import record


class Identity(Operator):
    """Returns its inputs unchanged (descriptors are handed back, not fetched)."""

    async def execute(self, requests):
        for request in requests:
            await request.response_sender().send(outputs=dict(request.inputs), parameters={"pid": os.getpid()})


class Add(Operator):
    """``out = a + b``; sleeps ``delay`` seconds first; tracks how many executes overlap.

    With the operator parameter ``record_dir``, records each execution there
    (:func:`tests.executions.record`).
    """

    active = 0
    peak = 0

    async def execute(self, requests):
        type(self).active += len(requests)
        type(self).peak = max(type(self).peak, type(self).active)
        try:
            directory = self.parameters.get("record_dir")
            for request in requests:
                record(directory, "S", request.request_id)
                inputs = await request.fetch_inputs()
                if "a" not in inputs or "b" not in inputs:
                    raise request.error(f"Add needs inputs 'a' and 'b', got {sorted(inputs)}")
                await asyncio.sleep(float(request.parameters.get("delay", 0)))
                record(directory, "E", request.request_id)
                await request.response_sender().send(
                    outputs={"out": inputs["a"] + inputs["b"]},
                    parameters={"peak": type(self).peak},
                )
        finally:
            type(self).active -= len(requests)


class Fail(Operator):
    """Raises, or misbehaves, as asked by the ``mode`` parameter."""

    async def execute(self, requests):
        for request in requests:
            mode = request.parameters.get("mode", "raise")
            sender = request.response_sender()
            if mode == "raise":
                raise ZeroDivisionError("boom from Fail")
            if mode == "no-final":
                await sender.send(outputs={"x": np.zeros(1)}, final=False)
            elif mode == "bad-output":
                await sender.send(outputs={"x": [1, 2, 3]})
            elif mode == "invalid":
                raise request.error("the input is unacceptable")
            elif mode == "sleep":
                await asyncio.sleep(float(request.parameters.get("seconds", 30)))
                await sender.send(outputs={})
            elif mode == "exit":
                os._exit(1)
            elif mode == "cancel":  # the operator's own task is cancelled (not by the caller)
                raise asyncio.CancelledError


class Streamer(Operator):
    """Sends ``count`` responses, the last one final."""

    async def execute(self, requests):
        for request in requests:
            count = int(request.parameters.get("count", 3))
            sender = request.response_sender()
            for i in range(count):
                await sender.send(outputs={"i": np.array([i])}, final=i == count - 1)


class Forward(Operator):
    """Orchestrator: calls ``first`` then ``second``, forwarding the tensor by reference.

    With the parameter ``copy``, it fetches ``first``'s outputs and sends copies of its own.
    """

    async def setup(self):
        self.first = RemoteOperator(self.parameters.get("first", "producer"))
        self.second = RemoteOperator(self.parameters.get("second", "consumer"))

    async def execute(self, requests):
        for request in requests:
            a = await self.first.infer(inputs=request.inputs, parameters=request.parameters)
            assert all(isinstance(v, RemoteTensor) or v.nbytes <= 65536 for v in a.outputs.values())
            outputs = a.outputs
            if request.parameters.get("copy"):  # arrays of its own: this worker places them for `second`
                outputs = {name: np.array(value) for name, value in (await a.fetch()).items()}
            b = await self.second.infer(inputs=outputs)
            await request.response_sender().send(outputs=b.outputs, parameters=b.parameters)


class Producer(Operator):
    """Makes an array of ``n`` float64 values counting from the input scalar."""

    async def execute(self, requests):
        for request in requests:
            inputs = await request.fetch_inputs()
            n = int(request.parameters.get("n", 10))
            start = float(inputs["start"][0]) if "start" in inputs else 0.0
            await request.response_sender().send(outputs={"data": np.arange(start, start + n, dtype=np.float64)})


class Consumer(Operator):
    """Sums its ``data`` input (fetching it from wherever it lives)."""

    async def execute(self, requests):
        for request in requests:
            if "data" not in request.inputs:
                raise InvalidRequestError("Consumer needs 'data'", operator=self.name, request_id=request.request_id)
            data = (await request.fetch_inputs())["data"]
            await asyncio.sleep(float(request.parameters.get("delay", 0)))
            await request.response_sender().send(
                outputs={"sum": np.array([data.sum()])}, parameters={"n": int(data.size)}
            )


class Broken(Operator):
    """Its setup fails, as a misconfigured model would."""

    async def setup(self):
        raise RuntimeError("broken on purpose: model file missing")

    async def execute(self, requests):  # pragma: no cover - never reached
        raise AssertionError("unreachable")


class DiesOnce(Operator):
    """Kills its own worker process on the first request that names a fresh marker file."""

    async def execute(self, requests):
        for request in requests:
            marker = request.parameters.get("marker")
            if marker and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)
            if request.parameters.get("always"):
                os._exit(1)
            await request.response_sender().send(outputs={"pid": np.array([os.getpid()])})


class Echo(Operator):
    """Returns its inputs and its parameters unchanged."""

    async def execute(self, requests):
        for request in requests:
            await request.response_sender().send(outputs=dict(request.inputs), parameters=dict(request.parameters))


class Relay(Operator):
    """Hands its inputs, by reference, to ``sink`` and answers with what ``sink`` answered.

    With the operator parameter ``record_dir``, records each execution there
    (:func:`tests.executions.record`), with the owner of its ``data`` input.
    """

    async def setup(self):
        self.sink = RemoteOperator(self.parameters.get("sink", "sink"))

    async def execute(self, requests):
        directory = self.parameters.get("record_dir")
        for request in requests:
            data = request.inputs.get("data")
            record(directory, "S", request.request_id, getattr(data, "owner", "inline"))
            answer = await self.sink.infer(inputs=dict(request.inputs), parameters=request.parameters)
            record(directory, "E", request.request_id)
            await request.response_sender().send(outputs=answer.outputs, parameters=answer.parameters)


class SlowStart(Operator):
    """Takes ``setup_s`` seconds to start (as a Triton model does), then echoes its pid; a request
    naming a fresh ``marker`` file makes the worker restart itself (as a dead Triton server does)."""

    async def setup(self):
        await asyncio.sleep(float(self.parameters.get("setup_s", 0)))

    async def execute(self, requests):
        for request in requests:
            marker = request.parameters.get("marker")
            if marker and not os.path.exists(marker):
                open(marker, "w").close()
                self.context.restart_worker("asked to by a test")
                continue
            await request.response_sender().send(outputs={"pid": np.array([os.getpid()])})


class CupyProducer(Operator):
    """Makes ``n`` float32 values on the GPU (cupy), counting from 0: a device output."""

    async def execute(self, requests):
        import cupy

        for request in requests:
            n = int(request.parameters.get("n", 10))
            await request.response_sender().send(outputs={"data": cupy.arange(n, dtype=cupy.float32)})


class DeviceSum(Operator):
    """Sums its ``data`` input and says on which device it arrived (``device``: "cpu" or "cuda")."""

    async def execute(self, requests):
        for request in requests:
            data = (await request.fetch_inputs())["data"]
            device = "cuda" if type(data).__module__.startswith("cupy") else "cpu"
            await request.response_sender().send(
                outputs={"sum": np.array([float(data.sum())])}, parameters={"device": device}
            )


class Countdown(Operator):
    """Declares its signature on the class (the gateway shows and checks it): streams ``i`` = n-1 .. 0."""

    inputs = [("n", "INT32", [1])]
    outputs = [{"name": "i", "datatype": "INT32", "shape": [1]}]
    decoupled = True

    async def execute(self, requests):
        for request in requests:
            n = int((await request.fetch_inputs())["n"][0])
            sender = request.response_sender()
            if not 0 <= n <= 1000:
                raise request.error(f"n must be >= 0 and <= 1000, got {n}")
            for i in reversed(range(n)):
                await sender.send(outputs={"i": np.array([i], dtype=np.int32)}, final=i == 0)
            if n <= 0:
                await sender.send(outputs={})


class Where(Operator):
    """Answers with its worker's pid (parameter ``pid``), after ``delay`` seconds."""

    async def execute(self, requests):
        for request in requests:
            await asyncio.sleep(float(request.parameters.get("delay", 0)))
            await request.response_sender().send(outputs={}, parameters={"pid": os.getpid()})
