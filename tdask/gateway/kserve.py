"""The KServe v2 <-> tdask mapping both frontends share: datatypes, tensors, parameters, errors.

Mapping (both protocols):

- **model** ``m`` version ``v`` (or none) is operator ``m`` version ``v`` (default 1); an
  operator that no worker hosts is an unknown model (HTTP 404, gRPC ``NOT_FOUND``) at once.
- **tensors**: every KServe datatype numpy has (``BOOL``, ``INT*``, ``UINT*``, ``FP16/32/64``,
  ``BYTES`` as an object array of ``bytes``); outputs take the datatype of their numpy dtype.
- **parameters**: request parameters pass through as tdask request parameters, except Triton's
  reserved ones; ``timeout`` (microseconds, as in Triton) becomes the request's timeout.
  Response parameters pass back.
- **errors**: :class:`~tdask.exceptions.InvalidRequestError` is HTTP 400 / ``INVALID_ARGUMENT``,
  :class:`~tdask.exceptions.RequestTimeoutError` 504 / ``DEADLINE_EXCEEDED``,
  :class:`~tdask.exceptions.OperatorUnavailableError` 503 / ``UNAVAILABLE``, any other error
  500 / ``INTERNAL``; the message names operator and request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from tdask.exceptions import (
    InvalidRequestError,
    OperatorUnavailableError,
    RequestTimeoutError,
)
from tdask.protocol import pack_bytes, unpack_bytes
from tdask.remote import USE_DEFAULT

__all__ = [
    "RESERVED_PARAMETERS",
    "UnknownModelError",
    "datatype_of",
    "raw_bytes",
    "split_parameters",
    "status_of",
    "to_array",
]


# Triton's own request parameters: they steer Triton, not the model, so they are not forwarded.
RESERVED_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "binary_data",
        "binary_data_size",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "triton_enable_empty_final_response",
        "shared_memory_region",
        "shared_memory_byte_size",
        "shared_memory_offset",
        "classification",
    }
)


class UnknownModelError(OperatorUnavailableError):
    """No worker hosts the operator a KServe request names."""


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of a numpy array (``BYTES`` for object and bytes arrays)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    datatype = np_to_triton_dtype(array.dtype)
    if datatype is None:
        raise TypeError(f"dtype {array.dtype} has no KServe datatype")
    return str(datatype)


def to_array(name: str, datatype: str, shape: list[int], raw: Any) -> np.ndarray:
    """A KServe tensor in raw form (Triton's binary layout) as a numpy array; ``ValueError`` if malformed."""
    if datatype == "BYTES":
        return unpack_bytes(raw, [int(d) for d in shape])
    dtype = triton_to_np_dtype(datatype)
    if dtype is None or datatype == "BF16":
        raise ValueError(f"input {name!r}: datatype {datatype!r} is not supported")
    array = np.frombuffer(raw, dtype=dtype)
    try:
        return array.reshape([int(d) for d in shape])
    except ValueError:
        raise ValueError(f"input {name!r}: {array.size} elements do not fill shape {list(shape)}") from None


def raw_bytes(array: np.ndarray) -> bytes | memoryview:
    """A numpy array in Triton's binary layout (BYTES length-prefixed)."""
    if array.dtype.kind in "OSU":
        return pack_bytes(np.asarray(array, dtype=object))
    return np.require(array, requirements="C").data.cast("B")


def split_parameters(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The parameters to forward, and the timeout (seconds) Triton's ``timeout`` (microseconds) asks for."""
    forwarded = {k: v for k, v in parameters.items() if k not in RESERVED_PARAMETERS}
    timeout = parameters.get("timeout")
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return forwarded, timeout / 1e6
    return forwarded, USE_DEFAULT


def status_of(exc: BaseException) -> tuple[int, str]:
    """HTTP status and gRPC status name of an error."""
    if isinstance(exc, UnknownModelError):
        return 404, "NOT_FOUND"
    if isinstance(exc, (InvalidRequestError, ValueError, TypeError)):
        return 400, "INVALID_ARGUMENT"
    if isinstance(exc, (RequestTimeoutError, asyncio.TimeoutError)):
        return 504, "DEADLINE_EXCEEDED"
    if isinstance(exc, OperatorUnavailableError):
        return 503, "UNAVAILABLE"
    return 500, "INTERNAL"
