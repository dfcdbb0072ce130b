"""Operating a running deployment: ``tdask status``, ``scale``, ``adapt``, ``update`` and ``model``.

Each reaches the scheduler at ``--scheduler`` (or ``$TDASK_SCHEDULER_ADDRESS``) over Dask's comm:
``status`` reads the broker's registry; the others send a command to the process that owns the
deployment (:func:`tdask.control.deployment_command`, ``tdask serve`` or ``tdask deploy``), which
answers once it is done. They are subcommands of ``tdask`` (:mod:`tdask.cli`), imported only when
asked for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

__all__ = ["adapt", "format_status", "model", "scale", "status", "update"]


def _connection_args(address: str) -> dict[str, Any]:
    """A client's Dask connection arguments for the scheduler at ``address``.

    On ``tls://``, from Dask's ``distributed.comm.tls.*`` config; without a CA or client
    certificate there, exits with 1 and one line saying what to set (Dask's own error is a
    traceback about ``ssl_context``).
    """
    from distributed.security import Security

    if not address.startswith("tls://"):
        return {}
    args = Security().get_connection_args("client")
    if args.get("ssl_context") is None:
        click.echo(
            f"error: the scheduler at {address} wants TLS, and Dask's config has no client credentials: set "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY (a `tdask serve` with temporary TLS prints its own)",
            err=True,
        )
        sys.exit(1)
    return dict(args)


def _registry_state(address: str, timeout: float) -> dict[str, Any]:
    """The scheduler's registry (``/tdask/operators.json``'s content), over Dask's comm."""
    import asyncio

    from distributed.core import rpc

    from tdask.request_plane import Registry

    args = _connection_args(address)

    async def fetch() -> dict[str, Any]:
        scheduler = rpc(address, connection_args=args, timeout=timeout)
        try:
            return dict(await asyncio.wait_for(Registry(scheduler).operators(), timeout))
        finally:
            await scheduler.close_rpc()

    return asyncio.run(fetch())


