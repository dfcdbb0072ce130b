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
    SchedulerLostError,
    TdaskError,
)
from tdask.protocol import pack_bytes, unpack_bytes
from tdask.protocol.signature import config_dims
from tdask.remote import USE_DEFAULT

__all__ = [
    "EXTENSIONS",
    "RESERVED_PARAMETERS",
    "UnknownModelError",
    "UnsupportedError",
    "datatype_of",
    "generate_inputs",
    "generate_outputs",
    "model_config",
    "model_metadata",
    "model_statistics",
    "raw_bytes",
    "repository_index",
    "split_parameters",
    "status_of",
    "to_array",
]

#: The KServe / Triton protocol extensions the gateway implements, on both protocols alike
#: (``model_repository``: the index, and load / unload of the Triton models the deployment
#: hosts). Not listed (answered with a KServe error that says so): ``system_shared_memory`` and
#: ``cuda_shared_memory`` (status answers "none registered"), ``trace``, ``logging``,
#: ``classification``, ``sequence``, ``schedule_policy``.
EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration", "model_repository", "statistics", "generate")


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


class UnsupportedError(TdaskError):
    """A KServe / Triton endpoint the gateway does not implement (HTTP 501, gRPC ``UNIMPLEMENTED``)."""


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
    if isinstance(exc, UnsupportedError):
        return 501, "UNIMPLEMENTED"
    if isinstance(exc, (InvalidRequestError, ValueError, TypeError)):
        return 400, "INVALID_ARGUMENT"
    if isinstance(exc, (RequestTimeoutError, asyncio.TimeoutError)):
        return 504, "DEADLINE_EXCEEDED"
    if isinstance(exc, (OperatorUnavailableError, SchedulerLostError, OSError)):  # OSError: a peer is gone
        return 503, "UNAVAILABLE"
    return 500, "INTERNAL"


# -- metadata, config, statistics, index ----------------------------------------------------

#: Operators whose workers declare no signature: shown with no tensors (nothing is known of them).
UNDECLARED: dict[str, Any] = {
    "platform": "tdask",
    "backend": "tdask",
    "max_batch_size": 0,
    "decoupled": False,
    "inputs": [],
    "outputs": [],
}


def model_metadata(name: str, versions: list[str], signature: Mapping[str, Any] | None) -> dict[str, Any]:
    """KServe's model metadata (HTTP JSON form) of operator ``name`` from its signature."""
    sig = signature or UNDECLARED
    return {
        "name": name,
        "versions": versions,
        "platform": sig["platform"],
        "inputs": [{"name": t["name"], "datatype": t["datatype"], "shape": list(t["shape"])} for t in sig["inputs"]],
        "outputs": [{"name": t["name"], "datatype": t["datatype"], "shape": list(t["shape"])} for t in sig["outputs"]],
    }


def _config_tensor(signature: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    datatype = "STRING" if spec["datatype"] == "BYTES" else spec["datatype"]
    out: dict[str, Any] = {"name": spec["name"], "data_type": f"TYPE_{datatype}", "dims": config_dims(signature, spec)}
    if spec.get("optional"):
        out["optional"] = True
    return out


def model_config(name: str, signature: Mapping[str, Any] | None) -> dict[str, Any]:
    """Triton's model config (its JSON form, as ``GET .../config`` answers) of operator ``name``.

    Only what the signature knows: platform, backend, ``max_batch_size``, inputs and outputs
    (dims without the batch dim), and the decoupled transaction policy.
    """
    sig = signature or UNDECLARED
    config: dict[str, Any] = {
        "name": name,
        "platform": sig["platform"],
        "backend": sig["backend"],
        "max_batch_size": sig["max_batch_size"],
        "input": [_config_tensor(sig, t) for t in sig["inputs"]],
        "output": [_config_tensor(sig, t) for t in sig["outputs"]],
    }
    if sig.get("decoupled"):
        config["model_transaction_policy"] = {"decoupled": True}
    return config


# Outcomes that are not failures (tdask.scheduler.cluster_metrics.NOT_ERRORS, and "ok").
_NOT_FAILED = frozenset({"ok", "cancelled", "not_answered"})


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(seconds * 1e9)}


