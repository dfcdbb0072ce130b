"""Operators: the long-lived units of work that workers host.

An operator is constructed once per worker and lives as long as the worker. The worker plugin
(:mod:`tdask.worker`) hands it batches of :class:`Request` objects; it answers each through the
request's :class:`ResponseSender`: any number of responses, exactly one of them final.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import importlib.util
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tdask.exceptions import InvalidRequestError
from tdask.protocol import operator_key
from tdask.protocol.signature import make_signature

if TYPE_CHECKING:
    from distributed import Worker

    from tdask.data_plane import RemoteTensor, TensorStore

__all__ = ["Operator", "OperatorConfig", "OperatorContext", "Request", "ResponseSender"]

TRITON = "triton"
#: The class ``implementation="triton"`` stands for, imported by name on the worker: operators know no Triton.
TRITON_IMPLEMENTATION = "tdask.triton.operator:TritonCoreOperator"


@dataclass(kw_only=True)
class OperatorConfig:
    """What to host: an operator's name, implementation and limits.

    Parameters
    ----------
    name
        The name callers use (``RemoteOperator(name)``); also the Triton model's name.
    implementation
        An :class:`Operator` subclass, ``"module:Class"`` (resolved against ``repository`` first,
        then ``sys.path``), or ``"triton"`` for a model of the Triton ``repository``.
    repository
        Directory of operator modules, or the Triton model repository.
    version
        Callers may ask for a version; requests for another version are not served here.
    max_inflight_requests
        At most this many requests of this operator in progress per worker.
    parameters
        Passed to the operator's constructor; for Triton, ``{"config": {...}}`` overrides the
        model configuration at load (``instance_group``, ``parameters``).
    log_level
        Level of the operator's logger (``tdask.operator.<name>``).
    routing
        How callers pick among the operator's workers (see ``docs/design.md``, Routing):
        ``"least-loaded"`` (the default: the host with the fewest of the caller's requests in
        flight), ``"pinned"`` (the first of the sorted hosts; the next one when it is gone), or
        ``"hash:<parameter>"`` / ``{"policy": "hash", "parameter": "<parameter>"}`` (requests with
        the same value of that request parameter go to the same worker, by rendezvous hashing
        over the hosts; requests without it go least-loaded). Normalized to a dict.
    inputs, outputs
        The operator's signature, when its class does not declare one (or to replace it):
        ``[("name", "DATATYPE", [dims]), ...]`` or mappings, as :attr:`Operator.inputs`.
    execution_timeout_s
        How long one ``execute`` may run, in seconds (``None``: the worker's
        ``tdask.operator.execution-timeout``, 60 s by default). A request still unanswered then
        gets :class:`~tdask.exceptions.ExecutionTimeoutError` at once, and the operator is
        recovered (:meth:`Operator.on_execution_timeout`: a Triton model's worker restarts).
    """

    name: str
    implementation: type[Operator] | str
    repository: str | None = None
    version: int = 1
    max_inflight_requests: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)
    log_level: int | str | None = None
    routing: str | dict[str, Any] | None = None
    inputs: list[Any] | None = None
    outputs: list[Any] | None = None
    execution_timeout_s: float | None = None

    def __post_init__(self) -> None:
        self.routing = routing_policy(self.routing, self.name)
        timeout = self.execution_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(
                f"operator {self.name!r}: execution_timeout_s must be a number of seconds > 0, got {timeout!r}"
            )
        if self.inputs is not None or self.outputs is not None:
            make_signature(self.inputs or [], self.outputs or [], where=f"operator {self.name!r}")
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"operator name must be a non-empty string without '/': {self.name!r}")
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise ValueError(f"operator {self.name!r}: version must be an int >= 1, got {self.version!r}")
        if (
            not isinstance(self.max_inflight_requests, int)
            or isinstance(self.max_inflight_requests, bool)
            or self.max_inflight_requests < 1
        ):
            raise ValueError(
                f"operator {self.name!r}: max_inflight_requests must be an int >= 1, got {self.max_inflight_requests!r}"
            )
        if not isinstance(self.parameters, Mapping):
            raise ValueError(f"operator {self.name!r}: parameters must be a mapping")
        impl = self.implementation
        if isinstance(impl, str):
            if impl != TRITON and ":" not in impl:
                raise ValueError(
                    f"operator {self.name!r}: implementation must be a class, 'module:Class' or 'triton', got {impl!r}"
                )
        elif not (isinstance(impl, type) and issubclass(impl, Operator)):
            raise ValueError(f"operator {self.name!r}: implementation {impl!r} is not an Operator subclass")
        if impl == TRITON and not self.repository:
            raise ValueError(f"operator {self.name!r}: a Triton operator needs a model repository")
        if self.repository is not None:
            self.repository = str(self.repository)
        if isinstance(self.log_level, str):
            level = logging.getLevelName(self.log_level.upper())
            if not isinstance(level, int):
                raise ValueError(f"operator {self.name!r}: unknown log level {self.log_level!r}")

    @property
    def key(self) -> str:
        """The request-queue name of this operator: ``name/version``."""
        return operator_key(self.name, self.version)

    def declared_signature(self) -> dict[str, Any] | None:
        """The signature :attr:`inputs` and :attr:`outputs` declare, or ``None`` when neither is given."""
        if self.inputs is None and self.outputs is None:
            return None
        return make_signature(self.inputs or [], self.outputs or [], where=f"operator {self.name!r}")

    @property
    def is_triton(self) -> bool:
        """Whether this operator is a model of a Triton repository."""
        return self.implementation == TRITON

    def resolve(self) -> type[Operator]:
        """Import the implementation class (on the worker, where it runs)."""
        impl = self.implementation
        if not isinstance(impl, str):
            return impl
        repository = self.repository
        if impl == TRITON:
            # The repository holds Triton models, not operator modules.
            impl, repository = TRITON_IMPLEMENTATION, None
        module_name, _, class_name = impl.partition(":")
        module = _import_from(module_name, repository)
        try:
            cls = getattr(module, class_name)
        except AttributeError:
            raise ImportError(f"operator {self.name!r}: {module_name!r} has no {class_name!r}") from None
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise TypeError(f"operator {self.name!r}: {impl!r} is not an Operator subclass")
        return cls


#: The routing policies an operator may declare (``OperatorConfig.routing``).
ROUTING_POLICIES = ("least-loaded", "pinned", "hash")


def routing_policy(value: str | Mapping[str, Any] | None, operator: str) -> dict[str, Any]:
    """``OperatorConfig.routing`` in its normal form, ``{"policy": ..., ["parameter": ...]}``.

    Parameters
    ----------
    value
        ``None`` or ``"least-loaded"``, ``"pinned"``, ``"hash:<parameter>"``, or a mapping with
        ``policy`` (and ``parameter`` for ``"hash"``).
    operator
        The operator's name, for error messages.

    Raises
    ------
    ValueError
        An unknown policy, or ``"hash"`` without a parameter name.
    """
    if value is None:
        return {"policy": "least-loaded"}
    if isinstance(value, str):
        name, _, param = value.partition(":")
        spec: dict[str, Any] = {"policy": name}
        if param:
            spec["parameter"] = param
    elif isinstance(value, Mapping):
        spec = dict(value)
    else:
        raise ValueError(f"operator {operator!r}: routing must be a string or a mapping, got {value!r}")
    policy = spec.get("policy")
    if policy not in ROUTING_POLICIES:
        raise ValueError(f"operator {operator!r}: routing policy must be one of {ROUTING_POLICIES}, got {policy!r}")
    parameter = spec.get("parameter")
    if policy == "hash":
        if not isinstance(parameter, str) or not parameter:
            raise ValueError(
                f"operator {operator!r}: routing 'hash' needs the request parameter to hash, "
                f"e.g. 'hash:session_id', got {value!r}"
            )
    elif parameter is not None or set(spec) - {"policy"}:
        raise ValueError(f"operator {operator!r}: routing {policy!r} takes no other keys, got {value!r}")
    if set(spec) - {"policy", "parameter"}:
        raise ValueError(f"operator {operator!r}: unknown routing keys {sorted(set(spec) - {'policy', 'parameter'})}")
    return spec


def _import_from(module_name: str, repository: str | None) -> Any:
    """Import ``module_name``, from ``repository`` when it has that file, else from sys.path."""
    if repository:
        path = Path(repository, *module_name.split("."))
        candidates = [path.with_suffix(".py"), path / "__init__.py"]
        for candidate in candidates:
            if candidate.is_file():
                unique = f"tdask_operators.{Path(repository).name}.{module_name}"
                if unique in sys.modules:
                    return sys.modules[unique]
                spec = importlib.util.spec_from_file_location(unique, candidate)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[unique] = module
                spec.loader.exec_module(module)
                return module
    return importlib.import_module(module_name)


class OperatorContext:
    """What the hosting worker offers its operators: the worker, its tensor store, Triton."""

    def __init__(
        self,
        *,
        worker: Worker,
        store: TensorStore,
        log_dir: Path | None,
        triton_server: Callable[[], Awaitable[Any]],
        restart_worker: Callable[[str], None],
    ) -> None:
        self.worker = worker
        self.store = store
        self.log_dir = log_dir
        self._triton_server = triton_server
        self._restart_worker = restart_worker

    async def triton_server(self) -> Any:
        """The worker's Triton server, started on first use (one per worker process)."""
        return await self._triton_server()

    def restart_worker(self, reason: str) -> None:
        """Give up on this worker: it closes and its Nanny starts a fresh one.

        The requests it holds, unanswered, are served again elsewhere. For states an operator
        cannot recover from in place, such as a dead Triton server or python-backend stub.
        """
        self._restart_worker(reason)


class Operator(abc.ABC):
    """Base class of every operator.

    Subclasses implement :meth:`execute`; :meth:`setup` and :meth:`teardown` are optional.
    ``execute`` is called with a batch of requests (at most ``max_inflight_requests`` in
    progress per worker) and must answer each one through ``request.response_sender()``.
    Raising answers every request not yet finished with an :class:`OperatorError`.

    An operator may declare its signature in :attr:`inputs` and :attr:`outputs` (or its config
    may, :attr:`OperatorConfig.inputs`): the gateway shows it as the model's metadata and
    refuses requests that do not fit it before they travel.
    """

    #: The tensors the operator takes: ``("name", "DATATYPE", [dims])`` tuples or mappings with
    #: ``name``, ``datatype`` (KServe's: ``FP32``, ``INT64``, ``BYTES``, ...), ``shape`` (-1: any
    #: size) and optionally ``optional``. Empty (and :attr:`outputs` empty): undeclared.
    inputs: ClassVar[Sequence[Any]] = ()
    #: The tensors it answers with, in the same form.
    outputs: ClassVar[Sequence[Any]] = ()
    #: Whether it may answer a request with several responses (shown as Triton's decoupled policy).
    decoupled: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        version: int,
        parameters: dict[str, Any],
        repository: str | None,
        logger: logging.Logger,
        context: OperatorContext,
    ) -> None:
        self.name = name
        self.version = version
        self.parameters = parameters
        self.repository = repository
        self.logger = logger
        self.context = context

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Acquire what the operator needs (models, connections) before requests arrive."""

    @abc.abstractmethod
    async def execute(self, requests: list[Request]) -> None:
        """Answer every request in ``requests`` through its response sender."""

    async def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`setup` acquired; called once when the worker closes."""

    def on_execution_timeout(self, requests: list[Request]) -> None:  # noqa: B027 - optional hook
        """Recover after an ``execute`` ran past the operator's execution timeout.

        Called on the worker's event loop once the batch's task was cancelled and ``requests``
        were answered with :class:`~tdask.exceptions.ExecutionTimeoutError`. The default does
        nothing (cancelling the task stopped an ``async`` operator); an operator whose work
        cannot be interrupted (a Triton model instance) restarts what is stuck, e.g. with
        :meth:`OperatorContext.restart_worker`.
        """

    def signature(self) -> dict[str, Any] | None:
        """The operator's signature (:mod:`tdask.protocol.signature`), or ``None`` when undeclared.

        Called once the operator is set up; by default built from :attr:`inputs`,
        :attr:`outputs` and :attr:`decoupled`.
        """
        if not self.inputs and not self.outputs:
            return None
        return make_signature(self.inputs, self.outputs, decoupled=self.decoupled, where=f"operator {self.name!r}")


