"""The Triton baseline: one real tritonserver with encoder, decoder and their ensemble.

The encoder and decoder come from ``models/`` and the ensemble from ``bench/models``; they
are copied into one temporary model repository (no symlinks) that the server serves. Models are
loaded with the same config override the hello world's ``TritonCoreOperator`` gets, so both
sides run the same model code with the same instance count.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT

TDASK_MODELS = Path(ROOT) / "models"
BENCH_MODELS = Path(ROOT) / "bench" / "models"
ENSEMBLE = "encoder_decoder_ensemble"
# gRPC would route 127.0.0.1 through $http_proxy/$grpc_proxy unless told not to.
CHANNEL_ARGS = [("grpc.enable_http_proxy", 0)]


def assemble_repository(dest: Path) -> Path:
    """Copy encoder, decoder and the ensemble into ``dest`` (a fresh model repository)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("encoder", "decoder"):
        shutil.copytree(TDASK_MODELS / name, dest / name, ignore=ignore)
    shutil.copytree(BENCH_MODELS / ENSEMBLE, dest / ENSEMBLE, ignore=ignore)
    (dest / ENSEMBLE / "1").mkdir(exist_ok=True)
    return dest


def model_overrides(instances: int = 1) -> dict[str, dict[str, Any]]:
    """The config overrides of the hello world's encoder and decoder (default flags)."""
    from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators

    group = TritonGroup(workers=1, max_inflight=1, instances=instances, kind="CPU")
    ops = hello_world_operators(encoders=group, decoders=group, encoder_decoders=PythonGroup(workers=1, max_inflight=1))
    return {config.name: config.parameters["config"] for config, _ in ops if config.is_triton}


# This process's environment as it started. A Dask Nanny writes its pre-spawn environment
# (MALLOC_TRIM_THRESHOLD_ and the like) into the environment of the process that runs it, so an
# ensemble server started after a round's deployment would inherit the workers' malloc settings.
_ENVIRON_AT_START = dict(os.environ)
_PRE_SPAWN_KEYS = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


def _restore_environ() -> None:
    """Undo what earlier rounds' nannies wrote into this process's environment."""
    for key in _PRE_SPAWN_KEYS:
        if key in _ENVIRON_AT_START:
            os.environ[key] = _ENVIRON_AT_START[key]
        else:
            os.environ.pop(key, None)


@contextlib.asynccontextmanager
async def ensemble_server(log_dir: str | None = None, instances: int = 1) -> AsyncIterator[Any]:
    """A running TritonServer with encoder, decoder and the ensemble loaded (every round alike:
    the server starts with this process's environment as it was before any deployment)."""
    from tdask.triton.server import TritonServer

    _restore_environ()
    with tempfile.TemporaryDirectory(prefix="tdask-bench-repo-") as tmp:
        repo = assemble_repository(Path(tmp))
        server = TritonServer(model_repository=repo, log_dir=log_dir, name="bench-ensemble")
        await server.start()
        try:
            for name, override in model_overrides(instances).items():
                await server.load_model(name, config=override)
            await server.load_model(ENSEMBLE)
            yield server
        finally:
            await server.stop()


async def server_version(grpc_url: str) -> str | None:
    import tritonclient.grpc.aio as aio

    async with aio.InferenceServerClient(grpc_url, channel_args=CHANNEL_ARGS) as client:
        meta = await client.get_server_metadata(as_json=True)
    return meta.get("version")


class TritonCaller:
    """``tritonclient.grpc.aio`` calls of one model, checking each answer."""

    def __init__(self, client: Any, model: str, data: list[np.ndarray]) -> None:
        import tritonclient.grpc.aio as aio

        self.aio = aio
        self.client = client
        self.model = model
        self.data = data

    async def pipeline(self, i: int) -> bool:
        """One ensemble request: output must equal input."""
        x = self.data[i % len(self.data)]
        tensor = self.aio.InferInput("input", list(x.shape), "INT64")
        tensor.set_data_from_numpy(x)
        result = await self.client.infer(self.model, [tensor], outputs=[self.aio.InferRequestedOutput("output")])
        return bool(np.array_equal(result.as_numpy("output"), x))

    async def encoder(self, i: int) -> bool:
        """One encoder request: output must be the inverted input (copies = 1)."""
        x = self.data[i % len(self.data)]
        tensor = self.aio.InferInput("input", list(x.shape), "INT64")
        tensor.set_data_from_numpy(x)
        result = await self.client.infer(self.model, [tensor])
        return bool(np.array_equal(result.as_numpy("output"), np.invert(x)))
