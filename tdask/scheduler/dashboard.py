"""tdask's page in the Dask dashboard (``/tdask``), drawn with the dashboard's own Bokeh, and ``/tdask/operators.json``.

The page is live (one point a second, from :class:`~tdask.scheduler.cluster_metrics.ClusterMetrics`):
per operator the request rate, p50/p99 latency, errors and queue depth over time; in flight
against the limit on each worker, by name; each worker's data-plane throughput; a table of
operators and one of setup failures. It joins the dashboard's navigation: ``tdask`` in the top
bar, and ``tdask operators`` (``/individual-tdask``, the bare page, as JupyterLab's Dask
extension lists them) under "More...".

distributed builds its dashboard's pages once, when the scheduler starts; the broker is often
installed later (by the first client or worker that needs it), so :func:`install` adds a Bokeh
application of its own to the scheduler's HTTP server (``distributed.dashboard.core.BokehApplication``,
as ``distributed.dashboard.scheduler.connect`` does) and its links to the navigation lists that
every page renders. Bokeh is imported only there, on the scheduler. Without the dashboard
(``dashboard=False``, or no Bokeh), ``/tdask`` is a plain HTML table instead.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
from typing import Any

from tornado import web

from tdask.scheduler.cluster_metrics import HISTORY_S

logger = logging.getLogger(__name__)

__all__ = ["install"]

#: Route of the page (top navigation) and of its bare twin (listed under "More...").
PAGE = "/tdask"
INDIVIDUAL = "/individual-tdask"


def install(app: Any, broker: Any) -> None:
    """Add tdask's routes to the scheduler's HTTP application (``scheduler.http_application``)."""
    routes: list[tuple[str, type[web.RequestHandler]]] = [(r"/tdask/operators.json", _RegistryJSON)]
    try:
        drawn = _install_page(app, broker)
    except Exception:  # the dashboard keeps working without tdask's page
        logger.exception("could not add tdask's page to the Dask dashboard")
        drawn = False
    if not drawn:
        routes.append((r"/tdask/?", _RegistryPage))
    app.add_handlers(r".*", [(path, cls, {"broker": broker}) for path, cls in routes])


def _install_page(app: Any, broker: Any) -> bool:
    """Serve the Bokeh page beside the dashboard's own and link it from the navigation; False without a dashboard."""
    try:
        from bokeh.server.server import BokehTornado
        from distributed.dashboard import scheduler as dask_dashboard
        from distributed.dashboard.core import BokehApplication
        from tornado.ioloop import IOLoop
    except ImportError:  # no Bokeh (or one distributed does not accept): no dashboard at all
        return False
    scheduler = broker.scheduler
    dashboards = [a for a in getattr(app, "applications", ()) if isinstance(a, BokehTornado)]
    if not dashboards:
        return False
    if any(PAGE in a.app_paths for a in dashboards):
        return True  # already there (a broker installed again on this scheduler)
    variables = dask_dashboard.template_variables(scheduler)  # the one dict the dashboard renders from
    page = BokehApplication(
        {PAGE: functools.partial(_page_doc, broker, True), INDIVIDUAL: functools.partial(_page_doc, broker, False)},
        scheduler,
        prefix=dashboards[0].prefix,
        template_variables=variables,
    )
    app.add_application(page)
    page.initialize(IOLoop.current())
    page.start()
    if PAGE.strip("/") not in variables["pages"]:
        variables["pages"].append(PAGE.strip("/"))
    plots = variables["plots"]
    if not any(p["url"] == INDIVIDUAL.strip("/") for p in plots):
        plots.append({"url": INDIVIDUAL.strip("/"), "name": "tdask operators"})
        plots.sort(key=lambda p: p["name"].lower())
    return True


