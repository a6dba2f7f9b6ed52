"""A device's source: an open regular file or block device of fixed size, its
identity across restarts, and its I/O (pread, pwrite, fdatasync, punch-hole).

Knows nothing of snapshots or tracking: ``tracker``, ``diffarea`` and ``state`` use it.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from .errors import SnapfsError
from .params import SECTOR
from .workers import HitRate, pread_nowait

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(frozen=True)
class Identity:
    """What identifies a source across restarts (state.py compares these)."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    kind: str   # "file" or "bdev"


class Source:
    """An open device source (regular file or block device) with a fixed size."""

    def __init__(self, path: str, fd: int, size: int, st: os.stat_result, kind: str):
        self.path = path
        self.fd = fd
        self.cache = HitRate()     # page-cache hits of inline reads (workers.read)
        self.size = size
        self.st = st
        self.kind = kind

    @classmethod
    def open(cls, path: str) -> "Source":
        """Open ``path`` read/write (blocking; call from a thread or before the loop).

        Raises SnapfsError: ENOENT/EACCES from the OS; EINVAL not a regular file or
        block device, empty, or not a whole number of 512-byte sectors. Block devices are
        opened O_EXCL so nothing can mount them behind the tracker's back.
        """
        path = os.path.realpath(path)
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                kind, flags = "file", 0
            elif stat.S_ISBLK(st.st_mode):
                kind, flags = "bdev", os.O_EXCL
            else:
                raise SnapfsError(errno.EINVAL, f"{path} is not a regular file or block device")
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | flags)
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"opening {path}") from None
        if kind == "file":
            _lock(fd, path)
        size = os.lseek(fd, 0, os.SEEK_END)
        # no read-ahead of our own: the kernel's read-ahead on the FUSE file already
        # sizes our requests, and a 4 KiB random read must stay 4 KiB on the disk
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if size == 0 or size % SECTOR:
            os.close(fd)
            raise SnapfsError(errno.EINVAL, f"{path} is empty" if not size else
                              f"{path} is {size} bytes, not a multiple of {SECTOR}-byte sectors")
        return cls(path, fd, size, st, kind)

    def same_as(self, other: "Source") -> bool:
        """The same file or block device (a device by its number, a file by inode)."""
        if self.kind == "bdev" and other.kind == "bdev":
            return self.st.st_rdev == other.st.st_rdev
        return (self.st.st_dev, self.st.st_ino) == (other.st.st_dev, other.st.st_ino)

    def identity(self) -> Identity:
        st = os.fstat(self.fd)
        return Identity(self.path, st.st_dev, st.st_ino, self.size, st.st_mtime_ns, self.kind)

    def pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read from {self.path}")
        return data

    def pread_nowait(self, offset: int, size: int) -> bytes | None:
        """The bytes if all are in the page cache (no I/O wait), else None."""
        return pread_nowait(self.fd, size, offset)

    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def fsync(self) -> None:
        """Make the data durable. fdatasync: a preallocated source needs no journal
        commit for its data, and a commit would stall concurrent writers."""
        os.fdatasync(self.fd)

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range (reads return zeros afterwards)."""
        if self.kind == "file":
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        else:
            self.pwrite(offset, bytes(length))

    def close(self) -> None:
        os.close(self.fd)


def _lock(fd: int, path: str) -> None:
    """An exclusive flock for the source's life (block devices have O_EXCL): a second
    snapfs, or a snapshot storage, naming the same file gets EBUSY. The lock belongs
    to this open file, so a crash releases it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SnapfsError(errno.EBUSY, f"{path} is in use by another snapfs or a snapshot's "
                              "storage (it holds a lock on it)") from None
        raise SnapfsError.from_oserror(exc, f"locking {path}") from None


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); OSError on failure."""
    if _LIBC.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
