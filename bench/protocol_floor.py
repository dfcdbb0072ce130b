"""The gateway's protocols with nothing behind them: ``python -m bench.protocol_floor``.

A KServe v2 server that echoes each ``/infer`` request's first input back as the output
``output``, over HTTP (tdask's own :class:`~tdask.gateway.http_server.HttpServer`, the
gateway's) and gRPC (grpc.aio, Triton's ``GRPCInferenceService``, as the gateway). No tdask call,
no checks, no metrics. ``bench.gateway`` calls it each round with the same client libraries as
the gateway: the latency and CPU a Python gateway on these libraries pays before it does any
work of its own, the part of the gateway's added p50 that no handler can remove.

Prints ``HTTP 127.0.0.1:<port>, gRPC 127.0.0.1:<port>`` once listening; stops at SIGTERM or
when its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tdask.gateway.http_server import Answer, Handler, HttpServer, Request, json_answer
from tdask.gateway.limits import Limits


class _Echo(Handler):
    """``POST /v2/models/<name>/infer`` with binary tensors: the first input back, as ``output``."""

    async def respond(self) -> None:
        body = self.body()
        header_size = int(self.request.headers.get("inference-header-content-length", len(body)))
        header = json.loads(body[:header_size])
        first = header["inputs"][0]
        data = body[header_size:]
        reply = json.dumps(
            {
                "model_name": self.request.path.split("/")[3],
                "outputs": [
                    {
                        "name": "output",
                        "datatype": first["datatype"],
                        "shape": first["shape"],
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
            }
        ).encode()
        self.request.send(
            200,
            [reply, data],
            "application/octet-stream",
            [("Inference-Header-Content-Length", str(len(reply)))],
        )


def _route(request: Request) -> Handler | Answer:
    if request.method == "POST" and request.path.startswith("/v2/models/") and request.path.endswith("/infer"):
        return _Echo(request, Limits().max_request_bytes)
    return json_answer(404, {"error": f"not here: {request.method} {request.path}"})


class _GrpcEcho(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 - KServe's name
        reply = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        first = request.inputs[0]
        output = reply.outputs.add()
        output.name = "output"
        output.datatype = first.datatype
        output.shape.extend(first.shape)
        reply.raw_output_contents.append(request.raw_input_contents[0])
        return reply


async def serve() -> None:
    """Both servers on 127.0.0.1, until SIGTERM or the end of standard input."""
    loop = asyncio.get_running_loop()
    http = HttpServer(_route, Limits())
    http_port = http.listen("127.0.0.1", 0)
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_GrpcEcho(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"HTTP 127.0.0.1:{http_port}, gRPC 127.0.0.1:{grpc_port}", flush=True)  # noqa: T201
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def watch_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()
    http.stop()
    await server.stop(None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.protocol_floor", description=__doc__.splitlines()[0])
    p.add_argument("--event-loop", default="asyncio", choices=["asyncio", "uvloop"])
    args = p.parse_args(argv)
    if args.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
