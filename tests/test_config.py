"""tdask's settings: defaults from tdask.yaml, overrides the Dask ways, one snapshot per request."""

from __future__ import annotations

import json
import subprocess
import sys

import dask

from tdask.config import RequestSettings


def test_snapshot_follows_dask_config_set():
    before = RequestSettings.read()
    assert before.max_retries == 2 and before.inline_threshold == 64 * 1024
    with dask.config.set({"tdask.request.timeout": "250ms", "tdask.request.max_retries": 5}):
        inside = RequestSettings.read()
    assert inside.timeout_s == 0.25 and inside.max_retries == 5
    assert RequestSettings.read() == before
    with dask.config.set({"tdask.request.timeout": None}):
        assert RequestSettings.read().timeout_s is None


def test_snapshot_follows_environment_variables():
    """DASK_TDASK__... variables arrive with underscores in the key names; they must still apply."""
    code = (
        "import json, tdask; from tdask.config import RequestSettings as S; "
        "s = S.read(); print(json.dumps([s.unavailable_timeout_s, s.inline_threshold, s.max_input_bytes]))"
    )
    env = {
        "DASK_TDASK__REQUEST__UNAVAILABLE_TIMEOUT": "120s",
        "DASK_TDASK__DATA_PLANE__INLINE_THRESHOLD": "1KiB",
        "DASK_TDASK__REQUEST__MAX_INPUT_BYTES": "2MiB",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env={**_env(), **env}, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [120, 1024, 2 * 2**20]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}


def test_gc_threshold_is_applied_checked_or_left_alone():
    """tdask.worker.gc-threshold: applied as given, left alone for null, refused (naming the key)
    when it is not 1 to 3 non-negative integers."""
    import gc

    import pytest

    from tdask.host.plugin import set_gc_threshold

    before = gc.get_threshold()
    try:
        assert set_gc_threshold([12345, 7, 9]) == (12345, 7, 9) == gc.get_threshold()
        assert set_gc_threshold(None) == (12345, 7, 9)  # null: as it was
        for bad in ("20000", [1, 2, 3, 4], [-1], [1.5], []):
            with pytest.raises(ValueError, match="tdask.worker.gc-threshold"):
                set_gc_threshold(bad)
        assert gc.get_threshold() == (12345, 7, 9)
    finally:
        gc.set_threshold(*before)