SendFn = Callable[["Request", dict[str, Any]], Awaitable[None]]


class Request:
    """One request to an operator, as the operator sees it.

    ``inputs`` maps names to numpy (or cupy) arrays for tensors that travelled inline and to
    :class:`~tdask.data_plane.RemoteTensor` descriptors for large ones; pass a descriptor on to
    forward it by reference, or call :meth:`fetch_inputs` to get arrays. Inputs are read-only,
    inline or fetched (as in Triton's python backend): copy one before changing it. Forwarding one
    unchanged reuses its wire form instead of serializing it again.
    """

    def __init__(
        self,
        *,
        request_id: str,
        operator: str,
        version: int,
        inputs: dict[str, np.ndarray | RemoteTensor],
        parameters: dict[str, Any],
        deadline: float | None,
        store: TensorStore,
        send: SendFn,
        requester: str = "",
    ) -> None:
        self.request_id = request_id
        self.operator = operator
        self.version = version
        self.inputs = inputs
        self.parameters = parameters
        self.deadline = deadline
        self._store = store
        self._send = send
        self._sender: ResponseSender | None = None
        self.cancelled = asyncio.Event()
        self.finished = False
        #: Who sent the request (a client id, or a worker's requester name).
        self.requester = requester
        #: The requests executed together with this one (itself included), set by the host.
        self.batch: tuple[Request, ...] = ()
        #: ``time.perf_counter()`` when it reached its worker and when its batch started, set
        #: by the host (for its latency metrics).
        self.arrived = 0.0
        self.started = 0.0
        #: Ids of the inputs its caller placed for it alone, set by the host: the worker holding
        #: them drops them as it sends the final answer (the caller makes no release call).
        self.placed: tuple[str, ...] = ()

    @property
    def remaining_s(self) -> float | None:
        """Seconds left before the deadline, or ``None`` when there is none."""
        return None if self.deadline is None else self.deadline - time.time()

    async def fetch_inputs(self) -> dict[str, Any]:
        """All inputs as arrays, pulling remote ones from their owners."""
        from tdask.data_plane import RemoteTensor

        out: dict[str, Any] = {}
        for name, value in self.inputs.items():
            out[name] = await self._store.fetch(value) if isinstance(value, RemoteTensor) else value
        return out

    def response_sender(self) -> ResponseSender:
        """The sender through which this request is answered."""
        if self._sender is None:
            self._sender = ResponseSender(self)
        return self._sender

    def error(self, message: str) -> InvalidRequestError:
        """An :class:`InvalidRequestError` about this request, to raise or send."""
        return InvalidRequestError(message, operator=self.operator, request_id=self.request_id)

    def __repr__(self) -> str:
        return f"<Request {self.operator}:{self.request_id} inputs={sorted(self.inputs)}>"


class ResponseSender:
    """Answers one request: several responses allowed, exactly one with ``final=True``."""

    def __init__(self, request: Request) -> None:
        self._request = request

    async def send(
        self,
        outputs: Mapping[str, Any] | None = None,
        parameters: Mapping[str, Any] | None = None,
        error: BaseException | None = None,
        final: bool = True,
    ) -> None:
        """Send a response; after the final one, further sends raise ``RuntimeError``."""
        request = self._request
        if request.finished:
            raise RuntimeError(
                f"request {request.request_id!r} of operator {request.operator!r} already has its final response"
            )
        if error is not None and not final:
            raise ValueError("an error response must be final")
        if final:
            request.finished = True
        await request._send(
            request,
            {
                "outputs": dict(outputs or {}),
                "parameters": dict(parameters or {}),
                "error": error,
                "final": final,
            },
        )
