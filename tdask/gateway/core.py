"""The gateway: one tdask client, the model table, and its two frontends (HTTP and gRPC).

How KServe requests map onto tdask requests is :mod:`tdask.gateway.kserve`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from distributed import Client
from distributed.comm import parse_address
from distributed.comm.registry import get_backend

from tdask.control import model_control
from tdask.exceptions import InvalidRequestError, OperatorUnavailableError
from tdask.gateway.grpc import GrpcFrontend
from tdask.gateway.http import HttpFrontend
from tdask.gateway.kserve import (
    UnknownModelError,
    UnsupportedError,
    datatype_of,
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
    split_parameters,
)
from tdask.gateway.limits import FrontDoor, Limits
from tdask.gateway.metrics import GatewayMetrics
from tdask.protocol import operator_key
from tdask.protocol.signature import check_inputs
from tdask.remote import RemoteOperator, Response
from tdask.request_plane import Registry

logger = logging.getLogger(__name__)

__all__ = ["Gateway"]

# How long a load or unload waits for the workers' reports to show it.
_CONTROL_SEEN_S = 10.0
# How long the gateway trusts the signatures the registry gave it (as callers trust hosts).
_SIGNATURES_TTL_S = 1.0


def _number(version: str | int | None) -> int | None:
    try:
        return int(version) if version else None
    except ValueError:
        return None


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
    limits
        Request sizes, timeouts and connections the frontends accept (:class:`~tdask.gateway.limits.Limits`).
    front_door
        TLS and bearer token of both frontends (:class:`~tdask.gateway.limits.FrontDoor`); in front
        of a ``tls://`` scheduler, plain text is refused (``ValueError`` from :meth:`start`) unless
        it says ``insecure=True``.

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
        limits: Limits | None = None,
        front_door: FrontDoor | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.connect_timeout = connect_timeout
        self.limits = limits or Limits()
        self.front_door = front_door or FrontDoor()
        self.client: Client | None = None
        self._registry: Registry | None = None
        self._operators: dict[str, RemoteOperator] = {}
        # Each hosted operator's signature, as the registry said at most _SIGNATURES_TTL_S ago.
        self._signatures: tuple[float, dict[str, Any]] = (-1e9, {})
        #: The gateway's own Prometheus metrics (``GET /metrics``).
        self.metrics = GatewayMetrics(lambda name, version: operator_key(name, _number(version)) in self._operators)
        self._http: HttpFrontend | None = None
        self._grpc: GrpcFrontend | None = None
        self._closed = False

    async def start(self) -> Gateway:
        """Connect to the scheduler and start serving; on failure close what started and raise."""
        get_backend(parse_address(self.scheduler_address)[0])  # a wrong protocol: ValueError, before a Client
        door = self.front_door
        if parse_address(self.scheduler_address)[0] == "tls" and not door.tls and not door.insecure:
            raise ValueError(
                f"the cluster at {self.scheduler_address} speaks TLS: the gateway serves TLS too (tls_cert and "
                "tls_key, --tls-cert/--tls-key) or is told to serve plain text (insecure, --insecure)"
            )
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

    async def not_ready(self) -> str | None:
        """Why the gateway is not ready (the scheduler unreachable, no operator hosted), or ``None``."""
        if self.client is None or self.client.status != "running":
            return "the scheduler cannot be reached"
        try:
            models = await asyncio.wait_for(self.models(), 10)
        except Exception as exc:
            return f"the scheduler cannot be reached ({type(exc).__name__}: {exc})"
        return None if models else "no worker hosts an operator"

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

    # -- what the registry knows of the models ----------------------------------------------

    async def signature(self, name: str, version: str | int | None) -> dict[str, Any] | None:
        """The signature operator ``name`` published (``None``: undeclared); at most a second old."""
        assert self._registry is not None
        read_at, table = self._signatures
        now = time.monotonic()
        key = operator_key(name, _number(version))
        if now - read_at > _SIGNATURES_TTL_S or key not in table:
            table = await self._registry.signatures()
            self._signatures = (now, table)
        signature: dict[str, Any] | None = table.get(key)
        return signature

    async def model_ready(self, name: str, version: str | None) -> bool:
        """KServe's model readiness: some worker hosts it, and its model is not unloaded on all of them."""
        if not await self.is_ready(name, version):
            return False
        key = operator_key(name, _number(version))
        entry = next((e for e in await self.repository_index() if f"{e['name']}/{e['version']}" == key), None)
        return entry is None or entry["state"] == "READY"

    async def _hosted(self, name: str, version: str | int | None) -> None:
        if not await self.is_ready(name, version):
            raise UnknownModelError(f"unknown model {name!r} (no worker hosts it)", operator=name)

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """KServe model metadata of operator ``name`` (its signature's tensors); :class:`UnknownModelError`."""
        await self._hosted(name, version)
        versions = [str(v) for n, v in await self.models() if n == name]
        return model_metadata(name, versions, await self.signature(name, version))

    async def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model config (JSON form) of operator ``name``; :class:`UnknownModelError`."""
        await self._hosted(name, version)
        return model_config(name, await self.signature(name, version))

    async def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton's statistics of operator ``name`` (every version, or ``version``), or of all (``name=None``).

        From the serving counters the workers report (every ``tdask.worker.report-interval``).
        """
        assert self._registry is not None
        table = await self._registry.operators()
        keys = sorted(table.get("hosts", {}))
        if name:
            number = _number(version)
            keys = [
                k for k in keys if k.rpartition("/")[0] == name and (number is None or k == operator_key(name, number))
            ]
            if not keys:
                raise UnknownModelError(f"unknown model {name!r} (no worker hosts it)", operator=name)
        workers = table.get("workers") or {}
        return [model_statistics(key, [w[key] for w in workers.values() if key in w]) for key in keys]

    async def repository_index(self, *, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's repository index: every operator some worker hosts (``READY``), and those that failed."""
        assert self._registry is not None
        return repository_index(await self._registry.operators(), ready_only=ready_only)

    async def load_model(self, name: str) -> None:
        """Load (or reload) the Triton model of operator ``name`` on every worker hosting it.

        Through :func:`tdask.control.model_control`. :class:`UnknownModelError` when nobody hosts
        it, :class:`UnsupportedError` for an operator that is no Triton model.
        """
        await self._model_control(name, "load")

    async def unload_model(self, name: str) -> None:
        """Unload the Triton model of operator ``name`` on every worker hosting it (see :meth:`load_model`).

        Its requests are answered ``UNAVAILABLE`` until it is loaded again.
        """
        await self._model_control(name, "unload")

    async def _model_control(self, name: str, action: str) -> None:
        versions = [v for n, v in await self.models() if n == name]
        if not versions:
            raise UnknownModelError(f"unknown model {name!r} (no worker hosts it)", operator=name)
        signatures = [await self.signature(name, v) for v in versions]
        if any(s is None or s.get("platform") == "tdask" for s in signatures):
            raise UnsupportedError(
                f"operator {name!r} is not a Triton model: model control ({action}) is supported for Triton "
                "models only; the tdask deployment decides which operators its workers host",
                operator=name,
            )
        try:
            answer = await model_control(self.client, name, action)
        except OperatorUnavailableError as exc:
            raise UnknownModelError(str(exc.message), operator=name) from None
        # Answer once the registry shows it too (workers report every tdask.worker.report-interval),
        # so that readiness and the index asked next agree with what was just done.
        assert self._registry is not None
        wanted = {(w, k): state for w, states in answer["workers"].items() for k, state in states.items()}
        deadline = time.monotonic() + _CONTROL_SEEN_S
        while time.monotonic() < deadline:
            reports = (await self._registry.operators()).get("workers") or {}
            if all((reports.get(w) or {}).get(k, {}).get("state") == s for (w, k), s in wanted.items()):
                return
            await asyncio.sleep(0.05)
        logger.warning("model %s of %s: the registry did not show it within %.0fs", action, name, _CONTROL_SEEN_S)

    async def check_inputs(self, name: str, version: str | None, inputs: Mapping[str, np.ndarray]) -> None:
        """Refuse inputs that do not fit operator ``name``'s signature (:class:`InvalidRequestError`), here."""
        signature = await self.signature(name, version)
        if signature is None:
            return
        problem = check_inputs(signature, name, {k: (datatype_of(v), v.shape) for k, v in inputs.items()})
        if problem is not None:
            raise InvalidRequestError(problem, operator=name)

    async def infer(
        self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> Response:
        """One request to operator ``name``; its (last) response with outputs fetched."""
        op = await self.operator(name, version)
        await self.check_inputs(name, version, inputs)
        forwarded, timeout = split_parameters(parameters)
        result: Response = await op.infer(inputs=inputs, parameters=forwarded, timeout=timeout, fetch=True)
        return result

    async def stream(
        self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> AsyncIterator[Response]:
        """Every response of one request to operator ``name``, in order; closing it cancels the request."""
        op = await self.operator(name, version)
        await self.check_inputs(name, version, inputs)
        forwarded, timeout = split_parameters(parameters)
        call = op.stream(inputs=inputs, parameters=forwarded, timeout=timeout, fetch=True)
        async with call:
            async for response in call:
                yield response
