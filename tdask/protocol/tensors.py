"""The tensor codec and the checks of what callers send and operators answer.

The codec builds and reads the entries of ``inputs`` and ``outputs``; :mod:`tdask.protocol`
lists their forms.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import numpy as np

from tdask.data_plane import RemoteTensor, count_host_copy
from tdask.exceptions import InvalidRequestError, OperatorError

# -- the tensor codec ----------------------------------------------------------------------

# Arrays that arrived inline keep their wire form, so that an orchestrator forwarding them
# unchanged does not serialize them again. Only read-only arrays (as decoded ones are) qualify,
# so a cached form can never go stale.
_wire_forms: dict[int, tuple[weakref.ref[Any], Mapping[str, Any]]] = {}


def _remember_wire_form(array: Any, entry: Mapping[str, Any]) -> None:
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        key = id(array)

        def forget(_: object, key: int = key) -> None:
            _wire_forms.pop(key, None)

        _wire_forms[key] = (weakref.ref(array, forget), entry)


# numpy dtypes whose bytes say everything (no objects, no structured fields): sent as
# [dtype.str, shape, bytes]. Structured dtypes send their field list instead of dtype.str.
_PLAIN_KINDS = frozenset("biufcmMSU")


def _dtype_form(dtype: np.dtype[Any]) -> Any:
    """A dtype as plain data: its ``str`` (``"<i8"``), or for structured ones its field list."""
    if dtype.fields is None and dtype.subdtype is None:
        return dtype.str
    return _plain_descr(dtype.descr)


def _plain_descr(descr: Any) -> Any:
    # numpy's descr: [(name, format or nested descr[, shape])]; as lists, for msgpack.
    return [
        [f[0], f[1] if isinstance(f[1], str) else _plain_descr(f[1]), *([list(f[2])] if len(f) > 2 else [])]
        for f in descr
    ]


# Plain dtypes by their wire form (``"<i8"``): a lookup where np.dtype() parses the string.
_PLAIN_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype_from_form(form: Any) -> np.dtype[Any]:
    """Inverse of :func:`_dtype_form`, from plain strings, lists and ints only (never a pickle)."""
    if type(form) is str:
        known = _PLAIN_DTYPES.get(form)
        if known is not None:
            return known
    if isinstance(form, str):
        dtype = np.dtype(form)
        if not dtype.hasobject and len(_PLAIN_DTYPES) < 256:
            _PLAIN_DTYPES[form] = dtype
    elif isinstance(form, (list, tuple)):
        dtype = np.dtype([_field_from_form(field) for field in form])
    else:
        raise ValueError(f"a dtype must be a string or a field list, got {type(form).__name__}")
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects, which tdask never decodes")
    return dtype


def _field_from_form(field: Any) -> tuple[Any, ...]:
    if not isinstance(field, (list, tuple)) or len(field) not in (2, 3) or not isinstance(field[0], (str, list, tuple)):
        raise ValueError(f"malformed dtype field {str(field)[:100]!r}")
    name = field[0] if isinstance(field[0], str) else tuple(str(n) for n in field[0])  # (title, name)
    fmt = field[1]
    if not isinstance(fmt, str):
        fmt = [_field_from_form(f) for f in fmt]
    if len(field) == 3:
        shape = field[2]
        if not isinstance(shape, (list, tuple)) or not all(type(n) is int for n in shape):
            raise ValueError(f"malformed dtype field shape {str(shape)[:100]!r}")
        return (name, fmt, tuple(shape))
    return (name, fmt)


def _is_cupy(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def encode_inline(array: Any) -> Mapping[str, Any]:
    """A small tensor as a message entry, in an array-only form (never pickled).

    numpy arrays travel as ``{"nd": [dtype, shape, bytes]}`` (0.8 us to encode 8 KB and 0.6 us
    back, against 5 and 4 us through Dask's ``serialize()``, which pickles the array's type into
    every header); cupy arrays as ``{"cu": [dtype, shape, bytes]}``, copied to the host (they are
    small: large ones stay in the store and move device to device).
    """
    known = _wire_forms.get(id(array))
    if known is not None and known[0]() is array and isinstance(array, np.ndarray) and not array.flags.writeable:
        return known[1]  # the array this id named is still alive: the form is its own
    if isinstance(array, np.ndarray):
        if array.dtype.kind == "O":
            return {"bt": [list(array.shape), pack_bytes(array)]}
        contiguous = np.require(array, requirements="C")
        form = contiguous.dtype.str if contiguous.dtype.kind in _PLAIN_KINDS else _dtype_form(contiguous.dtype)
        return {"nd": [form, list(contiguous.shape), contiguous.reshape(-1).view(np.uint8).data]}
    if _is_cupy(array):
        import cupy

        host = np.require(cupy.asnumpy(array), requirements="C")
        count_host_copy(host.nbytes, "inline cupy: device to host")
        return {"cu": [_dtype_form(host.dtype), list(host.shape), host.reshape(-1).view(np.uint8).data]}
    raise TypeError(f"cannot send a {type(array).__name__} inline; expected a numpy or cupy array")


def pack_bytes(array: np.ndarray) -> bytes:
    """An object array of ``bytes``/``str`` in Triton's BYTES serialization (no pickle).

    Each element, in C order, is a little-endian uint32 length followed by its bytes (``str``
    elements are UTF-8 encoded). Raises ``TypeError`` for any other element.
    """
    parts: list[bytes] = []
    pack = struct.Struct("<I").pack
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode()
        elif not isinstance(item, bytes):
            raise TypeError(f"an object tensor may hold only bytes or str, not {type(item).__name__}")
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def unpack_bytes(data: Any, shape: list[int]) -> np.ndarray:
    """Inverse of :func:`pack_bytes`: an object array of ``bytes`` of ``shape``.

    The element count the shape declares is checked against the data before anything is
    allocated (each element takes at least its 4-byte length): a small message cannot make the
    decoder allocate a large array. ``ValueError`` for a malformed tensor.
    """
    view = memoryview(data).cast("B")
    count = 1
    for dim in shape:
        if int(dim) < 0:
            raise ValueError(f"BYTES tensor shape {list(shape)[:8]} has a negative dimension")
        count *= int(dim)
    if count * 4 > len(view):
        raise ValueError(f"BYTES tensor truncated: {count} elements announced in {len(view)} bytes")
    out = np.empty(count, dtype=object)
    offset, end = 0, len(view)
    unpack = struct.Struct("<I").unpack_from
    for i in range(count):
        if offset + 4 > end:
            raise ValueError(f"BYTES tensor truncated: {count} elements announced, {i} found")
        (length,) = unpack(view, offset)
        offset += 4
        if offset + length > end:
            raise ValueError(f"BYTES tensor truncated: element {i} announces {length} bytes")
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise ValueError(f"BYTES tensor has {end - offset} bytes after its {count} elements")
    return out.reshape(shape)


def decode_inline(entry: Mapping[str, Any]) -> Any:
    """Inverse of :func:`encode_inline`; refuses anything else (:class:`InvalidRequestError`).

    Only array forms are decoded: a dtype given as plain data, a shape of ints and the bytes
    (or, for BYTES tensors, a shape and length-prefixed elements). Nothing a peer sends is ever
    unpickled (Dask's serialization, which pickles types and objects, is not accepted here).
    """
    strings = entry.get("bt")
    if strings is not None:
        try:
            return _decode_strings(strings)
        except Exception as exc:
            raise InvalidRequestError(f"cannot decode a BYTES tensor: {exc}") from None
    for kind in ("nd", "cu"):
        form = entry.get(kind)
        if form is not None:
            try:
                return _decode_array(kind, form)
            except InvalidRequestError:
                raise
            except Exception as exc:  # a malformed or hostile entry: refuse it, name why
                raise InvalidRequestError(f"cannot decode an inline tensor: {exc}") from None
    raise InvalidRequestError(
        f"unknown tensor entry {sorted(map(str, entry))[:4]}: tdask accepts only its array forms "
        "('nd', 'bt', 'cu', 'ref'); pickled or Dask-serialized objects are refused"
    )


def _decode_strings(form: Any) -> np.ndarray:
    if not isinstance(form, (list, tuple)) or len(form) != 2:
        raise ValueError("expected [shape, bytes]")
    shape, data = form
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"malformed shape {str(shape)[:100]!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"the data must be bytes, got {type(data).__name__}")
    count = 1
    for dim in shape:
        count *= dim
    if count * 4 > len(data):  # each element takes at least its 4-byte length
        raise ValueError(f"{count} elements announced in {len(data)} bytes")
    return unpack_bytes(data, list(shape))


def _decode_array(kind: str, form: Any) -> Any:
    if not isinstance(form, (list, tuple)) or len(form) != 3:
        raise ValueError("expected [dtype, shape, bytes]")
    dtype_form, shape, data = form
    dtype = _dtype_from_form(dtype_form)
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"malformed shape {str(shape)[:100]!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"the data must be bytes, got {type(data).__name__}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if kind == "nd":
        return array
    try:
        import cupy
    except ImportError:
        raise InvalidRequestError("a cupy tensor arrived, but cupy is not installed here") from None
    count_host_copy(array.nbytes, "inline cupy: host to device")
    return cupy.asarray(array)


Place = Callable[[Any], Awaitable[RemoteTensor]]


async def encode_tensors(
    tensors: Mapping[str, Any], place: Place, threshold: int
) -> tuple[dict[str, Any], list[RemoteTensor]]:
    """Turn arrays and descriptors into message entries.

    Arrays above ``threshold`` bytes, and device (cupy) arrays of any size, are handed to
    ``place`` (an async callable storing them and returning a descriptor): a device tensor stays
    on its device and moves through the data plane (device to device over UCX), never through
    host bytes in a message. Returns the entries and the descriptors created here.
    """
    entries: dict[str, Any] = {}
    placed: list[RemoteTensor] = []
    for name, value in tensors.items():
        if isinstance(value, RemoteTensor):
            entries[name] = {"ref": value.to_msg()}
        elif (value.nbytes <= threshold and not _is_cupy(value)) or value.dtype.kind == "O":  # BYTES: always inline
            entries[name] = encode_inline(value)
        else:
            tensor = await place(value)
            placed.append(tensor)
            entries[name] = {"ref": tensor.to_msg()}
    return entries, placed


def decode_tensors(entries: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_tensors`: read-only arrays for inline entries, descriptors for the rest.

    Raises :class:`InvalidRequestError` for an entry that is not one of tdask's tensor forms.
    """
    out: dict[str, Any] = {}
    for name, entry in entries.items():
        if type(entry) is not dict and not isinstance(entry, Mapping):
            raise InvalidRequestError(f"tensor {str(name)[:100]!r} is not a tensor entry")
        if "ref" not in entry:
            array = decode_inline(entry)
            if isinstance(array, np.ndarray):
                array.flags.writeable = False  # inputs are read-only: copy before changing one
            _remember_wire_form(array, entry)
            out[name] = array
        else:
            out[name] = _descriptor(name, entry["ref"])
    return out


def _descriptor(name: Any, ref: Any) -> RemoteTensor:
    try:
        tensor = RemoteTensor.from_msg(ref)
        if not (isinstance(tensor.owner, str) and isinstance(tensor.tensor_id, str) and isinstance(tensor.nbytes, int)):
            raise TypeError("owner and id must be strings, nbytes an int")
    except Exception as exc:
        raise InvalidRequestError(f"tensor {str(name)[:100]!r}: malformed descriptor ({exc})") from None
    return tensor


def refs_in(entries: Mapping[str, Any] | None) -> list[RemoteTensor]:
    """The descriptors among encoded entries (to release what nobody will read)."""
    return [RemoteTensor.from_msg(e["ref"]) for e in (entries or {}).values() if "ref" in e]


def tensors_in(values: Iterable[Any]) -> list[RemoteTensor]:
    """The descriptors among decoded values."""
    return [v for v in values if isinstance(v, RemoteTensor)]


# -- checks of what callers send and operators answer --------------------------------------


def is_array(value: Any) -> bool:
    """True for numpy arrays and for device arrays that Dask can serialize (cupy)."""
    if isinstance(value, np.ndarray):
        return True
    return type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "__cuda_array_interface__")


