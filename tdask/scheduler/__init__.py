"""What runs on the scheduler: the broker, the cluster-wide metrics and tdask's dashboard page.

================== ==========================================================================
module             role
================== ==========================================================================
``broker``         :class:`RequestBroker`, a ``SchedulerPlugin``: the operator registry, the
                   queue plane's per-operator queues, leases and credits
``cluster_metrics`` the cluster-wide view of the workers' metrics (the scheduler's ``/metrics``)
                   and the dashboard's history
``dashboard``      the ``/tdask`` page in the Dask dashboard, and ``/tdask/operators.json``
================== ==========================================================================

Installed by the first caller or worker that needs it
(:meth:`tdask.request_plane.registry.Registry.ensure_broker`), so a plain ``dask scheduler``
works. Nothing here knows a worker host, an operator, Triton or a caller.
"""

from __future__ import annotations

from tdask.scheduler.broker import BROKER_NAME, RequestBroker

__all__ = ["BROKER_NAME", "RequestBroker"]
