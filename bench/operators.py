"""Python operators of the data-plane section (hosted on real workers, imported there as
``bench.operators``).

``forward`` calls ``producer`` (which keeps a large array in its worker's store) and passes the
descriptor on to ``consumer`` (on another worker), which times the fetch of the bytes from the
producer's worker and reports it; ``forward`` itself never touches the bytes. With
``parameters={"device": "cuda"}`` the array is a cupy array on the producer's GPU
(``bench/gpu_check.py``: device to device over UCX).

``RecordingEncoderDecoder`` is the hello world's ``encoder_decoder`` of ``python -m bench.soak``,
recording each execution per request id in a file per worker process.
"""

from __future__ import annotations

import os
import time

import numpy as np

from tdask import Operator, RemoteOperator, RemoteTensor
from tdask.hello_world.operators import EncoderDecoder


class Producer(Operator):
    """Returns ``nbytes`` bytes (uint8), kept in this worker's store; built once per size."""

    async def setup(self) -> None:
        self.cache: dict[tuple[int, str], np.ndarray] = {}

    async def execute(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            nbytes = int(request.parameters["nbytes"])
            device = request.parameters.get("device", "cpu")
            data = self.cache.get((nbytes, device))
            if data is None:
                self.cache.clear()  # keep one size at a time: 256 MB is enough to hold
                xp = np
                if device == "cuda":
                    import cupy as xp
                data = self.cache[(nbytes, device)] = xp.arange(nbytes // 8, dtype=xp.uint64).view(xp.uint8)
            await request.response_sender().send(outputs={"data": data})


class Consumer(Operator):
    """Fetches ``data`` from its owner and reports how long that took (``fetch_s``)."""

    async def execute(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            ref = request.inputs["data"]
            remote = isinstance(ref, RemoteTensor)
            began = time.perf_counter()
            data = (await request.fetch_inputs())["data"]
            device = type(data).__module__.split(".")[0] == "cupy"
            if device:
                data.device.synchronize()  # the bytes are there, not only enqueued
            fetch_s = time.perf_counter() - began
            n = int(data.nbytes)
            # Spot-check the bytes (first and last 8) against what Producer makes.
            ok = n == int(request.parameters["nbytes"]) and _spot_ok(data)
            await request.response_sender().send(
                outputs={"ok": np.array([ok])},
                parameters={
                    "fetch_s": fetch_s,
                    "nbytes": n,
                    "remote": remote,
                    "owner": getattr(ref, "owner", ""),
                    "on_device": device,
                },
            )


def _spot_ok(data: np.ndarray) -> bool:
    if type(data).__module__.split(".")[0] == "cupy":  # only the first and last word come to the host
        first, last = data[:8].get().view(np.uint64), data[-8:].get().view(np.uint64)
        return int(first[0]) == 0 and int(last[0]) == data.size // 8 - 1
    words = data.view(np.uint64)
    return int(words[0]) == 0 and int(words[-1]) == words.size - 1


class Forward(Operator):
    """The orchestrator: producer's output goes to the consumer as a reference."""

    async def setup(self) -> None:
        self.producer = RemoteOperator("producer")
        self.consumer = RemoteOperator("consumer")

    async def execute(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            made = await self.producer.infer(parameters=request.parameters)
            forwarded = made.outputs["data"]
            used = await self.consumer.infer(inputs={"data": forwarded}, parameters=request.parameters)
            await request.response_sender().send(
                outputs=used.outputs,
                parameters={
                    **used.parameters,
                    "forwarded_descriptor": isinstance(forwarded, RemoteTensor),
                    "consumer": used.worker or "",
                    "producer": made.worker or "",
                },
            )


class Echo(Operator):
    """Answers each request with its own inputs (the cheapest possible tdask hop)."""

    async def execute(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            await request.response_sender().send(outputs=dict(request.inputs))


def echo_handler(x: object = None) -> dict[str, object]:
    """A bare Dask comm handler (installed on a worker by the ``floor`` section): one RPC round
    trip with the same payload, no request plane: what a direct worker-to-worker hop would cost."""
    from distributed.protocol import to_serialize

    return {"x": to_serialize(x)}


def install_echo_handler(dask_worker: object) -> None:
    dask_worker.handlers["bench_echo"] = echo_handler  # type: ignore[attr-defined]


def record(directory: str | None, event: str, request_id: str) -> None:
    """Append ``<event> <request_id> <time.time()>`` to ``<directory>/<pid>.log`` with one write.

    A line written is in the file even if the process is SIGKILLed the next instant (the soak's
    count of executions per request survives the workers it kills).
    """
    if not directory:
        return
    fd = os.open(os.path.join(directory, f"{os.getpid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {request_id} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


class RecordingEncoderDecoder(EncoderDecoder):
    """The hello world's ``encoder_decoder`` (``python -m bench.soak``), recording each execution
    in the operator parameter ``record_dir``: ``S <id>`` when it starts one, ``E <id>`` just
    before it sends a request's (non-error) answer."""

    async def _serve(self, request):  # type: ignore[no-untyped-def]
        directory = self.parameters.get("record_dir")
        record(directory, "S", request.request_id)
        sender = request.response_sender()
        send = sender.send

        async def recorded(outputs=None, parameters=None, error=None, final=True):  # type: ignore[no-untyped-def]
            if error is None and final:
                record(directory, "E", request.request_id)
            await send(outputs, parameters, error, final)

        sender.send = recorded  # type: ignore[method-assign]
        await super()._serve(request)
