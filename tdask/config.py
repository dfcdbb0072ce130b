"""tdask's defaults in ``dask.config`` (keys under ``tdask.``), and a visible ``tdask`` logger.

Imported first by ``tdask/__init__.py``. Every setting can be overridden the Dask way:
``dask.config.set({"tdask.request.timeout": "5s"})`` or ``DASK_TDASK__REQUEST__TIMEOUT=5s``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dask.config
import distributed  # noqa: F401  (loads distributed.admin.log-format)
import yaml
from dask.utils import parse_bytes, parse_timedelta

_defaults_path = os.path.join(os.path.dirname(__file__), "tdask.yaml")
with open(_defaults_path) as f:
    _defaults = yaml.safe_load(f)

dask.config.update_defaults(_defaults)


# Settings are read when they are needed (a request snapshots its own once, RequestSettings), so
# that dask.config.set applies to the next request; parsing is memoized by value.
_parse_bytes = functools.lru_cache(maxsize=256)(parse_bytes)
_parse_seconds = functools.lru_cache(maxsize=256)(functools.partial(parse_timedelta, default="seconds"))


def get_seconds(key: str) -> float | None:
    """Read a duration setting (``"5s"``, ``10``, ``null``) as seconds."""
    return _seconds(dask.config.get(key))


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)):
        return float(value)
    return _parse_seconds(value)


def get_bytes(key: str) -> int:
    """Read a size setting (``"64KiB"``, ``65536``) as bytes."""
    value = dask.config.get(key)
    return value if isinstance(value, int) else _parse_bytes(value)


def _install_log_handler() -> None:
    """Give the ``tdask`` logger a stderr handler in Dask's format unless one exists.

    distributed installs handlers only for the loggers named in its own logging config, so
    without this, tdask's lines would vanish inside ``dask worker``.
    """
    logger = logging.getLogger("tdask")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False


_install_log_handler()


@dataclass(frozen=True, slots=True)
class RequestSettings:
    """The settings one request needs, read once when it is made (not at every step)."""

    timeout_s: float | None
    unavailable_timeout_s: float
    rehost_timeout_s: float
    max_retries: int
    max_input_bytes: int
    inline_threshold: int

    @classmethod
    def read(cls) -> RequestSettings:
        """Snapshot ``tdask.request.*`` and the inline threshold from ``dask.config`` now.

        One lookup of the ``tdask`` subtree; the parsed snapshot is cached by the raw values, so
        ``dask.config.set`` still applies to the next request and a request pays no parsing.
        """
        tree = dask.config.get("tdask")
        request, data_plane = _key(tree, "request"), _key(tree, "data-plane")
        return _request_settings(
            _key(request, "timeout"),
            _key(request, "unavailable-timeout"),
            _key(request, "rehost-timeout"),
            _key(request, "max-retries"),
            _key(request, "max-input-bytes"),
            _key(data_plane, "inline-threshold"),
        )


def _key(tree: Any, name: str) -> Any:
    """``tree[name]``, spelt with hyphens or underscores (``DASK_TDASK__...`` variables give underscores)."""
    try:
        return tree[name]
    except KeyError:
        return tree[name.replace("-", "_")]


@functools.lru_cache(maxsize=64)
def _request_settings(
    timeout: Any, unavailable: Any, rehost: Any, max_retries: Any, max_input: Any, inline: Any
) -> RequestSettings:
    return RequestSettings(
        timeout_s=_seconds(timeout),
        unavailable_timeout_s=_seconds(unavailable) or 0.0,
        rehost_timeout_s=_seconds(rehost) or 0.0,
        max_retries=int(max_retries),
        max_input_bytes=max_input if isinstance(max_input, int) else _parse_bytes(max_input),
        inline_threshold=inline if isinstance(inline, int) else _parse_bytes(inline),
    )