def model_statistics(key: str, reports: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Triton's statistics of one model (operator ``key`` = ``name/version``) from tdask's counts.

    ``reports`` are the serving counters of ``key`` from every worker that hosts it
    (:meth:`tdask.host.serving.Serving.stats`). ``success`` and ``fail`` count final answers and
    their time from arrival on the worker to the answer; ``queue`` is the time waiting for a slot
    and ``compute_infer`` the execution, both over every answered request (tdask times them for
    all answers, Triton for successful ones); ``inference_count`` and ``execution_count`` are the
    successful requests (tdask counts requests, not the batches they ran in).
    """
    name, _, version = key.rpartition("/")
    ok = fail = 0
    ok_s = fail_s = 0.0
    wait_n = wait_s = exec_n = exec_s = 0.0
    last = 0.0
    for report in reports:
        outcomes = report.get("outcomes") or {}
        seconds = report.get("outcome_seconds") or {}
        for outcome, n in outcomes.items():
            if outcome == "ok":
                ok += int(n)
                ok_s += float(seconds.get(outcome, 0.0))
            elif outcome not in _NOT_FAILED:
                fail += int(n)
                fail_s += float(seconds.get(outcome, 0.0))
        latency = report.get("latency") or {}
        wait, execute = latency.get("wait") or [], latency.get("execute") or []
        if wait:
            wait_n, wait_s = wait_n + sum(wait[:-1]), wait_s + wait[-1]
        if execute:
            exec_n, exec_s = exec_n + sum(execute[:-1]), exec_s + execute[-1]
        last = max(last, float(report.get("last_ok") or 0.0))
    zero = _duration(0, 0.0)
    return {
        "name": name,
        "version": version,
        "last_inference": int(last * 1000),
        "inference_count": ok,
        "execution_count": ok,
        "inference_stats": {
            "success": _duration(ok, ok_s),
            "fail": _duration(fail, fail_s),
            "queue": _duration(wait_n, wait_s),
            "compute_input": dict(zero),
            "compute_infer": _duration(exec_n, exec_s),
            "compute_output": dict(zero),
            "cache_hit": dict(zero),
            "cache_miss": dict(zero),
        },
        "response_stats": {},
        "batch_stats": [],
        "memory_usage": [],
    }


def repository_index(table: Mapping[str, Any], *, ready_only: bool = False) -> list[dict[str, Any]]:
    """Triton's repository index from the registry (``Registry.operators``).

    Operators some worker serves are ``READY``; the others (setup failed on every worker that
    tried, workers all left, model unloaded on every host) ``UNAVAILABLE`` with the registry's
    reason (with ``ready_only``: left out).
    """
    states: Mapping[str, Mapping[str, Any]] = table.get("operators") or {
        key: {"name": key.rpartition("/")[0], "version": key.rpartition("/")[2], "state": "ready"}
        for key in table.get("hosts") or {}
    }
    entries = []
    for _, state in sorted(states.items()):
        ready = state.get("state") == "ready"
        if ready_only and not ready:
            continue
        version = state.get("version")
        entries.append(
            {
                "name": str(state["name"]),
                "version": "" if version is None else str(version),
                "state": "READY" if ready else "UNAVAILABLE",
                "reason": "" if ready else str(state.get("reason") or state.get("state")),
            }
        )
    return entries


# -- generate (Triton's generate extension) --------------------------------------------------

#: JSON values' datatypes when the operator declares no signature.
_JSON_TYPES = ((bool, "BOOL"), (int, "INT64"), (float, "FP64"), (str, "BYTES"))


def _json_datatype(name: str, value: Any) -> str:
    first = value
    while isinstance(first, list):
        if not first:
            raise ValueError(f"input {name!r}: an empty list has no datatype; declare the operator's inputs")
        first = first[0]
    for kind, datatype in _JSON_TYPES:
        if isinstance(first, kind):
            return datatype
    raise ValueError(f"input {name!r}: {type(first).__name__} is not a tensor value")


def _json_array(name: str, value: Any, dtype: np.dtype[Any], datatype: str) -> np.ndarray:
    """JSON numbers as ``dtype``, refusing what does not fit (numpy 1 wraps integers silently)."""
    try:
        raw = np.asarray(value)
        if raw.dtype.kind not in "biuf" or (dtype.kind in "iu" and raw.dtype.kind == "f"):
            raise ValueError
        if dtype.kind in "iu" and raw.size:
            info = np.iinfo(dtype)
            if int(raw.min()) < info.min or int(raw.max()) > info.max:
                raise ValueError
        return raw.astype(dtype)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"input {name!r}: {str(value)[:100]!r} is not {datatype}") from None


def generate_inputs(body: Any, signature: Mapping[str, Any] | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The inputs and parameters of a ``generate`` request body; ``ValueError`` if malformed.

    Every key but ``parameters`` (and ``id``) is an input; its datatype is the signature's (else
    guessed from JSON: string ``BYTES``, int ``INT64``, float ``FP64``, bool ``BOOL``); a scalar is
    a tensor of shape ``[1]``, and a batch dim of 1 is added where the signature has one the
    value lacks.
    """
    if not isinstance(body, dict):
        raise ValueError("a generate request is a JSON object of input names to values")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError("'parameters' must be a JSON object")
    declared = {t["name"]: t for t in (signature or UNDECLARED)["inputs"]}
    batched = bool((signature or UNDECLARED)["max_batch_size"])
    inputs = {}
    for name, value in body.items():
        if name in ("parameters", "id"):
            continue
        spec = declared.get(name)
        datatype = spec["datatype"] if spec is not None else _json_datatype(name, value)
        if datatype == "BYTES":
            flat = np.asarray(value, dtype=object)
            # Strings only: bytes(N) of a number would allocate N bytes.
            if not all(isinstance(x, str) for x in flat.reshape(-1)):
                raise ValueError(f"input {name!r}: BYTES values must be strings")
            array = np.array([x.encode() for x in flat.reshape(-1)], dtype=object).reshape(flat.shape)
        else:
            dtype = triton_to_np_dtype(datatype)
            if dtype is None or datatype == "BF16":
                raise ValueError(f"input {name!r}: datatype {datatype!r} is not supported")
            array = _json_array(name, value, np.dtype(dtype), datatype)
        if array.ndim == 0:
            array = array.reshape(1)
        if spec is not None and batched and array.ndim == len(spec["shape"]) - 1:
            array = array.reshape((1, *array.shape))
        inputs[name] = array
    return inputs, dict(parameters)


def _json_value(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if array.dtype.kind in "OSU":
        values: list[Any] = [
            bytes(x).decode("utf-8", "replace") if isinstance(x, (bytes, np.bytes_)) else str(x) for x in flat
        ]
    else:
        values = flat.tolist()
    return values[0] if len(values) == 1 else values


def generate_outputs(
    name: str, version: str | None, outputs: Mapping[str, Any], parameters: Mapping[str, Any]
) -> dict[str, Any]:
    """One ``generate`` answer: every output by name (a one-element tensor as its value, strings decoded)."""
    body: dict[str, Any] = {"model_name": name, "model_version": version or "1"}
    for output, value in outputs.items():
        body[output] = _json_value(np.asarray(value))
    if parameters:
        body["parameters"] = dict(parameters)
    return body
