"""The gateway: one tdask client, the model table, and its two frontends (HTTP and gRPC).

How KServe requests map onto tdask requests is :mod:`tdask.gateway.kserve`'s business.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from distributed import Client
from distributed.comm import parse_address
from distributed.comm.registry import get_backend

from tdask.gateway.grpc import GrpcFrontend
from tdask.gateway.http import HttpFrontend
from tdask.gateway.kserve import UnknownModelError, split_parameters
from tdask.protocol import operator_key
from tdask.remote import RemoteOperator, Response
from tdask.request_plane import Registry

logger = logging.getLogger(__name__)

__all__ = ["Gateway"]


class Gateway:
    """A KServe v2 HTTP and gRPC front door to the operators of one tdask deployment.

    Parameters
    ----------
    scheduler_address
        The deployment's Dask scheduler.
    host
        The interface both servers bind (``127.0.0.1`` unless told otherwise).
    http_port, grpc_port
        Ports to bind (0: any free port; ``None``: do not serve that protocol).
    connect_timeout
        Seconds to wait for the scheduler before :meth:`start` fails.

    Use ``async with Gateway(...) as gateway`` (or :meth:`start` and :meth:`close`);
    ``gateway.http_port`` and ``gateway.grpc_port`` are the ports bound.
    """

    def __init__(
        self,
        scheduler_address: str,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = 8000,
        grpc_port: int | None = 8001,
        connect_timeout: float = 10.0,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.connect_timeout = connect_timeout
        self.client: Client | None = None
        self._registry: Registry | None = None
        self._operators: dict[str, RemoteOperator] = {}
        self._http: HttpFrontend | None = None
        self._grpc: GrpcFrontend | None = None
        self._closed = False

    async def start(self) -> Gateway:
        """Connect to the scheduler and start serving; on failure close what started and raise."""
        get_backend(parse_address(self.scheduler_address)[0])  # a wrong protocol: ValueError, before a Client
        try:
            self.client = await Client(self.scheduler_address, asynchronous=True, timeout=self.connect_timeout)
            self._registry = Registry(self.client.scheduler)
            if self.http_port is not None:
                self._http = HttpFrontend(self)
                self.http_port = self._http.listen(self.host, self.http_port)
            if self.grpc_port is not None:
                self._grpc = GrpcFrontend(self)
                self.grpc_port = await self._grpc.start(self.host, self.grpc_port)
        except BaseException:
            await self.close()
            raise
        logger.info("tdask gateway on %s: HTTP %s, gRPC %s", self.host, self.http_port, self.grpc_port)
        return self

    async def close(self) -> None:
        """Stop both servers (in-flight requests are cancelled) and close the client; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._grpc is not None:
            await self._grpc.stop()
        if self._http is not None:
            self._http.stop()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()

    async def __aenter__(self) -> Gateway:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- the model table --------------------------------------------------------------------

    async def models(self) -> list[tuple[str, int]]:
        """``(name, version)`` of every operator some worker hosts now."""
        assert self._registry is not None
        table = await self._registry.operators()
        out = []
        for key in table.get("hosts", {}):
            name, _, version = key.rpartition("/")
            out.append((name, int(version)))
        return sorted(out)

    async def is_ready(self, name: str, version: str | int | None) -> bool:
        """True when some worker hosts operator ``name`` at ``version``."""
        assert self._registry is not None
        try:
            key = operator_key(name, int(version) if version else None)
        except ValueError:
            return False
        return bool(await self._registry.hosts(key))

    async def operator(self, name: str, version: str | int | None) -> RemoteOperator:
        """The handle to call for model ``name``/``version``; :class:`UnknownModelError` if nobody hosts it."""
        try:
            number = int(version) if version else 1
        except ValueError:
            raise UnknownModelError(f"model {name!r} has no version {version!r}", operator=name) from None
        key = operator_key(name, number)
        if not await self.is_ready(name, number):
            raise UnknownModelError(f"no worker hosts operator {key} (unknown model {name!r})", operator=name)
        op = self._operators.get(key)
        if op is None:
            op = self._operators[key] = RemoteOperator(name, version=number, client=self.client)
        return op

    async def infer(
        self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> Response:
        """One request to operator ``name``; its (last) response with outputs fetched."""
        op = await self.operator(name, version)
        forwarded, timeout = split_parameters(parameters)
        result: Response = await op.infer(inputs=inputs, parameters=forwarded, timeout=timeout, fetch=True)
        return result

    async def stream(
        self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> AsyncIterator[Response]:
        """Every response of one request to operator ``name``, in order; closing it cancels the request."""
        op = await self.operator(name, version)
        forwarded, timeout = split_parameters(parameters)
        call = op.stream(inputs=inputs, parameters=forwarded, timeout=timeout, fetch=True)
        async with call:
            async for response in call:
                yield response
