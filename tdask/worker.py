"""The preload entry point: ``dask worker ... --preload tdask.worker --tdask-operator '{...}'``.

The code lives in :mod:`tdask.host.preload`; this module keeps the documented preload name.
"""

from tdask.host.preload import dask_setup, parse_operator_option

__all__ = ["dask_setup", "parse_operator_option"]
