"""The hello world's orchestrator: ``encoder_decoder`` calls ``encoder`` then ``decoder``."""

from __future__ import annotations

import asyncio
import uuid

from tdask.exceptions import TdaskError
from tdask.operator import Operator, Request
from tdask.remote import RemoteOperator


class EncoderDecoder(Operator):
    """Sends the input to ``encoder``, then the encoder's outputs to ``decoder``, by reference.

    The encoder's ``output`` reaches this worker as a descriptor when it is large and is passed
    on untouched, so its bytes go from the encoder's worker straight to the decoder's. The calls
    it makes carry ids that start with its own request's id (``<id>:encoder:<unique>``), so one
    id can be followed through every log of the pipeline.
    """

    # Its signature, shown by the gateway as this model's metadata.
    inputs = [("input", "INT64", [-1])]
    outputs = [("output", "INT64", [-1])]

    async def setup(self) -> None:
        """Handles to the encoder and decoder (names from ``parameters``)."""
        self.encoder = RemoteOperator(self.parameters.get("encoder", "encoder"))
        self.decoder = RemoteOperator(self.parameters.get("decoder", "decoder"))

    async def execute(self, requests: list[Request]) -> None:
        """Serve each request: encoder, then decoder by reference."""
        if len(requests) == 1:  # no extra task for the common case
            await self._serve(requests[0])
        else:
            await asyncio.gather(*(self._serve(request) for request in requests))

    async def _serve(self, request: Request) -> None:
        sender = request.response_sender()
        if "input" not in request.inputs:
            await sender.send(error=request.error(f"missing input 'input' (got {sorted(request.inputs)})"))
            return
        unique = uuid.uuid4().hex[:8]  # ids are per caller: this worker calls for many requests at once
        try:
            encoded = await self.encoder.infer(
                inputs={"input": request.inputs["input"]},
                parameters=request.parameters,
                request_id=f"{request.request_id}:encoder:{unique}",
            )
            decoded = await self.decoder.infer(
                inputs={"input": encoded.outputs["output"], "input_copies": encoded.outputs["input_copies"]},
                parameters=request.parameters,
                request_id=f"{request.request_id}:decoder:{unique}",
            )
        except TdaskError as exc:
            await sender.send(error=exc)
            return
        await sender.send(
            outputs={"output": decoded.outputs["output"]},
            parameters={"encoder": encoded.worker or "", "decoder": decoded.worker or ""},
        )
