"""Reading Triton's in-process responses into numpy arrays (:class:`ResponseReader`).

Outputs of at least :data:`ADOPT_MIN_BYTES` in buffers the C shim's allocator handed to Triton
are not copied: :class:`~tdask.triton.shim.BufferOwner` makes the buffer the array's memory, and
returns it to the shim's pool when the array is collected. Smaller outputs, BYTES tensors and
buffers from the Python callbacks' allocator are copied out.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_bool, c_char_p, c_double, c_int, c_int64, c_size_t, c_uint32, c_uint64, c_void_p
from typing import Any

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from tdask.triton.capi import (
    DATATYPES,
    MEMORY_CPU,
    PARAM_BOOL,
    PARAM_DOUBLE,
    PARAM_INT,
    PARAM_STRING,
    TritonCApi,
)
from tdask.triton.shim import BufferOwner

__all__ = ["ADOPT_MIN_BYTES", "ResponseReader"]

# Outputs from this size on are handed out without a copy (BufferOwner); smaller ones are copied
# (a copy of a few KiB costs less than the finalizer an adopted buffer needs).
ADOPT_MIN_BYTES = 64 * 1024


class ResponseReader:
    """Reads a ``TRITONSERVER_InferenceResponse`` into numpy arrays; one per thread that reads.

    Its out-parameters are made once and reused by every call (the hot path of a request).
    With ``buffers`` (the C shim's), outputs of at least :data:`ADOPT_MIN_BYTES` in buffers the
    shim allocated are handed out without a copy; the rest are copied out.
    """

    def __init__(self, buffers: BufferOwner | None = None) -> None:
        self.buffers = buffers
        self._name, self._type, self._shape = c_char_p(), c_int(), POINTER(c_int64)()
        self._dims, self._base, self._size = c_uint64(), c_void_p(), c_size_t()
        self._count, self._pvalue = c_uint32(), c_void_p()
        self._memory_type, self._userp = c_int(), c_void_p()
        outs = (
            self._name,
            self._type,
            self._shape,
            self._dims,
            self._base,
            self._size,
            self._memory_type,
            c_int64(),
            self._userp,
        )
        self._keep = outs  # the byref()s below point into these
        self._output_args = tuple(ctypes.byref(o) for o in outs)

    def read(
        self, api: TritonCApi, fn: Any, response: int
    ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, Any]]:
        """The response's outputs (copied out), their Triton datatypes and its parameters.

        Raises
        ------
        TritonCError
            The response is an error (the model's, or Triton's).
        """
        err = fn.InferenceResponseError(response)
        if err:
            raise api.error(err)
        check = api.check
        count = self._count
        check(fn.InferenceResponseOutputCount(response, ctypes.byref(count)))
        outputs: dict[str, np.ndarray] = {}
        datatypes: dict[str, str] = {}
        args = self._output_args
        for index in range(count.value):
            check(fn.InferenceResponseOutput(response, index, *args))
            name = (self._name.value or b"").decode()
            datatype = DATATYPES[self._type.value]
            shape = self._shape[: self._dims.value]
            size = self._size.value
            buffers = self.buffers
            if (
                buffers is not None
                and size >= ADOPT_MIN_BYTES
                and datatype != "BYTES"
                and self._userp.value == buffers.tag
                and self._memory_type.value == MEMORY_CPU
            ):
                array = buffers.take(self._base.value or 0, size, triton_to_np_dtype(datatype), shape)
            else:
                raw = ctypes.string_at(self._base.value or 0, size) if size else b""
                if datatype == "BYTES":
                    array = deserialize_bytes_tensor(raw).reshape(shape)
                else:
                    array = np.frombuffer(raw, dtype=triton_to_np_dtype(datatype)).reshape(shape)
            outputs[name] = array
            datatypes[name] = datatype
        parameters: dict[str, Any] = {}
        check(fn.InferenceResponseParameterCount(response, ctypes.byref(count)))
        for index in range(count.value):
            ptype, value = c_int(), self._pvalue
            check(
                fn.InferenceResponseParameter(
                    response, index, ctypes.byref(self._name), ctypes.byref(ptype), ctypes.byref(value)
                )
            )
            key = (self._name.value or b"").decode()
            address = value.value or 0
            if ptype.value == PARAM_STRING:
                parameters[key] = ctypes.string_at(address).decode(errors="replace")
            elif ptype.value == PARAM_INT:
                parameters[key] = c_int64.from_address(address).value
            elif ptype.value == PARAM_BOOL:
                parameters[key] = c_bool.from_address(address).value
            elif ptype.value == PARAM_DOUBLE:
                parameters[key] = c_double.from_address(address).value
        return outputs, datatypes, parameters
