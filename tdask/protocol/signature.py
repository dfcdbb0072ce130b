"""An operator's signature: the tensors it takes and gives, defined once for every side.

A worker publishes each hosted operator's signature with its registration (the scheduler's
registry keeps it); the gateway shows it as KServe model metadata and config, and checks
requests against it before they travel. It is a small plain dict (msgpack-friendly)::

    {
        "platform": "tdask",          # as Triton shows a model's (e.g. "python", "onnxruntime_onnx")
        "backend": "tdask",           # Triton's config "backend" ("" when it has none)
        "max_batch_size": 0,          # > 0: the first dim of every tensor is the batch dim
        "decoupled": False,           # streams any number of responses per request
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4], "optional": False}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }

Shapes are as Triton's model *metadata* shows them: ``-1`` is any size, and with
``max_batch_size > 0`` the batch dim is included (as ``-1``); Triton's *config* dims leave it out
(:func:`config_dims`). Datatypes are KServe names (``BYTES`` for strings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DATATYPES",
    "check_inputs",
    "config_dims",
    "make_signature",
    "normalize_signature",
    "tensor_spec",
    "triton_signature",
]

#: The KServe datatypes a signature may name.
DATATYPES = frozenset(
    {
        "BOOL",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
        "BYTES",
    }
)


def tensor_spec(value: Any, *, where: str = "signature") -> dict[str, Any]:
    """One tensor of a signature in its normal form, ``{"name", "datatype", "shape"[, "optional"]}``.

    Parameters
    ----------
    value
        A mapping with ``name``, ``datatype`` and ``shape`` (and optionally ``optional``), or a
        tuple ``(name, datatype, shape)``.
    where
        Named in error messages (the operator, and whether an input or output).

    Raises
    ------
    ValueError
        A missing or malformed field, or a datatype KServe does not have.
    """
    if isinstance(value, Mapping):
        spec = dict(value)
    elif isinstance(value, (tuple, list)) and len(value) == 3:
        spec = {"name": value[0], "datatype": value[1], "shape": value[2]}
    else:
        raise ValueError(f"{where}: a tensor is a mapping or (name, datatype, shape), got {value!r}")
    unknown = set(spec) - {"name", "datatype", "shape", "optional"}
    if unknown:
        raise ValueError(f"{where}: unknown tensor keys {sorted(unknown)}")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tensor needs a non-empty string 'name', got {name!r}")
    if not isinstance(datatype, str) or datatype.upper() not in DATATYPES:
        raise ValueError(f"{where}: tensor {name!r} has datatype {datatype!r}, not one of {sorted(DATATYPES)}")
    if not isinstance(shape, (list, tuple)) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < -1 for d in shape
    ):
        raise ValueError(f"{where}: tensor {name!r} needs a 'shape' of ints >= -1 (-1: any size), got {shape!r}")
    out: dict[str, Any] = {"name": name, "datatype": datatype.upper(), "shape": [int(d) for d in shape]}
    if spec.get("optional"):
        out["optional"] = True
    return out


def make_signature(
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    *,
    platform: str = "tdask",
    backend: str = "tdask",
    max_batch_size: int = 0,
    decoupled: bool = False,
    where: str = "signature",
) -> dict[str, Any]:
    """A signature from its parts (see the module docstring); ``ValueError`` if malformed."""
    specs_in = [tensor_spec(t, where=f"{where} input") for t in inputs]
    specs_out = [tensor_spec(t, where=f"{where} output") for t in outputs]
    for kind, specs in (("input", specs_in), ("output", specs_out)):
        names = [s["name"] for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: {kind} names repeat: {names}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ValueError(f"{where}: max_batch_size must be an int >= 0, got {max_batch_size!r}")
    if max_batch_size > 0:
        for spec in specs_in + specs_out:
            if not spec["shape"] or spec["shape"][0] != -1:
                raise ValueError(
                    f"{where}: with max_batch_size {max_batch_size}, tensor {spec['name']!r} needs -1 "
                    f"(the batch dim) first in its shape, got {spec['shape']}"
                )
    return {
        "platform": str(platform),
        "backend": str(backend),
        "max_batch_size": max_batch_size,
        "decoupled": bool(decoupled),
        "inputs": specs_in,
        "outputs": specs_out,
    }


def normalize_signature(value: Any, *, where: str = "signature") -> dict[str, Any] | None:
    """A signature as received (from a worker's registration): normalized, or ``None`` if absent."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: a signature is a mapping, got {type(value).__name__}")
    return make_signature(
        value.get("inputs") or [],
        value.get("outputs") or [],
        platform=value.get("platform", "tdask"),
        backend=value.get("backend", "tdask"),
        max_batch_size=value.get("max_batch_size", 0),
        decoupled=value.get("decoupled", False),
        where=where,
    )


def config_dims(signature: Mapping[str, Any], spec: Mapping[str, Any]) -> list[int]:
    """A tensor's dims as Triton's *config* shows them (without the batch dim)."""
    shape = list(spec["shape"])
    return shape[1:] if signature.get("max_batch_size", 0) > 0 else shape


def triton_signature(metadata: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The signature of a Triton model, from its model metadata and config (Triton's JSON forms).

    Shapes come from the metadata (batch dim included, as Triton shows it); ``optional`` inputs,
    ``max_batch_size``, ``backend`` and whether the model is decoupled from the config.
    """
    optional = {i.get("name") for i in config.get("input", []) if i.get("optional")}
    inputs = [
        {
            "name": i["name"],
            "datatype": i["datatype"],
            "shape": [int(d) for d in i.get("shape", [])],
            "optional": i["name"] in optional,
        }
        for i in metadata.get("inputs", [])
    ]
    outputs = [
        {"name": o["name"], "datatype": o["datatype"], "shape": [int(d) for d in o.get("shape", [])]}
        for o in metadata.get("outputs", [])
    ]
    return make_signature(
        inputs,
        outputs,
        platform=str(metadata.get("platform") or config.get("platform") or ""),
        backend=str(config.get("backend") or ""),
        max_batch_size=int(config.get("max_batch_size", 0) or 0),
        decoupled=bool((config.get("model_transaction_policy") or {}).get("decoupled")),
        where=f"Triton model {metadata.get('name', '?')!r}",
    )


def check_inputs(
    signature: Mapping[str, Any], model: str, given: Mapping[str, tuple[str, Sequence[int]]]
) -> str | None:
    """What is wrong with a request's inputs for ``signature``, or ``None`` when they fit.

    Parameters
    ----------
    signature
        The operator's signature (one with no inputs declared accepts anything).
    model
        The operator's name, for the message.
    given
        Each input's KServe datatype and shape.

    Returns
    -------
    str or None
        One message naming every input at fault: unknown names, missing required inputs, another
        datatype, another rank or size (``-1`` dims take any size), a batch over ``max_batch_size``.
    """
    declared = {spec["name"]: spec for spec in signature.get("inputs", [])}
    if not declared:
        return None
    problems = []
    unknown = sorted(set(given) - set(declared))
    if unknown:
        problems.append(
            f"model {model!r} has no input {', '.join(map(repr, unknown))} (its inputs: {sorted(declared)})"
        )
    missing = [name for name, spec in declared.items() if name not in given and not spec.get("optional")]
    if missing:
        problems.append(f"missing input {', '.join(map(repr, missing))}")
    max_batch = int(signature.get("max_batch_size", 0) or 0)
    for name, (datatype, shape) in given.items():
        spec = declared.get(name)
        if spec is None:
            continue
        dims = spec["shape"]
        if datatype != spec["datatype"]:
            problems.append(f"input {name!r} is {datatype}, model {model!r} expects {spec['datatype']}")
        elif len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape, strict=True)):
            problems.append(
                f"input {name!r} has shape {list(shape)}, model {model!r} expects {list(dims)} (-1: any size)"
            )
        elif max_batch > 0 and shape and shape[0] > max_batch:
            problems.append(
                f"input {name!r} has a batch of {shape[0]}, model {model!r} takes at most {max_batch} (max_batch_size)"
            )
    return "; ".join(problems) if problems else None