def format_status(state: dict[str, Any], address: str) -> str:
    """``tdask status``'s table from the registry's state (``tdask_operators``).

    One row per operator: version, readiness, workers serving it, requests in flight against
    the limit (summed over its workers), queued, answered, errors (by type, since the workers
    started, and the broker's own), and the reason it is not ready; then one row per worker.
    """
    names: dict[str, str] = state.get("names") or {}
    operators: dict[str, dict[str, Any]] = state.get("operators") or {}
    by_key: dict[str, dict[str, Any]] = {}  # key -> summed worker counters
    for stats in (state.get("workers") or {}).values():
        for key, s in stats.items():
            total = by_key.setdefault(key, {"inflight": 0, "limit": 0, "answered": 0, "errors": {}})
            total["inflight"] += int(s.get("inflight", 0))
            total["limit"] += int(s.get("limit", 0))
            for outcome, n in (s.get("outcomes") or {}).items():
                total["answered"] += int(n)
                if outcome not in ("ok", "cancelled", "not_answered") and n:
                    total["errors"][outcome] = total["errors"].get(outcome, 0) + int(n)
    header = ("OPERATOR", "VERSION", "STATE", "WORKERS", "IN FLIGHT", "QUEUED", "ANSWERED", "ERRORS", "REASON")
    rows = [header]
    for key, op in sorted(operators.items()):
        total = by_key.get(key, {"inflight": 0, "limit": 0, "answered": 0, "errors": {}})
        errors = dict(total["errors"])
        for error, n in (op.get("broker_errors") or {}).items():
            errors[error] = errors.get(error, 0) + int(n)
        rows.append(
            (
                str(op.get("name", key)),
                "-" if op.get("version") is None else str(op["version"]),
                str(op.get("state", "?")),
                ",".join(op.get("workers") or []) or "-",
                f"{total['inflight']}/{total['limit']}",
                str((state.get("queued") or {}).get(key, 0)),
                str(total["answered"]),
                ", ".join(f"{e} x{n}" for e, n in sorted(errors.items())) or "0",
                str(op.get("reason") or ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        f"scheduler {address}: {sum(1 for o in operators.values() if o.get('state') == 'ready')} of "
        f"{len(operators)} operators ready"
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    worker_rows = [("WORKER", "ADDRESS", "OPERATORS (in flight/limit)")]
    for worker, stats in sorted((state.get("workers") or {}).items(), key=lambda kv: names.get(kv[0], kv[0])):
        ops = ", ".join(f"{k} {s.get('inflight', 0)}/{s.get('limit', 0)}" for k, s in sorted(stats.items()))
        worker_rows.append((names.get(worker, worker), worker, ops or "-"))
    for name in state.get("starting") or []:
        worker_rows.append((name, "-", "starting (not registered yet)"))
    if len(worker_rows) > 1:
        w0, w1 = (max(len(r[i]) for r in worker_rows) for i in range(2))
        lines.append("")
        lines += [f"{r[0].ljust(w0)}  {r[1].ljust(w1)}  {r[2]}" for r in worker_rows]
    return "\n".join(line.rstrip() for line in lines)


_SCHEDULER_OPTION = click.option(
    "--scheduler",
    "scheduler_address",
    default="tcp://127.0.0.1:8786",
    envvar="TDASK_SCHEDULER_ADDRESS",
    show_default=True,
    help="The scheduler's address (or $TDASK_SCHEDULER_ADDRESS).",
)


@click.command()
@_SCHEDULER_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the registry as one JSON object.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the scheduler.")
def status(scheduler_address: str, as_json: bool, timeout: float) -> None:
    """List the operators of a running deployment: versions, workers, readiness, in flight, errors.

    Exits with 1 when the scheduler cannot be reached, 3 when an operator is not ready.
    """
    try:
        state = _registry_state(scheduler_address, timeout)
    except (OSError, TimeoutError) as exc:
        click.echo(f"error: the scheduler at {scheduler_address} cannot be reached: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(state, sort_keys=True))
    else:
        click.echo(format_status(state, scheduler_address))
    operators = state.get("operators") or {}
    sys.exit(0 if operators and all(o.get("state") == "ready" for o in operators.values()) else 3)


# -- operating a running deployment: scale, adapt, update, model control --------------------


def _command(address: str, command: str, **arguments: Any) -> dict[str, Any]:
    """Send ``command`` to the deployment owning the scheduler at ``address``; exit 1 with one line on failure."""
    import asyncio

    from tdask.control import NoClusterManagerError, deployment_command
    from tdask.exceptions import TdaskError

    args = _connection_args(address)
    try:
        return asyncio.run(deployment_command(address, command, connection_args=args, **arguments))
    except NoClusterManagerError as exc:
        click.echo(f"error: {exc.message}", err=True)
    except TdaskError as exc:
        click.echo(f"error: {exc.message}", err=True)
    except OSError as exc:
        click.echo(f"error: the scheduler at {address} cannot be reached: {exc}", err=True)
    sys.exit(1)


@click.command()
@click.argument("operator")
@click.argument("n", type=click.IntRange(min=0))
@_SCHEDULER_OPTION
def scale(operator: str, n: int, scheduler_address: str) -> None:
    """Run N workers of OPERATOR in a running `tdask serve`/`tdask deploy` (scale-down drains: nothing is lost)."""
    answer = _command(scheduler_address, "scale", operator=operator, n=n)
    workers = answer.get("workers") or []
    click.echo(f"{operator}: {len(workers)} workers: {', '.join(workers) or '-'}")


@click.command()
@click.argument("operator")
@click.option("--minimum", type=click.IntRange(min=0), default=None, help="Fewest workers (default 1).")
@click.option("--maximum", type=click.IntRange(min=1), default=None, help="Most workers (default 4).")
@click.option(
    "--target-inflight-per-worker", type=float, default=None, help="Requests in flight per worker (default 1)."
)
@click.option("--up-delay", type=float, default=None, help="Seconds of higher load before growing (default 2).")
@click.option("--down-delay", type=float, default=None, help="Seconds of lower load before shrinking (default 30).")
@_SCHEDULER_OPTION
def adapt(
    operator: str,
    minimum: int | None,
    maximum: int | None,
    target_inflight_per_worker: float | None,
    up_delay: float | None,
    down_delay: float | None,
    scheduler_address: str,
) -> None:
    """Autoscale OPERATOR of a running deployment between --minimum and --maximum workers."""
    answer = _command(
        scheduler_address,
        "adapt",
        operator=operator,
        minimum=minimum,
        maximum=maximum,
        target_inflight_per_worker=target_inflight_per_worker,
        up_delay=up_delay,
        down_delay=down_delay,
    )
    a = answer.get("adapt") or {}
    click.echo(
        f"{operator}: autoscaling {a.get('minimum')}..{a.get('maximum')} workers, "
        f"{a.get('target_inflight_per_worker')} in flight per worker, up after {a.get('up_delay')}s, "
        f"down after {a.get('down_delay')}s ({a.get('workers')} workers now)"
    )


@click.command()
@click.argument("operator")
@click.option("--version", "version", type=click.IntRange(min=1), default=None, help="The new version.")
@click.option("--implementation", default=None, help="The new implementation ('module:Class' or 'triton').")
@click.option("--repository", default=None, help="The new repository.")
@click.option("--max-inflight-requests", type=click.IntRange(min=1), default=None, help="The new limit per worker.")
@click.option("--parameters", default=None, help="The new parameters, a JSON object.")
@_SCHEDULER_OPTION
def update(
    operator: str,
    version: int | None,
    implementation: str | None,
    repository: str | None,
    max_inflight_requests: int | None,
    parameters: str | None,
    scheduler_address: str,
) -> None:
    """Replace OPERATOR's workers under traffic with workers of a new version or code (rolling update).

    `tdask update FILE.yaml` instead brings the deployment to what the deployment file says: each
    operator whose config changed is updated the same way, new ones start, counts and
    autoscaling follow the file.
    """
    if operator.endswith((".yaml", ".yml")) and Path(operator).is_file():
        from tdask.deployment_file import load_deployment_file
        from tdask.exceptions import DeploymentFileError

        try:
            load_deployment_file(operator)  # refused here, before the deployment changes anything
        except DeploymentFileError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(2)
        answer = _command(scheduler_address, "update-file", file=str(Path(operator).resolve()))
        for name, workers in sorted((answer.get("operators") or {}).items()):
            click.echo(f"{name}: {len(workers)} workers: {', '.join(workers) or '-'}")
        return
    config: dict[str, Any] = {
        k: v
        for k, v in {
            "version": version,
            "implementation": implementation,
            "repository": repository,
            "max_inflight_requests": max_inflight_requests,
        }.items()
        if v is not None
    }
    if parameters is not None:
        try:
            config["parameters"] = json.loads(parameters)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not a JSON object: {exc}", param_hint="--parameters") from None
    if not config:
        raise click.UsageError("nothing to update: give --version, --implementation, --parameters, ...")
    answer = _command(scheduler_address, "update", operator=operator, config=config)
    workers = answer.get("workers") or []
    click.echo(f"{operator}: updated; now served by {', '.join(workers)}")


@click.command()
@click.argument("action", type=click.Choice(["load", "unload", "reload"]))
@click.argument("name")
@_SCHEDULER_OPTION
def model(action: str, name: str, scheduler_address: str) -> None:
    """Load, unload or reload the Triton model of operator NAME on every worker hosting it."""
    import asyncio

    from tdask.control import model_control
    from tdask.exceptions import TdaskError

    args = _connection_args(scheduler_address)
    try:
        answer = asyncio.run(model_control(scheduler_address, name, action, connection_args=args))
    except TdaskError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"error: the scheduler at {scheduler_address} cannot be reached: {exc}", err=True)
        sys.exit(1)
    for worker, states in sorted(answer["workers"].items()):
        click.echo(f"{worker}: " + ", ".join(f"{key} {state}" for key, state in sorted(states.items())))
