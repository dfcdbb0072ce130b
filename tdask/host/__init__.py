"""The worker host: everything tdask runs inside a Dask worker.

=========== ===================================================================================
module      role
=========== ===================================================================================
``plugin``  :class:`OperatorHost`, the worker plugin: builds operators, owns the worker's Triton
            server, wires the planes, registers, tears down
``serving`` slots, batches, cancellation and answers
``preload`` ``dask worker --preload tdask.worker`` (``tdask.worker`` re-exports its ``dask_setup``)
=========== ===================================================================================
"""

from tdask.host.plugin import PLUGIN_NAME, OperatorHost

__all__ = ["PLUGIN_NAME", "OperatorHost"]
