"""The completions of in-process Triton requests, and the C shim that keeps them off the GIL.

Triton calls the response allocator and the completion callbacks from its own threads. With the
optional C shim (``_inprocess_shim.c``, compiled on first use when a C compiler exists, or ahead
of use by ``python -m tdask.triton.capi --build-shim``; ``tdask.triton.in-process-shim``) none
of them enters Python: they queue events and wake the event loop through an eventfd once per
batch (:class:`Completions`). Without it, Python callbacks do the same, each taking the GIL on a
Triton thread. A shim is verified (its SHA-256 stamp) before it is mapped, and rebuilt once when
it is not what was built. :class:`BufferOwner` hands the shim's output buffers to numpy arrays.
The C API binding itself is :mod:`tdask.triton.capi`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable
from ctypes import (
    POINTER,
    Structure,
    c_int,
    c_int64,
    c_size_t,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Any

import numpy as np

from tdask.triton.capi import ALLOC_FN, COMPLETE_FN, KIND_RELEASE, KIND_RESPONSE, MEMORY_CPU, RELEASE_FN, TritonCApi

logger = logging.getLogger(__name__)

__all__ = ["BufferOwner", "Completions", "ShimError", "build_shim", "find_shim", "load_shim", "verify_shim"]


# --------------------------------------------------------------------------- completions


class _Event(Structure):
    _fields_ = [("kind", c_int64), ("flags", c_int64), ("ptr", c_void_p), ("userp", c_void_p)]


_SHIM_SOURCE = Path(__file__).with_name("_inprocess_shim.c")
_DRAIN_MAX = 256


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tdask"


def shim_path(directory: Path) -> Path:
    """Where the shim of this source version lives in ``directory`` (its name carries the source's hash)."""
    digest = hashlib.sha256(_SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    return directory / f"tdask_inprocess_shim-{digest}.so"


def find_shim() -> Path | None:
    """The C shim already built for this source: in ``$TDASK_SHIM_DIR``, the package's directory or the cache."""
    places = [Path(os.environ["TDASK_SHIM_DIR"])] if os.environ.get("TDASK_SHIM_DIR") else []
    for place in [*places, _SHIM_SOURCE.parent, _cache_dir()]:
        if shim_path(place).is_file():
            return shim_path(place)
    return None


#: The shim's functions (each checked after loading, besides its content hash).
SHIM_SYMBOLS = (
    "tdask_init",
    "tdask_drain",
    "tdask_pool_stats",
    "tdask_adopt",
    "tdask_free_adopted",
    "tdask_buffer_tag",
    "tdask_alloc",
    "tdask_release",
    "tdask_response_complete",
    "tdask_request_release",
)
#: Bound on one compile of the shim.
SHIM_BUILD_TIMEOUT_S = 60.0
#: How long a starting server waits for a compile (in a thread) before using Python callbacks;
#: the compile goes on and the next start uses it.
SHIM_START_WAIT_S = 10.0


class ShimError(Exception):
    """The shim file cannot be used (absent, not what was built, or lacking a symbol)."""


def stamp_path(shim: Path) -> Path:
    """The file beside ``shim`` recording the SHA-256 of its content, written when it was built."""
    return shim.with_name(shim.name + ".sha256")


def verify_shim(path: Path) -> bytes:
    """Return the shim's content when it is exactly what was built (its stamp's hash).

    Nothing of the file is mapped or executed here: a truncated, garbled, empty or foreign
    file (another library) is told apart from the one built by its content hash, recorded
    beside it at build (:func:`stamp_path`), so that loading it cannot crash the process.

    Raises
    ------
    ShimError
        The file or its stamp is missing, or the hash differs.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ShimError(f"cannot read it ({exc})") from exc
    try:
        recorded = stamp_path(path).read_text().split()[0]
    except (OSError, IndexError) as exc:
        raise ShimError(f"no build stamp {stamp_path(path).name}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != recorded:
        raise ShimError(
            f"its content ({len(data)} bytes, sha256 {digest[:12]}) is not what was built ({recorded[:12]})"
        )
    if not data.startswith(b"\x7fELF"):
        raise ShimError("not an ELF file")
    return data


_LOADED: dict[str, ctypes.CDLL] = {}  # content hash -> the process's copy


def _dlopen_verified(path: Path, data: bytes) -> ctypes.CDLL:
    """``dlopen`` the verified ``data`` from a private copy (a memfd), not the shared file.

    What is mapped then cannot change under the process (another process rebuilding, or
    truncating, the shared file), which would otherwise raise SIGBUS in it.
    """
    digest = hashlib.sha256(data).hexdigest()
    lib = _LOADED.get(digest)
    if lib is not None:
        return lib
    try:
        fd = os.memfd_create("tdask_inprocess_shim", 0)
    except (AttributeError, OSError):
        lib = ctypes.CDLL(str(path))  # verified just now; no private copy on this platform
    else:
        try:
            os.write(fd, data)
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)  # the mapping stays
    missing = [name for name in SHIM_SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise ShimError(f"lacks {', '.join(missing)}")
    _LOADED[digest] = lib
    return lib


def _compile(target: Path, compiler: str) -> None:
    """Compile the shim into ``target`` with its stamp; both replaced atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(_SHIM_SOURCE), "-lpthread"],
            check=True,
            capture_output=True,
            timeout=SHIM_BUILD_TIMEOUT_S,
        )
        os.chmod(built, 0o755)
        stamp = Path(tmp) / "stamp"
        stamp.write_text(f"{hashlib.sha256(built.read_bytes()).hexdigest()}  {target.name}\n")
        os.replace(built, target)  # atomic: concurrent builders each install a whole file
        os.replace(stamp, stamp_path(target))