def _page_doc(broker: Any, navigation: bool, scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """Build one browser session's page (Bokeh calls this per session)."""
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    page = OperatorsPage(broker)
    page.update()
    add_periodic_callback(doc, page, 1000)
    doc.title = "Dask: tdask operators"
    doc.add_root(page.root)
    if navigation:
        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


_MS = 1e3


def _table_height(rows: int) -> int:
    return 30 + 26 * max(1, rows)


def _finite(value: float | None, scale: float = 1.0) -> float:
    return math.nan if value is None else value * scale


class OperatorsPage:
    """The Bokeh models of tdask's page and their update from the broker's metrics (a dashboard component).

    Parameters
    ----------
    broker
        The scheduler's :class:`~tdask.scheduler.broker.RequestBroker`.
    """

    def __init__(self, broker: Any) -> None:
        from bokeh.layouts import column, row
        from bokeh.models import ColumnDataSource, DataRange1d, FactorRange, NumeralTickFormatter
        from bokeh.models.widgets import DataTable, Div, NumberFormatter, TableColumn
        from bokeh.palettes import Category10_10
        from bokeh.plotting import figure

        self.broker = broker
        self.metrics = broker.metrics
        self.palette = Category10_10
        self.last_index = 0
        self.operator_sources: dict[str, Any] = {}
        self.worker_sources: dict[str, Any] = {}
        self._ColumnDataSource = ColumnDataSource

        x_range = DataRange1d(follow="end", follow_interval=300_000, range_padding=0)
        common: dict[str, Any] = {
            "x_axis_type": "datetime",
            "x_range": x_range,
            "height": 260,
            "sizing_mode": "stretch_width",
            "tools": "reset,xpan,xwheel_zoom,save",
        }
        self.rate = figure(title="Requests answered per second", name="tdask-rate", **common)
        self.latency = figure(
            title="Latency on the worker, p50 (solid) and p99 (dashed)", name="tdask-latency", **common
        )
        self.latency.yaxis.axis_label = "ms"
        self.errors = figure(title="Errors per second", name="tdask-errors", **common)
        self.queued = figure(title="Queued (scheduler queue + waiting on workers)", name="tdask-queued", **common)
        self.data_plane = figure(
            title="Data plane: bytes served (solid) and pulled (dashed) per second, by worker",
            name="tdask-data-plane",
            **common,
        )
        self.data_plane.yaxis.formatter = NumeralTickFormatter(format="0.0b")
        for fig in (self.rate, self.latency, self.errors, self.queued, self.data_plane):
            y_range: Any = fig.y_range
            y_range.start = 0
            fig.xgrid.visible = False
            fig.yaxis.minor_tick_line_alpha = 0

        self.slots = ColumnDataSource({"label": [], "inflight": [], "limit": [], "waiting": []})
        self.labels = FactorRange()
        self.inflight = figure(
            title="In flight against the limit, by worker",
            name="tdask-inflight",
            y_range=self.labels,
            x_range=DataRange1d(start=0),
            height=260,
            sizing_mode="stretch_width",
            tools="",
            toolbar_location=None,
        )
        bars: dict[str, Any] = {"y": "label", "source": self.slots}
        self.inflight.hbar(right="limit", height=0.8, color="#dddddd", legend_label="limit", **bars)
        self.inflight.hbar(right="inflight", height=0.5, color="#1f77b4", legend_label="in flight", **bars)
        self.inflight.legend.location = "bottom_right"

        self.table = ColumnDataSource(
            {
                k: []
                for k in (
                    "operator",
                    "workers",
                    "rate",
                    "p50",
                    "p99",
                    "errors",
                    "queued",
                    "slots",
                    "timeouts",
                    "recoveries",
                )
            }
        )
        number = NumberFormatter(format="0.00")
        self.operators_table = DataTable(
            source=self.table,
            name="tdask-operators",
            columns=[
                TableColumn(field="operator", title="operator"),
                TableColumn(field="workers", title="workers"),
                TableColumn(field="rate", title="requests/s", formatter=number),
                TableColumn(field="p50", title="p50 ms", formatter=number),
                TableColumn(field="p99", title="p99 ms", formatter=number),
                TableColumn(field="errors", title="errors/s", formatter=number),
                TableColumn(field="queued", title="queued"),
                TableColumn(field="slots", title="in flight / limit"),
                TableColumn(field="timeouts", title="execution timeouts"),
                TableColumn(field="recoveries", title="recoveries"),
            ],
            index_position=None,
            height=_table_height(1),
            sizing_mode="stretch_width",
        )
        self.failures = ColumnDataSource({"operator": [], "worker": [], "error": []})
        self.failures_table = DataTable(
            source=self.failures,
            name="tdask-failures",
            columns=[
                TableColumn(field="operator", title="operator"),
                TableColumn(field="worker", title="worker"),
                TableColumn(field="error", title="setup failure"),
            ],
            index_position=None,
            height=_table_height(1),
            sizing_mode="stretch_width",
            visible=False,
        )
        self.header = Div(text="", sizing_mode="stretch_width", name="tdask-header")
        self.root = column(
            self.header,
            self.operators_table,
            row(self.rate, self.latency, sizing_mode="stretch_width"),
            row(self.errors, self.queued, sizing_mode="stretch_width"),
            row(self.inflight, self.data_plane, sizing_mode="stretch_width"),
            self.failures_table,
            sizing_mode="stretch_width",
        )

    # -- drawing ---------------------------------------------------------------------------

    def _color(self, index: int) -> str:
        return str(self.palette[index % len(self.palette)])

    def _operator_source(self, key: str) -> Any:
        source = self.operator_sources.get(key)
        if source is None:
            color = self._color(len(self.operator_sources))
            source = self._ColumnDataSource(
                {k: [] for k in ("time", "rate", "errors", "p50", "p99", "queued")}, name=f"tdask-series-{key}"
            )
            self.operator_sources[key] = source
            self.rate.line("time", "rate", source=source, color=color, legend_label=key, line_width=2)
            self.latency.line("time", "p50", source=source, color=color, legend_label=key, line_width=2)
            self.latency.line("time", "p99", source=source, color=color, line_dash="dashed", line_width=1)
            self.errors.line("time", "errors", source=source, color=color, legend_label=key, line_width=2)
            self.queued.line("time", "queued", source=source, color=color, legend_label=key, line_width=2)
            for fig in (self.rate, self.latency, self.errors, self.queued):
                fig.legend.location = "top_left"
        return source

    def _worker_source(self, name: str) -> Any:
        source = self.worker_sources.get(name)
        if source is None:
            color = self._color(len(self.worker_sources))
            source = self._ColumnDataSource({"time": [], "served": [], "pulled": []}, name=f"tdask-data-plane-{name}")
            self.worker_sources[name] = source
            self.data_plane.line("time", "served", source=source, color=color, legend_label=name, line_width=2)
            self.data_plane.line("time", "pulled", source=source, color=color, line_dash="dashed")
            self.data_plane.legend.location = "top_left"
        return source

    def update(self) -> None:
        """Stream the history points not drawn yet, and redraw the current state."""
        new = [s for s in self.metrics.history if s.index > self.last_index]
        if new:
            self.last_index = new[-1].index
            series: dict[str, dict[str, list[float]]] = {}
            flows: dict[str, dict[str, list[float]]] = {}
            for point in new:
                t = point.time * _MS
                for key, o in point.operators.items():
                    cols = series.setdefault(key, {k: [] for k in ("time", "rate", "errors", "p50", "p99", "queued")})
                    cols["time"].append(t)
                    cols["rate"].append(o["rate"])
                    cols["errors"].append(o["errors"])
                    cols["p50"].append(_finite(o["p50"], _MS))
                    cols["p99"].append(_finite(o["p99"], _MS))
                    cols["queued"].append(o["queued"])
                for name, w in point.workers.items():
                    cols = flows.setdefault(name, {"time": [], "served": [], "pulled": []})
                    cols["time"].append(t)
                    cols["served"].append(w["served"])
                    cols["pulled"].append(w["pulled"])
            for key, cols in sorted(series.items()):
                self._operator_source(key).stream(cols, rollover=HISTORY_S)
            for name, cols in sorted(flows.items()):
                self._worker_source(name).stream(cols, rollover=HISTORY_S)
        self._update_state(new[-1] if new else None)

    def _update_state(self, point: Any) -> None:
        broker, metrics = self.broker, self.metrics
        slots: dict[str, list[Any]] = {"label": [], "inflight": [], "limit": [], "waiting": []}
        for reported in sorted(metrics.workers.values(), key=lambda r: r.name):
            for key, s in sorted(reported.operators.items()):
                model = s.get("state", "ready")  # a model unloaded by model control says so
                slots["label"].append(f"{reported.name} · {key}" + ("" if model == "ready" else f" ({model})"))
                slots["inflight"].append(int(s.get("inflight", 0)))
                slots["limit"].append(int(s.get("limit", 0)))
                slots["waiting"].append(int(s.get("waiting", 0)))
        if slots != dict(self.slots.data):
            self.labels.factors = list(reversed(slots["label"]))
            self.slots.data = slots
        if point is not None:
            table: dict[str, list[Any]] = {k: [] for k in self.table.data}
            for key, o in sorted(point.operators.items()):
                table["operator"].append(key)
                hosts = broker.hosts.get(key, {})
                table["workers"].append(", ".join(sorted(metrics.name_of(w) for w in hosts)) or "none")
                table["rate"].append(o["rate"])
                table["p50"].append(_finite(o["p50"], _MS))
                table["p99"].append(_finite(o["p99"], _MS))
                table["errors"].append(o["errors"])
                table["queued"].append(o["queued"])
                table["slots"].append(f"{o['inflight']} / {o['limit']}")
                table["timeouts"].append(o.get("timeouts", 0))
                table["recoveries"].append(o.get("recoveries", 0))
            self.table.data = table
            self.operators_table.height = _table_height(len(table["operator"]))
        failures: dict[str, list[str]] = {"operator": [], "worker": [], "error": []}
        for name, by_worker in sorted(broker.failures.items()):
            for worker, message in sorted(by_worker.items()):
                failures["operator"].append(name)
                failures["worker"].append(metrics.name_of(worker))
                failures["error"].append(message)
        if failures != dict(self.failures.data):
            self.failures.data = failures
            self.failures_table.visible = bool(failures["operator"])
            self.failures_table.height = _table_height(len(failures["operator"]))
        hosted = sum(1 for hosts in broker.hosts.values() if hosts)
        self.header.text = (
            f"<b>tdask</b>: {hosted} operators on {len(metrics.workers)} workers"
            f"{f', <b>{sum(len(f) for f in broker.failures.values())} setup failures</b>' if broker.failures else ''}"
            " &middot; Prometheus: <a href='metrics'>/metrics</a> (cluster-wide; each worker serves its own)"
            " &middot; <a href='tdask/operators.json'>operators.json</a>"
        )


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
