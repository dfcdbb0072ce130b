"""A ctypes binding of Triton's in-process C API (``libtritonserver``), for :mod:`tdask.triton.inprocess`.

The library is the one bundled in the ``nvidia-pytriton`` wheel (``nvidia_pytriton.libs/
libtritonserver-*.so``, C API 1.34, Triton 2.51) or ``$TDASK_LIBTRITONSERVER``, or a container
install's ``/opt/tritonserver/lib/libtritonserver.so``. Only the functions tdask calls are
declared, with their exact C signatures (``include/triton/core/tritonserver.h``).

Why not the official ``tritonserver`` Python package: its wheels (PyPI 2.5x-2.7x) carry a
pybind11 extension built against the ``libtritonserver`` of their own release and load that
one; there is none for 2.51 that works with the library bundled here, and mixing two cores in
one process is not supported. A ctypes binding of the stable C API needs no compiler and works
with whichever core is installed (the API version is checked at load).

The completions of requests (Triton's callbacks) and the optional C shim that takes them off
the GIL live in :mod:`tdask.triton.shim`; ``python -m tdask.triton.capi --build-shim`` builds the
shim ahead of use (what the container images run).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable
from ctypes import (
    CFUNCTYPE,
    POINTER,
    c_bool,
    c_char_p,
    c_double,
    c_int,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "API_VERSION",
    "TritonCApi",
    "TritonCError",
    "call_in_daemon_thread",
    "find_libtritonserver",
]

#: The C API version this binding is written against (major must match, minor at least this).
API_VERSION = (1, 34)

# TRITONSERVER_Error_Code
ERROR_UNKNOWN, ERROR_INTERNAL, ERROR_NOT_FOUND, ERROR_INVALID_ARG = 0, 1, 2, 3
ERROR_UNAVAILABLE, ERROR_UNSUPPORTED, ERROR_ALREADY_EXISTS, ERROR_CANCELLED = 4, 5, 6, 7
#: The HTTP status Triton's own HTTP endpoint gives each error code (http_server.cc), so that
#: the operator maps both modes' errors alike.
HTTP_STATUS = {ERROR_INTERNAL: 500, ERROR_NOT_FOUND: 404, ERROR_UNAVAILABLE: 503, ERROR_UNSUPPORTED: 501}
#: The gRPC status names of the same codes (for the streaming path's error mapping).
GRPC_CODE = {
    ERROR_INTERNAL: "INTERNAL",
    ERROR_NOT_FOUND: "NOT_FOUND",
    ERROR_INVALID_ARG: "INVALID_ARGUMENT",
    ERROR_UNAVAILABLE: "UNAVAILABLE",
    ERROR_UNSUPPORTED: "UNIMPLEMENTED",
    ERROR_ALREADY_EXISTS: "ALREADY_EXISTS",
    ERROR_CANCELLED: "CANCELLED",
}

# TRITONSERVER_DataType, by index
DATATYPES = ["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
DATATYPES += ["FP16", "FP32", "FP64", "BYTES", "BF16"]
DATATYPE_CODE = {name: code for code, name in enumerate(DATATYPES)}
# TRITONSERVER_ParameterType
PARAM_STRING, PARAM_INT, PARAM_BOOL, PARAM_DOUBLE, PARAM_BYTES = 0, 1, 2, 3, 4
MEMORY_CPU = 0
METRIC_PROMETHEUS = 0  # TRITONSERVER_MetricFormat
MODEL_CONTROL_EXPLICIT = 2
RESPONSE_FINAL = 1  # TRITONSERVER_RESPONSE_COMPLETE_FINAL
REQUEST_RELEASE_ALL = 1
TXN_DECOUPLED = 2  # TRITONSERVER_TXN_DECOUPLED
KIND_RESPONSE, KIND_RELEASE = 0, 1

_P = c_void_p
_PP = POINTER(c_void_p)
ALLOC_FN = CFUNCTYPE(c_void_p, _P, c_char_p, c_size_t, c_int, c_int64, _P, _PP, _PP, POINTER(c_int), POINTER(c_int64))
RELEASE_FN = CFUNCTYPE(c_void_p, _P, _P, _P, c_size_t, c_int, c_int64)
COMPLETE_FN = CFUNCTYPE(None, _P, c_uint32, _P)

# name: (restype, argtypes); restype None here means "returns TRITONSERVER_Error*".
_ERR = None
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "TRITONSERVER_ApiVersion": (_ERR, [POINTER(c_uint32), POINTER(c_uint32)]),
    "TRITONSERVER_ErrorNew": (c_void_p, [c_int, c_char_p]),
    "TRITONSERVER_ErrorDelete": (None, [_P]),
    "TRITONSERVER_ErrorCode": (c_int, [_P]),
    "TRITONSERVER_ErrorMessage": (c_char_p, [_P]),
    "TRITONSERVER_ServerOptionsNew": (_ERR, [_PP]),
    "TRITONSERVER_ServerOptionsDelete": (_ERR, [_P]),
    "TRITONSERVER_ServerOptionsSetServerId": (_ERR, [_P, c_char_p]),
    "TRITONSERVER_ServerOptionsSetModelRepositoryPath": (_ERR, [_P, c_char_p]),
    "TRITONSERVER_ServerOptionsSetModelControlMode": (_ERR, [_P, c_int]),
    "TRITONSERVER_ServerOptionsSetStrictReadiness": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetExitOnError": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetExitTimeout": (_ERR, [_P, c_uint32]),
    "TRITONSERVER_ServerOptionsSetLogFile": (_ERR, [_P, c_char_p]),
    "TRITONSERVER_ServerOptionsSetLogInfo": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetLogWarn": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetLogError": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetLogVerbose": (_ERR, [_P, c_int]),
    "TRITONSERVER_ServerOptionsSetMetrics": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetGpuMetrics": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetCpuMetrics": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetStrictModelConfig": (_ERR, [_P, c_bool]),
    "TRITONSERVER_ServerOptionsSetModelLoadRetryCount": (_ERR, [_P, c_uint32]),
    "TRITONSERVER_ServerOptionsSetModelLoadThreadCount": (_ERR, [_P, c_uint32]),
    "TRITONSERVER_ServerOptionsSetBackendDirectory": (_ERR, [_P, c_char_p]),
    "TRITONSERVER_ServerOptionsSetBackendConfig": (_ERR, [_P, c_char_p, c_char_p, c_char_p]),
    "TRITONSERVER_ServerNew": (_ERR, [_PP, _P]),
    "TRITONSERVER_ServerStop": (_ERR, [_P]),
    "TRITONSERVER_ServerSetExitTimeout": (_ERR, [_P, c_uint32]),
    "TRITONSERVER_ServerDelete": (_ERR, [_P]),
    "TRITONSERVER_ServerIsLive": (_ERR, [_P, POINTER(c_bool)]),
    "TRITONSERVER_ServerLoadModelWithParameters": (_ERR, [_P, c_char_p, _PP, c_uint64]),
    "TRITONSERVER_ServerUnloadModel": (_ERR, [_P, c_char_p]),
    "TRITONSERVER_ServerModelMetadata": (_ERR, [_P, c_char_p, c_int64, _PP]),
    "TRITONSERVER_ServerModelTransactionProperties": (_ERR, [_P, c_char_p, c_int64, POINTER(c_uint32), _PP]),
    "TRITONSERVER_ServerModelIndex": (_ERR, [_P, c_uint32, _PP]),
    "TRITONSERVER_ServerMetrics": (_ERR, [_P, _PP]),
    "TRITONSERVER_MetricsFormatted": (_ERR, [_P, c_int, POINTER(c_void_p), POINTER(c_size_t)]),
    "TRITONSERVER_MetricsDelete": (_ERR, [_P]),
    "TRITONSERVER_MessageSerializeToJson": (_ERR, [_P, POINTER(c_void_p), POINTER(c_size_t)]),
    "TRITONSERVER_MessageDelete": (_ERR, [_P]),
    "TRITONSERVER_ParameterNew": (c_void_p, [c_char_p, c_int, c_void_p]),
    "TRITONSERVER_ParameterDelete": (None, [_P]),
    "TRITONSERVER_ResponseAllocatorNew": (_ERR, [_PP, c_void_p, c_void_p, c_void_p]),
    "TRITONSERVER_ResponseAllocatorDelete": (_ERR, [_P]),
    "TRITONSERVER_InferenceRequestNew": (_ERR, [_PP, _P, c_char_p, c_int64]),
    "TRITONSERVER_InferenceRequestDelete": (_ERR, [_P]),
    "TRITONSERVER_InferenceRequestSetId": (_ERR, [_P, c_char_p]),
    "TRITONSERVER_InferenceRequestAddInput": (_ERR, [_P, c_char_p, c_int, POINTER(c_int64), c_uint64]),
    "TRITONSERVER_InferenceRequestAppendInputData": (_ERR, [_P, c_char_p, c_void_p, c_size_t, c_int, c_int64]),
    "TRITONSERVER_InferenceRequestSetStringParameter": (_ERR, [_P, c_char_p, c_char_p]),
    "TRITONSERVER_InferenceRequestSetIntParameter": (_ERR, [_P, c_char_p, c_int64]),
    "TRITONSERVER_InferenceRequestSetBoolParameter": (_ERR, [_P, c_char_p, c_bool]),
    "TRITONSERVER_InferenceRequestSetDoubleParameter": (_ERR, [_P, c_char_p, c_double]),
    "TRITONSERVER_InferenceRequestSetReleaseCallback": (_ERR, [_P, c_void_p, c_void_p]),
    "TRITONSERVER_InferenceRequestSetResponseCallback": (_ERR, [_P, _P, c_void_p, c_void_p, c_void_p]),
    "TRITONSERVER_InferenceRequestCancel": (_ERR, [_P]),
    "TRITONSERVER_ServerInferAsync": (_ERR, [_P, _P, _P]),
    "TRITONSERVER_InferenceResponseDelete": (_ERR, [_P]),
    "TRITONSERVER_InferenceResponseError": (_ERR, [_P]),
    "TRITONSERVER_InferenceResponseParameterCount": (_ERR, [_P, POINTER(c_uint32)]),
    "TRITONSERVER_InferenceResponseParameter": (
        _ERR,
        [_P, c_uint32, POINTER(c_char_p), POINTER(c_int), POINTER(c_void_p)],
    ),
    "TRITONSERVER_InferenceResponseOutputCount": (_ERR, [_P, POINTER(c_uint32)]),
    "TRITONSERVER_InferenceResponseOutput": (
        _ERR,
        [
            _P,
            c_uint32,
            POINTER(c_char_p),
            POINTER(c_int),
            POINTER(POINTER(c_int64)),
            POINTER(c_uint64),
            POINTER(c_void_p),
            POINTER(c_size_t),
            POINTER(c_int),
            POINTER(c_int64),
            POINTER(c_void_p),
        ],
    ),
}


class TritonCError(Exception):
    """A ``TRITONSERVER_Error``: Triton's code and message.

    Attributes
    ----------
    code : int
        The ``TRITONSERVER_Error_Code`` (3: INVALID_ARG, 4: UNAVAILABLE, 7: CANCELLED, ...).
    message : str
        Triton's text.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The status Triton's HTTP endpoint would have answered with."""
        return HTTP_STATUS.get(self.code, 400)

    @property
    def grpc_code(self) -> str:
        """The gRPC status name Triton's gRPC endpoint would have answered with."""
        return GRPC_CODE.get(self.code, "UNKNOWN")


