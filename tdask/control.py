"""Operating a running cluster from outside it: model control on the workers, commands to a deployment.

- :func:`model_control` loads, unloads or reloads the Triton model of an operator on every
  worker that hosts it (Triton's explicit model control, through each worker's ``tdask_model``
  handler). It needs no cluster manager: it works on a hand-started cluster too. The gateway's
  KServe repository extension and ``tdask model`` call it.
- :func:`deployment_command` sends a command (``scale``, ``adapt``, ``update``, ``describe``)
  to the :class:`tdask.Deployment` that owns a scheduler (``tdask serve``/``tdask deploy``), which
  answers it through the scheduler's ``tdask_control`` handler. A scheduler started by hand has
  no such handler: :class:`NoClusterManagerError` says so in one line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed import Client
from distributed.core import rpc

from tdask.exceptions import OperatorError, OperatorUnavailableError, TdaskError
from tdask.protocol import Rpc
from tdask.request_plane.registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["MODEL_ACTIONS", "NoClusterManagerError", "deployment_command", "model_control"]

#: What :func:`model_control` does.
MODEL_ACTIONS = ("load", "unload", "reload")


class NoClusterManagerError(TdaskError):
    """The scheduler has no tdask deployment managing its workers (it was started by hand)."""


def _scheduler_rpc(target: Any, connection_args: dict[str, Any] | None) -> tuple[Any, Any, bool]:
    """``(scheduler rpc, what reaches a worker by address, whether we opened the rpc)``."""
    if isinstance(target, Client):
        return target.scheduler, target.rpc, False
    if hasattr(target, "handlers") and hasattr(target, "rpc") and hasattr(target, "address"):  # a Scheduler
        return target.rpc(target.address), target.rpc, True
    if isinstance(target, str):
        args = connection_args or {}
        return rpc(target, connection_args=args), lambda address: rpc(address, connection_args=args), True
    raise TypeError(f"expected a Client, a Scheduler or a scheduler address, got {type(target).__name__}")


async def model_control(
    client_or_scheduler: Client | Any | str,
    name: str,
    action: str,
    *,
    connection_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load, unload or reload the Triton model of operator ``name`` on every worker hosting it.

    Parameters
    ----------
    client_or_scheduler
        An asynchronous ``distributed.Client``, the ``Scheduler`` object (code running on the
        scheduler), or the scheduler's address.
    name
        The operator's name (every version of it hosted is acted on).
    action
        ``"load"``, ``"unload"`` or ``"reload"`` (a load of a loaded model reloads it).
    connection_args
        With an address: the connection arguments (TLS) to reach the scheduler and workers.

    Returns
    -------
    dict
        ``{"operator": name, "action": action, "workers": {address: {key: state}}}``; the
        state (``ready`` or ``unloaded``) also shows in ``/tdask/operators.json``, the dashboard
        and ``/metrics``.

    Raises
    ------
    OperatorUnavailableError
        No worker hosts ``name``.
    OperatorError
        A worker failed the action (Triton's message, the worker named); the others did it.
    InvalidRequestError
        ``action`` is not one of :data:`MODEL_ACTIONS`.
    """
    from tdask.exceptions import InvalidRequestError

    if action not in MODEL_ACTIONS:
        raise InvalidRequestError(f"model action must be one of {MODEL_ACTIONS}, got {action!r}", operator=name)
    scheduler, worker_rpc, owned = _scheduler_rpc(client_or_scheduler, connection_args)
    try:
        state = await Registry(scheduler).operators()
    finally:
        if owned:
            await scheduler.close_rpc()
    hosts = sorted({h for key, hs in state["hosts"].items() if key.rsplit("/", 1)[0] == name for h in hs})
    if not hosts:
        raise OperatorUnavailableError(
            f"no worker hosts operator {name!r}; hosted: {sorted(state['hosts'])}", operator=name
        )

    async def one(address: str) -> dict[str, Any]:
        worker = worker_rpc(address)
        try:
            return dict(await getattr(worker, Rpc.MODEL)(name=name, action=action))
        finally:
            if isinstance(client_or_scheduler, str):  # an rpc of our own; pooled ones stay in their pool
                await worker.close_rpc()

    results = await asyncio.gather(*(one(h) for h in hosts), return_exceptions=True)
    done: dict[str, Any] = {}
    errors: list[str] = []
    for address, result in zip(hosts, results, strict=True):
        if isinstance(result, BaseException):
            errors.append(f"{address}: {type(result).__name__}: {result}")
        else:
            done[address] = result.get("operators", {})
    logger.debug("model %s of %s: %s%s", action, name, done, f"; failed: {errors}" if errors else "")
    if errors:
        raise OperatorError(
            f"model {action} of {name!r} failed on {len(errors)} of {len(hosts)} workers: " + "; ".join(errors),
            operator=name,
        )
    return {"operator": name, "action": action, "workers": done}


async def deployment_command(
    address: str, command: str, *, connection_args: dict[str, Any] | None = None, **arguments: Any
) -> dict[str, Any]:
    """Send ``command`` to the deployment that owns the scheduler at ``address``; its answer.

    Raises
    ------
    NoClusterManagerError
        No tdask deployment manages that scheduler's workers (a ``dask scheduler`` started by
        hand): nothing can start or stop workers for it.
    TdaskError
        The deployment refused or failed the command (its message).
    """
    scheduler = rpc(address, connection_args=connection_args or {})
    try:
        answer = await getattr(scheduler, Rpc.CONTROL)(command=command, arguments=arguments)
    finally:
        await scheduler.close_rpc()
    if answer is None:  # distributed answers None for a handler it does not have
        raise NoClusterManagerError(
            f"no tdask deployment manages the scheduler at {address} (started by hand?): nothing here can start "
            "or stop its workers; start them with `dask worker ... --preload tdask.worker` or stop them yourself"
        )
    if answer.get("error"):
        raise OperatorError(str(answer["error"]), operator=arguments.get("operator"))
    return dict(answer)


async def answer_command(deployment: Any, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The deployment's half of :func:`deployment_command`: the scheduler's ``tdask_control`` handler.

    ``deployment`` is the :class:`~tdask.deployment.Deployment` that owns the scheduler (bound by
    it when it registers the handler). Commands: ``scale``, ``adapt``, ``update``,
    ``update-file``, ``describe``; an answer with ``error`` for an unknown one or one that failed.
    """
    try:
        operator = arguments.get("operator")
        if command == "scale":
            workers = await deployment._scale(str(operator), int(arguments["n"]))
            return {"operator": operator, "workers": workers}
        if command == "adapt":
            options = {k: v for k, v in arguments.items() if k != "operator" and v is not None}
            return {"operator": operator, "adapt": deployment.adapt(str(operator), **options).describe()}
        if command == "update":
            workers = await deployment._update(str(operator), dict(arguments.get("config") or {}))
            return {"operator": operator, "workers": workers}
        if command == "update-file":
            return {"operators": await deployment._update_file(str(arguments["file"]))}
        if command == "describe":
            return {
                "operators": {
                    name: deployment.operator_workers(name)
                    for name in [*(c.name for c in deployment.workers_spec.values()), *deployment.colocate]
                },
                "adaptive": {name: a.describe() for name, a in deployment.adaptive.items()},
            }
        return {"error": f"unknown command {command!r} (scale, adapt, update, describe)"}
    except Exception as exc:
        logger.warning("tdask %s %s failed: %s", command, arguments, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