_SCALARS = (str, int, float, bool)


def _not_bytes(array: np.ndarray) -> str | None:
    """The type name of the first element of an object array that is neither bytes nor str."""
    for item in array.reshape(-1):
        if not isinstance(item, (bytes, str)):
            return type(item).__name__
    return None


def check_inputs(operator: str, request_id: str, inputs: Mapping[str, Any] | None, max_bytes: int) -> dict[str, Any]:
    """A caller's inputs as C-contiguous arrays and descriptors; :class:`InvalidRequestError` if not."""
    if inputs is None:
        return {}
    if type(inputs) is not dict and not isinstance(inputs, Mapping):  # dict first: an ABC check is slow
        raise InvalidRequestError(
            f"inputs must be a mapping of names to arrays, got {type(inputs).__name__}",
            operator=operator,
            request_id=request_id,
        )
    out: dict[str, Any] = {}
    total = 0
    for name, value in inputs.items():
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"input name {name!r} is not a string", operator=operator, request_id=request_id)
        if isinstance(value, RemoteTensor):
            out[name] = value
            total += value.nbytes
            continue
        if not is_array(value):
            raise InvalidRequestError(
                f"input {name!r} is a {type(value).__name__}, expected a numpy/cupy array or RemoteTensor",
                operator=operator,
                request_id=request_id,
            )
        if value.dtype.kind == "O":
            bad = _not_bytes(value)
            if bad is not None:
                raise InvalidRequestError(
                    f"input {name!r} has dtype object holding a {bad}; object tensors may hold only bytes or str",
                    operator=operator,
                    request_id=request_id,
                )
        if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
            value = np.require(value, requirements="C")  # keeps 0-d arrays 0-d
        out[name] = value
        total += int(value.nbytes)
    if total > max_bytes:
        raise InvalidRequestError(
            f"inputs total {total} bytes, over the limit of {max_bytes} (tdask.request.max-input-bytes)",
            operator=operator,
            request_id=request_id,
        )
    return out