def build_shim(directory: Path | None = None) -> Path | None:
    """Return a verified C shim, compiling it when needed; ``None`` when there is none.

    Looked for, in order: ``$TDASK_SHIM_DIR``, the installed package's own directory (where a
    container image builds it: ``python -m tdask.triton.capi --build-shim``), the user's cache
    (``~/.cache/tdask``), where it is compiled on first use. With ``directory``, it is built
    there (if not there yet) and nowhere else is looked at. A file found that fails
    verification (:func:`verify_shim`) is rebuilt once, in its directory (or, read-only, in the
    cache). Builds hold a lock file beside the shim (one compile per host at a time) and are
    bounded by :data:`SHIM_BUILD_TIMEOUT_S`. The build is optional: a failed or impossible one
    is logged, naming the file, and the Python callbacks serve.
    """
    if directory is None:
        found = find_shim()
        directory = found.parent if found is not None else _cache_dir()
    target = shim_path(directory)
    try:
        verify_shim(target)
        return target
    except ShimError as exc:
        why = None if not target.exists() else str(exc)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning(
            "no C compiler to build tdask's C shim (%s%s): Triton's callbacks run in Python, each taking the GIL; "
            "build it once with `python -m tdask.triton.capi --build-shim`",
            target,
            f": {why}" if why else "",
        )
        return None
    for place in dict.fromkeys([directory, _cache_dir()]):
        target = shim_path(place)
        try:
            place.mkdir(parents=True, exist_ok=True)
            with open(place / f".{target.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one compile at a time; the others then verify it
                try:
                    verify_shim(target)
                    return target  # another process built it meanwhile
                except ShimError:
                    pass
                if why:
                    logger.warning("tdask's C shim %s is unusable (%s): rebuilding it", target, why)
                _compile(target, compiler)
            verify_shim(target)
        except PermissionError:
            continue  # a read-only directory (an image's package): build into the cache instead
        except (OSError, subprocess.SubprocessError, ShimError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            logger.warning(
                "could not build tdask's C shim %s (%s %s); using Python callbacks", target, exc, detail[-400:]
            )
            return None
        logger.info("built tdask's C shim %s", target)
        return target
    logger.warning("could not build tdask's C shim %s (no writable directory); using Python callbacks", target)
    return None


def load_shim(wait_s: float | None = None) -> tuple[ctypes.CDLL | None, Path | None]:
    """Load a verified shim for this process; ``(None, file)`` when it cannot (logged once, naming it).

    A shim already built and verified loads at once. Otherwise it is built (:func:`build_shim`)
    in a thread, waited for at most ``wait_s`` (default :data:`SHIM_START_WAIT_S`), so that a
    slow or hanging compiler delays a server's start by that much at most; the build goes on
    and a later start uses it. A file that loads but lacks a symbol is rebuilt once.
    """
    wait = SHIM_START_WAIT_S if wait_s is None else wait_s
    found = find_shim()
    if found is not None:
        try:
            data: bytes | None = verify_shim(found)
        except ShimError:
            data = None  # build_shim rebuilds it, saying why
        if data is not None:
            try:
                return _dlopen_verified(found, data), found
            except (ShimError, OSError) as exc:
                logger.warning("tdask's C shim %s is unusable (%s): rebuilding it", found, exc)
                with contextlib.suppress(OSError):
                    stamp_path(found).unlink()
    done: list[Path | None] = []

    def build() -> None:
        try:
            done.append(build_shim())
        except Exception:  # never let a build break a server's start
            logger.exception("building tdask's C shim failed; using Python callbacks")
            done.append(None)

    thread = threading.Thread(target=build, name="tdask-shim-build", daemon=True)
    thread.start()
    thread.join(wait)
    if not done:
        where = shim_path(found.parent if found is not None else _cache_dir())
        logger.warning(
            "tdask's C shim %s is still compiling after %gs; using Python callbacks (a later start uses it)",
            where,
            wait,
        )
        return None, where
    built = done[0]
    if built is None:
        return None, found  # build_shim logged why
    try:
        return _dlopen_verified(built, verify_shim(built)), built
    except (ShimError, OSError) as exc:
        logger.warning("tdask's C shim %s is unusable (%s); using Python callbacks", built, exc)
        return None, built


class Completions:
    """Triton's callbacks for tdask's requests, and the hand-off of their events to one event loop.

    ``on_events(events)`` runs on the loop with every event queued since the last call, each
    ``(kind, flags, pointer, token)``: kind :data:`KIND_RESPONSE` (a response, or ``None`` with
    only the final flag) or :data:`KIND_RELEASE` (Triton released the request). ``token`` is the
    integer given as the request's user pointer.

    Parameters
    ----------
    api
        The loaded library.
    use_shim
        Whether to build and use the C shim; ``False`` (or no compiler) uses Python callbacks.
    """

    def __init__(self, api: TritonCApi, *, use_shim: bool = True) -> None:
        self.api = api
        self._shim: ctypes.CDLL | None = None
        path: Path | None = None
        if use_shim:
            self._shim, path = load_shim()
        if self._shim is not None:
            logger.info("Triton's callbacks: tdask's C shim %s (no GIL taken on Triton's threads)", path)
        else:
            why = "tdask.triton.in-process-shim is false" if not use_shim else "no shim could be built or loaded"
            logger.info("Triton's callbacks: Python (each takes the GIL on a Triton thread): %s", why)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_events: Callable[[list[tuple[int, int, int | None, int]]], None] | None = None
        self._fd = -1
        self._pending: collections.deque[tuple[int, int, int | None, int]] = collections.deque()
        self._scheduled = False
        self._keep: list[Any] = []
        if self._shim is not None:
            shim = self._shim
            shim.tdask_init.argtypes = [c_int, c_void_p, c_size_t]
            shim.tdask_drain.argtypes = [POINTER(_Event), c_size_t]
            shim.tdask_drain.restype = c_size_t
            shim.tdask_pool_stats.argtypes = [POINTER(c_uint64), POINTER(c_uint64)]
            shim.tdask_adopt.argtypes = [c_void_p]
            shim.tdask_adopt.restype = None
            shim.tdask_free_adopted.argtypes = [c_void_p]
            shim.tdask_free_adopted.restype = None
            shim.tdask_buffer_tag.restype = c_void_p
            self.buffers: BufferOwner | None = BufferOwner(shim)
            self.alloc_fn = ctypes.cast(shim.tdask_alloc, c_void_p).value
            self.release_fn = ctypes.cast(shim.tdask_release, c_void_p).value
            self.complete_fn = ctypes.cast(shim.tdask_response_complete, c_void_p).value
            self.request_release_fn = ctypes.cast(shim.tdask_request_release, c_void_p).value
            self._events = (_Event * _DRAIN_MAX)()
        else:
            libc = ctypes.CDLL(None)
            malloc, free = libc.malloc, libc.free
            malloc.restype, malloc.argtypes = c_void_p, [c_size_t]
            free.restype, free.argtypes = None, [c_void_p]

            def alloc(_a, _n, size, _t, _i, _u, buffer, buffer_userp, actual_type, actual_id):  # type: ignore[no-untyped-def]
                buffer[0] = malloc(size) if size else None
                buffer_userp[0] = None
                actual_type[0] = MEMORY_CPU
                actual_id[0] = 0
                return None

            def release(_a, buffer, _u, _s, _t, _i):  # type: ignore[no-untyped-def]
                if buffer:
                    free(buffer)
                return None

            def complete(response, flags, userp):  # type: ignore[no-untyped-def]
                self._push((KIND_RESPONSE, flags, response, userp or 0))

            def request_release(request, flags, userp):  # type: ignore[no-untyped-def]
                self._push((KIND_RELEASE, flags, request, userp or 0))

            self.buffers = None  # outputs are copied out of malloc'd buffers
            callbacks = [ALLOC_FN(alloc), RELEASE_FN(release), COMPLETE_FN(complete), COMPLETE_FN(request_release)]
            self._keep = callbacks  # ctypes callbacks must outlive every call Triton makes
            self.alloc_fn, self.release_fn, self.complete_fn, self.request_release_fn = (
                ctypes.cast(c, c_void_p).value for c in callbacks
            )

    @property
    def native(self) -> bool:
        """Whether the C shim serves (no callback enters Python)."""
        return self._shim is not None

    def pool_stats(self) -> tuple[int, int]:
        """The shim's buffer pool: (hits, misses); (0, 0) without the shim."""
        if self._shim is None:
            return 0, 0
        hits, misses = c_uint64(), c_uint64()
        self._shim.tdask_pool_stats(ctypes.byref(hits), ctypes.byref(misses))
        return hits.value, misses.value

    def start(
        self, loop: asyncio.AbstractEventLoop, on_events: Callable[[list[tuple[int, int, int | None, int]]], None]
    ) -> None:
        """Deliver events to ``on_events`` on ``loop`` from now on."""
        self._loop, self._on_events = loop, on_events
        if self._shim is not None:
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            error_new = ctypes.cast(self.api.fn.ErrorNew, c_void_p).value  # type: ignore[arg-type]
            if self._shim.tdask_init(self._fd, error_new, 1024) != 0:
                raise MemoryError("tdask's C shim could not allocate its event queue")
            loop.add_reader(self._fd, self._drain_native)

    def stop(self) -> None:
        """Stop delivering (the queue keeps what Triton still sends; nothing reads it)."""
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._on_events = None

    def _drain_native(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        assert self._shim is not None
        events = self._events
        while True:
            n = self._shim.tdask_drain(events, _DRAIN_MAX)
            if not n:
                return
            batch = [(e.kind, e.flags, e.ptr, e.userp or 0) for e in events[:n]]
            if self._on_events is not None:
                self._on_events(batch)

    # Python-callback path: runs on Triton's threads (holding the GIL).
    def _push(self, event: tuple[int, int, int | None, int]) -> None:
        self._pending.append(event)
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain_python)
            except RuntimeError:  # loop closed: nobody waits any more
                self._scheduled = False

    def _drain_python(self) -> None:
        self._scheduled = False
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        if batch and self._on_events is not None:
            self._on_events(batch)


# --------------------------------------------------------------------------- responses


class BufferOwner:
    """Hands a response's output buffer (from the C shim's allocator) to a numpy array.

    The array then owns the buffer: deleting the response leaves it alone, and when the array
    (and every view of it) is collected the buffer goes back to the shim's pool.
    """

    def __init__(self, shim: ctypes.CDLL) -> None:
        self._adopt = shim.tdask_adopt
        self._free = shim.tdask_free_adopted
        self.tag = shim.tdask_buffer_tag()
        self.adopted = 0  # buffers handed out so far
        self.adopted_bytes = 0

    def take(self, address: int, size: int, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
        """A read-only array over the buffer at ``address`` (of a response not deleted yet)."""
        self._adopt(address)
        memory = (ctypes.c_char * size).from_address(address)
        weakref.finalize(memory, self._free, address)
        array = np.frombuffer(memoryview(memory).cast("B"), dtype=dtype).reshape(shape)
        array.flags.writeable = False
        self.adopted += 1
        self.adopted_bytes += size
        return array
