"""The operator's client of an in-process Triton (:class:`~tdask.triton.inprocess.InProcessServer`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tdask.triton import capi
from tdask.triton.interface import InferResult, TritonInferError, check_parameters

if TYPE_CHECKING:
    from tdask.triton.inprocess import InProcessServer

__all__ = ["InProcessClient"]


class InProcessClient:
    """The operator's calls on an :class:`InProcessServer`, unary and streamed.

    An :class:`~tdask.triton.interface.InferClient` and a :class:`~tdask.triton.interface.StreamClient`:
    ``infer`` raises :class:`~tdask.triton.interface.TritonInferError` with the ``status`` Triton's
    HTTP endpoint gives the same error, ``TimeoutError`` past ``timeout``, and
    :class:`~tdask.triton.interface.ReservedParameterError`; ``stream`` raises
    :class:`~tdask.triton.interface.TritonInferError` with the gRPC ``code`` of the same error.
    """

    def __init__(self, server: InProcessServer) -> None:
        self.server = server

    async def model_metadata(self, model: str) -> dict[str, Any]:
        """The model's metadata (inputs, outputs, versions)."""
        return self.server.model_metadata(model)

    async def close(self) -> None:
        """Nothing to close."""

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        *,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """Run one inference (see :meth:`InferClient.infer <tdask.triton.interface.InferClient.infer>`)."""
        if parameters:
            check_parameters(parameters)
        server = self.server
        try:
            entry = server.submit(model, inputs, model_version, request_id, parameters, decoupled=False)
        except capi.TritonCError as exc:
            raise TritonInferError(exc.message, status=exc.http_status) from None
        future = entry.future
        assert future is not None
        if timeout is not None:
            entry.timer = future.get_loop().call_later(timeout, _expire, future)
        try:
            return await future
        except capi.TritonCError as exc:
            raise TritonInferError(exc.message, status=exc.http_status) from None
        except BaseException:  # cancelled, or TimeoutError: Triton may stop the model early
            server.cancel(entry)
            raise
        finally:
            if entry.timer is not None:
                entry.timer.cancel()

    async def stream(
        self,
        model: str,
        inputs: Mapping[str, tuple[np.ndarray, str]],
        *,
        model_version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str | bool | int | float] | None = None,
        timeout: float | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> AsyncGenerator[InferResult, None]:
        """Every response of a decoupled model's request, in order, the last one final.

        Setting ``cancelled`` cancels the request in Triton and ends the iteration.
        """
        server = self.server
        try:
            entry = server.submit(model, inputs, model_version, request_id, parameters, decoupled=True)
        except capi.TritonCError as exc:
            raise TritonInferError(exc.message, code=exc.grpc_code) from None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        watcher = None
        try:
            if cancelled is not None:
                watcher = asyncio.ensure_future(cancelled.wait())
            while True:
                while not entry.responses:
                    entry.waiter = loop.create_future()
                    waits: set[asyncio.Future[Any]] = {entry.waiter}
                    if watcher is not None:
                        waits.add(watcher)
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        raise TritonInferError("the request's deadline passed", code="DEADLINE_EXCEEDED")
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                    if watcher is not None and watcher.done():
                        return
                result, final = entry.responses.popleft()
                if isinstance(result, capi.TritonCError):
                    raise TritonInferError(result.message, code=result.grpc_code)
                if result is not None:
                    result.final = final
                    yield result
                elif final:  # the final flag alone (as gRPC's empty final response)
                    yield InferResult({}, {}, {})
                if final:
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            if not entry.final:
                server.cancel(entry)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
