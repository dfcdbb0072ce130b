"""A worker's readiness as tdask sees it: ``/tdask/ready`` on the worker's HTTP server.

distributed's ``/health`` answers ``ok`` as long as the worker's event loop runs, whatever its
operators do: fine for a liveness probe, wrong for readiness. ``GET /tdask/ready`` answers
``200`` only when the worker runs, is registered with the scheduler's broker, and every operator
it was asked to host is serving; else ``503``. Either way the body is JSON::

    {"ready": false, "worker": "encoder.0", "address": "tcp://...", "status": "running",
     "reason": "operator encoder/1 failed: ValueError: ...",
     "operators": {"encoder/1": {"state": "failed", "reason": "ValueError: ..."}}}

An operator's ``state`` is ``starting``, ``ready``, ``draining`` (retired ahead of a scale-down
or an update), ``failed`` (its setup raised, or its model failed to load; ``reason`` says how),
``stopping``, or for a Triton model under model control ``loading``, ``unloading`` or
``unloaded`` (its requests are refused until it is loaded again). The route is
added to the worker's own HTTP server (the one serving ``/health`` and ``/metrics``) when the
first :class:`~tdask.host.plugin.OperatorHost` sets up there.
"""

from __future__ import annotations

import json
from typing import Any

from distributed.core import Status
from tornado import web

__all__ = ["READY_PATH", "install", "worker_readiness"]

#: The route of a worker's readiness.
READY_PATH = "/tdask/ready"


def install(worker: Any) -> None:
    """Serve :data:`READY_PATH` on ``worker``'s HTTP server (once per worker; no server, nothing)."""
    app = getattr(worker, "http_application", None)
    if app is None or getattr(app, "_tdask_ready", False):
        return
    app.add_handlers(r".*", [(READY_PATH, _ReadyHandler, {"worker": worker})])
    app._tdask_ready = True


def _model_state(state: str) -> tuple[str, str | None]:
    """An operator's ``(state, reason)`` from its serving state (``failed: <why>`` split)."""
    if state == "ready":
        return "ready", None
    if state.startswith("failed"):
        return "failed", state.partition(":")[2].strip() or "its model failed to load"
    return state, f"its model is {state} (model control)"


def worker_readiness(worker: Any) -> dict[str, Any]:
    """The readiness report of ``worker``: ``ready``, ``reason`` and each operator's state."""
    from tdask.host.plugin import OperatorHost

    hosts = [p for p in worker.plugins.values() if isinstance(p, OperatorHost)]
    operators: dict[str, dict[str, Any]] = {}
    for host in hosts:
        primary = host._primary or host
        serving = primary.serving
        retired: set[str] = getattr(primary, "_retired", set())
        for config in host.operators:
            state: str
            reason: str | None
            failure = host.failures.get(config.name)
            if failure is not None:
                state, reason = "failed", failure
            elif primary._closing:
                state, reason = "stopping", "the worker is closing"
            elif serving is not None and config.key in serving.hosted:
                if config.key in retired:
                    state, reason = "draining", "retired: finishing what it holds before it leaves"
                elif not primary._registered:
                    state, reason = "starting", "not registered with the scheduler yet"
                else:  # a Triton model under model control may be loading, unloaded or failed
                    state, reason = _model_state(serving.hosted[config.key].state)
            else:
                state, reason = "starting", "its setup has not finished"
            operators[config.key] = {"state": state, "reason": reason}
    status = getattr(worker.status, "name", str(worker.status))
    reason = None
    if worker.status != Status.running:
        reason = f"the worker is {status}"
    elif not hosts:
        reason = "no tdask operators on this worker"
    elif any(h._restart is not None or h._beyond_repair() for h in hosts if h._primary is None):
        reason = "restarting: its Triton server cannot serve on"
    else:
        unready = [(k, v) for k, v in operators.items() if v["state"] != "ready"]
        if unready:
            reason = "; ".join(
                f"operator {k} {v['state']}" + (f": {v['reason']}" if v["reason"] else "") for k, v in unready
            )
    return {
        "ready": reason is None,
        "worker": str(worker.name),
        "address": worker.address,
        "status": status,
        "reason": reason,
        "operators": operators,
    }


class _ReadyHandler(web.RequestHandler):
    """``GET /tdask/ready``: 200 when the worker and all its operators serve, else 503; JSON either way."""

    def initialize(self, worker: Any) -> None:
        self.worker = worker

    def get(self) -> None:
        report = worker_readiness(self.worker)
        self.set_status(200 if report["ready"] else 503)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(report, sort_keys=True))
