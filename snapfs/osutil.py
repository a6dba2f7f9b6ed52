"""Small OS helpers that several layers need, each written once: the C library for the
calls Python lacks (``openat2``, ``fallocate`` with a mode, ``ioprio_*``,
``sync_file_range``, ``malloc_trim``), an
exclusive flock that answers EBUSY, and the atomic replacement of a file (temporary
file, fsync, rename, fsync of the directory).

Everything here blocks (file I/O, fsync): in the daemon, call it from a worker thread.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import os
from collections.abc import Callable

from .errors import SnapfsError

# one handle on the C library for every ctypes call; ``syscall`` returns a long
LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
LIBC.syscall.restype = ctypes.c_long


SYNC_FILE_RANGE_WRITE = 2
LIBC.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]


def write_back(fd: int) -> None:
    """Start writing back every dirty page of ``fd`` (``sync_file_range``: no wait for
    it, no journal commit). OSError on failure."""
    if LIBC.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the kernel (``malloc_trim(0)``: every
    arena, free pages inside the heap too, not only its top). Without it, the daemon's
    RSS keeps the high-water mark of every burst (a full backup's read-ahead, parallel
    1 MiB requests in 32 threads' arenas) for the rest of its life. No-op where the C
    library has no ``malloc_trim`` (musl)."""
    trim = getattr(LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def lock_exclusive(fd: int, what: str, busy: Callable[[], str]) -> int:
    """Take an exclusive flock on ``fd`` without waiting and return ``fd``; the lock goes
    with the open file, so a crash releases it. When someone holds it: ``fd`` is
    closed and SnapfsError(EBUSY, ``busy()``); another failure closes ``fd`` and names
    ``what``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SnapfsError(errno.EBUSY, busy()) from None
        raise SnapfsError.from_oserror(exc, f"locking {what}") from None
    return fd


def write_parts(fd: int, parts) -> None:
    """Write every buffer of ``parts``, in order, at the file position."""
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            view = view[os.write(fd, view):]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(final: str, parts, tmp: str, sync_dir: bool = True, mode: int = 0o644) -> None:
    """Make ``final`` hold ``parts`` (buffers, in order) or stay as it was, across a
    crash: write them to ``tmp`` (same filesystem; replaced if left over), fsync it,
    rename it to ``final``, then fsync the directory (unless the caller batches that)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        write_parts(fd, parts)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    if sync_dir:
        fsync_dir(os.path.dirname(final))