def find_libtritonserver() -> Path:
    """Return the ``libtritonserver`` to load.

    ``$TDASK_LIBTRITONSERVER``, then ``/opt/tritonserver/lib/libtritonserver.so`` (a Triton
    install, e.g. NVIDIA's image: the same precedence over the wheel as the ``tritonserver``
    binary's lookup), then the nvidia-pytriton wheel's bundled copy.

    Raises
    ------
    FileNotFoundError
        None was found (the message says where it looked).
    """
    from tdask.triton.binary import _pytriton_bundle

    env = os.environ.get("TDASK_LIBTRITONSERVER")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"$TDASK_LIBTRITONSERVER={env!r} is not a file")
        return Path(env)
    opt = Path("/opt/tritonserver/lib/libtritonserver.so")
    if opt.is_file():  # a Triton install (NVIDIA's image) wins over the wheel, as for the binary
        return opt
    bundle = _pytriton_bundle()
    if bundle is not None and bundle.libs_dir is not None:
        found = sorted(bundle.libs_dir.glob("libtritonserver*.so*"))
        if found:
            return found[0]
    raise FileNotFoundError(
        "no libtritonserver found for Triton in the worker's process: set $TDASK_LIBTRITONSERVER, "
        "install the nvidia-pytriton wheel (which bundles one) or Triton in /opt/tritonserver"
    )