def check_parameters(operator: str, request_id: str, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """A caller's request parameters (str keys, str/int/float/bool values); :class:`InvalidRequestError` if not."""
    if parameters is None:
        return {}
    if type(parameters) is not dict and not isinstance(parameters, Mapping):
        raise InvalidRequestError(
            f"parameters must be a mapping, got {type(parameters).__name__}", operator=operator, request_id=request_id
        )
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise InvalidRequestError(
                f"parameter name {key!r} is not a string", operator=operator, request_id=request_id
            )
        if not isinstance(value, _SCALARS):
            raise InvalidRequestError(
                f"parameter {key!r} is a {type(value).__name__}; parameters must be str, int, float or bool",
                operator=operator,
                request_id=request_id,
            )
    return dict(parameters)


def check_outputs(operator: str, request_id: str, outputs: Mapping[str, Any]) -> None:
    """Refuse outputs that are not arrays or tensor descriptors (:class:`OperatorError` naming the culprit)."""
    for name, value in outputs.items():
        if not isinstance(name, str):
            raise OperatorError(f"output name {name!r} is not a string", operator=operator, request_id=request_id)
        if not (is_array(value) or isinstance(value, RemoteTensor)):
            raise OperatorError(
                f"output {name!r} is a {type(value).__name__}, expected a numpy/cupy array or RemoteTensor",
                operator=operator,
                request_id=request_id,
            )
        if isinstance(value, np.ndarray) and value.dtype.kind == "O":
            bad = _not_bytes(value)
            if bad is not None:
                raise OperatorError(
                    f"output {name!r} has dtype object holding a {bad}; object tensors may hold only bytes or str",
                    operator=operator,
                    request_id=request_id,
                )


def check_response_parameters(operator: str, request_id: str, parameters: Mapping[str, Any]) -> None:
    """Refuse response parameters that are not str/int/float/bool (:class:`OperatorError`)."""
    for key, value in parameters.items():
        if not isinstance(key, str) or not isinstance(value, _SCALARS):
            raise OperatorError(
                f"response parameter {key!r}={value!r} is not a str/int/float/bool",
                operator=operator,
                request_id=request_id,
            )
