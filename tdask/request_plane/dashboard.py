"""The broker's web pages, next to the Dask dashboard: ``/tdask`` and ``/tdask/operators.json``."""

from __future__ import annotations

import html
import json
from typing import Any

from tornado import web

__all__ = ["install"]


def install(app: Any, broker: Any) -> None:
    """Add tdask's routes to the scheduler's HTTP application (``scheduler.http_application``)."""
    routes = [(r"/tdask/operators.json", _RegistryJSON), (r"/tdask/?", _RegistryPage)]
    app.add_handlers(r".*", [(path, cls, {"broker": broker}) for path, cls in routes])


class _RegistryJSON(web.RequestHandler):
    """``/tdask/operators.json``: the registry, queue depths and counters, for tools."""

    def initialize(self, broker: Any) -> None:
        self.broker = broker

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.broker.get_operators(), indent=1, sort_keys=True))


class _RegistryPage(_RegistryJSON):
    """``/tdask``: which worker hosts which operator, what is queued, what failed."""

    def get(self) -> None:
        state = self.broker.get_operators()
        rows = "".join(
            f"<tr><td>{html.escape(key)}</td><td>{len(hosts)}</td><td>{html.escape(', '.join(hosts))}</td>"
            f"<td>{state['queued'].get(key, 0)}</td></tr>"
            for key, hosts in sorted(state["hosts"].items())
        )
        failures = "".join(
            f"<li>{html.escape(name)} on {html.escape(w)}: {html.escape(m)}</li>"
            for name, by_worker in sorted(state["failures"].items())
            for w, m in sorted(by_worker.items())
        )
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(state["counts"].items()))
        served = "".join(
            f"<tr><td>{html.escape(worker)}</td><td>{html.escape(key)}</td><td>{s.get('started', 0)}</td>"
            f"<td>{s.get('inflight', 0)} / {s.get('limit', 0)}</td><td>{s.get('waiting', 0)}</td></tr>"
            for worker, by_key in state["workers"].items()
            for key, s in sorted(by_key.items())
        )
        self.write(
            "<html><head><title>tdask operators</title><meta http-equiv='refresh' content='2'></head><body>"
            "<h2>tdask operators</h2><table border=1 cellpadding=4>"
            "<tr><th>operator</th><th>workers</th><th>addresses</th><th>queued</th></tr>"
            f"{rows}</table>"
            "<h3>served, by worker (every request plane)</h3><table border=1 cellpadding=4>"
            "<tr><th>worker</th><th>operator</th><th>requests started</th><th>in flight / limit</th>"
            f"<th>waiting for a slot</th></tr>{served}</table>"
            f"<h3>through the scheduler's queues</h3><p>leased (in progress): {state['leased']}</p>"
            f"<p>{html.escape(counts)}</p>"
            + (f"<h3>setup failures</h3><ul>{failures}</ul>" if failures else "")
            + "</body></html>"
        )