def _load_with_siblings(path: Path, depth: int = 0) -> ctypes.CDLL:
    """``dlopen`` a library whose dependencies may sit next to it without a RUNPATH saying so.

    The wheel's repaired libraries (``nvidia_pytriton.libs``) find one another only through
    ``LD_LIBRARY_PATH``, which cannot change in a running process: a dependency reported
    missing is loaded from the same directory first (by its soname), then the load is retried.
    """
    while True:
        try:
            return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            missing = str(exc).split(":", 1)[0].strip()
            sibling = path.parent / missing
            if depth > 32 or missing == path.name or not sibling.is_file():
                raise
            _load_with_siblings(sibling, depth + 1)


class _Functions:
    """The declared functions of one library handle (attribute per function, ``TRITONSERVER_`` dropped)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.restype = restype if restype is not None else c_void_p
            if name in ("TRITONSERVER_ErrorDelete", "TRITONSERVER_ParameterDelete"):
                function.restype = None
            function.argtypes = argtypes
            setattr(self, name.removeprefix("TRITONSERVER_"), function)

    def __getattr__(self, name: str) -> Callable[..., Any]:  # for mypy: attributes set above
        raise AttributeError(name)


class TritonCApi:
    """``libtritonserver`` loaded once per process, its API version checked.

    Attributes
    ----------
    path : Path
        The library.
    fn : object
        Its functions (``fn.ServerNew(...)``); ctypes releases the GIL around each call.
    hot : object
        The same functions through a handle that keeps the GIL during the call (cheaper for the
        many tiny calls of a request); safe only while no Triton thread needs the GIL, i.e.
        with the C shim's callbacks.
    """

    _instance: TritonCApi | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        # RTLD_GLOBAL: the backends Triton loads resolve their TRITONSERVER_* symbols in it.
        lib = _load_with_siblings(path)
        self.fn = _Functions(lib)
        self.hot = _Functions(ctypes.PyDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        major, minor = c_uint32(), c_uint32()
        self.check(self.fn.ApiVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)
        if major.value != API_VERSION[0] or minor.value < API_VERSION[1]:
            raise RuntimeError(
                f"{path}: Triton C API {major.value}.{minor.value}; tdask's in-process mode needs "
                f"{API_VERSION[0]}.{API_VERSION[1]} or a later 1.x"
            )

    @classmethod
    def load(cls) -> TritonCApi:
        """The process's one instance (loading a second core into a process is not supported)."""
        if cls._instance is None:
            cls._instance = cls(find_libtritonserver())
        return cls._instance

    def error(self, err: int) -> TritonCError:
        """Turn a non-NULL ``TRITONSERVER_Error*`` into a :class:`TritonCError`, deleting it."""
        code = int(self.fn.ErrorCode(err))
        message = (self.fn.ErrorMessage(err) or b"").decode(errors="replace")
        self.fn.ErrorDelete(err)
        return TritonCError(code, message)

    def check(self, err: int | None) -> None:
        """Raise :class:`TritonCError` when a call returned an error."""
        if err:
            raise self.error(err)


