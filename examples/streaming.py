"""Streaming through an orchestrator: a mock of disaggregated prefill/decode (LLM-style) serving.

    python examples/streaming.py [--prompts 4] [--max-tokens 16]

``generate`` (the orchestrator) sends a prompt to ``prefill``, which builds its "KV cache": a
128 KiB tensor, so it stays on the prefill worker. ``generate`` hands the cache's descriptor to
``decode``, which pulls it straight from the prefill worker and streams tokens back, one response
per token; ``generate`` forwards each token to its own caller as it arrives. The client prints
when the first and the last token came, and checks every token against the same rule computed
here.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from tdask import Deployment, Operator, OperatorConfig, RemoteOperator

VOCAB = 50_000
CACHE = 16_384  # float64: 128 KiB, above tdask.data-plane.inline-threshold (64 KiB)


def kv_cache(prompt: np.ndarray) -> np.ndarray:
    """The mock KV cache of ``prompt`` (deterministic, so the client can check the tokens)."""
    return np.random.default_rng(int(prompt.sum()) % 2**32).standard_normal(CACHE)


def next_token(cache: np.ndarray, token: int) -> int:
    """One decode step of the mock model."""
    return (token * 31 + int(abs(cache[token % CACHE]) * 1000)) % VOCAB


class Prefill(Operator):
    async def execute(self, requests):
        for request in requests:
            prompt = (await request.fetch_inputs())["prompt"]
            await asyncio.sleep(0.001 * len(prompt))  # prefill costs grow with the prompt
            outputs = {"kv_cache": kv_cache(prompt), "last": prompt[-1:]}
            await request.response_sender().send(outputs=outputs, parameters={"by": self.context.worker.name})


class Decode(Operator):
    async def execute(self, requests):
        await asyncio.gather(*(self.serve(request) for request in requests))

    async def serve(self, request):
        inputs = await request.fetch_inputs()  # the cache, pulled from the prefill worker
        cache, token = inputs["kv_cache"], int(inputs["last"][0])
        sender = request.response_sender()
        for _ in range(int(request.parameters.get("max_tokens", 16))):
            await asyncio.sleep(0.005)  # one decode step
            token = next_token(cache, token)
            await sender.send(outputs={"token": np.array([token])}, final=False)
        await sender.send(parameters={"by": self.context.worker.name})


class Generate(Operator):
    async def setup(self):
        self.prefill, self.decode = RemoteOperator("prefill"), RemoteOperator("decode")

    async def execute(self, requests):
        await asyncio.gather(*(self.serve(request) for request in requests))

    async def serve(self, request):
        sender = request.response_sender()
        prefilled = await self.prefill.infer(inputs={"prompt": request.inputs["prompt"]})
        decoder = ""
        # The cache goes on as a descriptor: generate never holds its bytes.
        async for response in self.decode.stream(inputs=prefilled.outputs, parameters=request.parameters):
            if "token" in response.outputs:
                await sender.send(outputs=response.outputs, final=False)
            decoder = response.parameters.get("by", decoder)
        await sender.send(parameters={"path": f"{prefilled.parameters['by']} -> {decoder}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    operators = [
        (OperatorConfig(name="prefill", implementation=Prefill, max_inflight_requests=2), 1),
        (OperatorConfig(name="decode", implementation=Decode, max_inflight_requests=8), 2),
        (OperatorConfig(name="generate", implementation=Generate, max_inflight_requests=8), 1),
    ]
    rng = np.random.default_rng(0)
    with Deployment(operators, dashboard_address=None) as deployment:
        generate = RemoteOperator("generate", client=deployment.client)
        correct = 0
        for i in range(args.prompts):
            prompt = rng.integers(0, VOCAB, 32)
            expected, token, cache = [], int(prompt[-1]), kv_cache(prompt)
            for _ in range(args.max_tokens):
                token = next_token(cache, token)
                expected.append(token)
            tokens, arrivals, path = [], [], ""
            start = time.perf_counter()
            for response in generate.stream(inputs={"prompt": prompt}, parameters={"max_tokens": args.max_tokens}):
                if "token" in response.outputs:
                    tokens.append(int(response.outputs["token"][0]))
                    arrivals.append(time.perf_counter() - start)
                path = response.parameters.get("path", path)
            ok = tokens == expected
            correct += ok
            print(
                f"prompt {i}: {len(tokens)} tokens streamed ({path}), first after {arrivals[0] * 1e3:.1f} ms, "
                f"last after {arrivals[-1] * 1e3:.1f} ms, {'correct' if ok else 'WRONG'}"
            )
    print(f"correct: {correct}/{args.prompts}")


if __name__ == "__main__":
    main()