async def call_in_daemon_thread(call: Callable[..., Any], *args: Any, timeout_s: float | None) -> Any:
    """Run a blocking C call in its own daemon thread and await its result, at most ``timeout_s``.

    Not ``asyncio.to_thread``: a call Triton never returns from would hold a thread of the
    loop's default executor, whose shutdown (``asyncio.run``'s end, the process's exit) waits
    for it. A daemon thread is abandoned at exit instead.

    Raises
    ------
    TimeoutError
        The call did not return in ``timeout_s`` (it goes on in its thread).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = call(*args), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name=f"tdask-triton-{getattr(call, '__name__', 'call')}", daemon=True).start()
    return await asyncio.wait_for(asyncio.shield(future), timeout_s)


def main(argv: list[str] | None = None) -> int:
    """``python -m tdask.triton.capi --build-shim [--into DIR]``: build the C shim ahead of use.

    By default into the installed package's directory, where every worker of this Python finds
    it (a container image does this at build time, so that workers need no compiler); exit
    status 1 when it could not be built.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tdask.triton.capi", description="build tdask's C shim")
    parser.add_argument("--build-shim", action="store_true", help="compile the in-process mode's C shim")
    parser.add_argument("--into", type=Path, default=Path(__file__).parent, help="directory (default: the package's)")
    args = parser.parse_args(argv)
    if not args.build_shim:
        parser.print_help()
        return 2
    from tdask.triton.shim import build_shim  # the shim's module builds on this one

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build_shim(args.into)
    if built is None:
        return 1
    sys.stdout.write(f"{built}\n")  # a CLI: the path, for scripts
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
