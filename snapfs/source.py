"""A device's source: an open regular file or block device of fixed size, its
identity across restarts, and its I/O (pread, pwrite, fdatasync, punch-hole).

Knows nothing of snapshots or tracking: ``tracker``, ``diffarea`` and ``state`` use it.

One daemon per source: a regular file is flock'ed and a block device opened O_EXCL for
as long as a mount serves it; the mount also leaves a *claim* (claims.py) naming
itself, so a second mount that is refused can say which mount serves the source.
"""

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

from . import aio
from .claims import Claim
from .errors import SnapfsError
from .fileio import FileIO
from .osutil import LIBC, lock_exclusive
from .params import SECTOR
from .workers import InFlight

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(frozen=True)
class Identity:
    """What identifies a source across restarts (cbtstate.py compares these)."""

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
        self.io = FileIO(fd, self.pread, self.pwrite, aio.open_direct(fd))   # the data path
        self.size = size
        self.st = st
        self.kind = kind
        self.claim: Claim | None = None
        self.users = InFlight()          # device reads and fsyncs in flight (a pivot closes it after them)

    @classmethod
    def open(cls, path: str, served_by: str = "", shown: str = "") -> "Source":
        """Open ``path`` read/write (blocking; call from a thread or before the loop).

        ``served_by``: the mountpoint that will serve it, left in a claim (``Claim``)
        for a refused second mount to name. ``shown``: the name users see instead of
        ``path``'s real path (a path resolved in another mount namespace is opened
        through ``/proc/self/fd``, whose real path would name a file of this one).

        Raises SnapfsError: ENOENT/EACCES from the OS; EBUSY served by another snapfs
        (naming it when its claim is live) or otherwise held; EINVAL not a regular
        file or block device, empty, or not a whole number of 512-byte sectors. Block
        devices are opened O_EXCL so nothing can mount them behind the tracker's back.
        """
        name = shown or os.path.realpath(path)
        path = path if shown else name
        st = None
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                kind, flags = "file", 0
            elif stat.S_ISBLK(st.st_mode):
                kind, flags = "bdev", os.O_EXCL
            else:
                raise SnapfsError(errno.EINVAL, f"{name} is not a regular file or block device")
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY and st is not None and stat.S_ISBLK(st.st_mode):
                raise SnapfsError(errno.EBUSY, _held(name, st, "mounted, or opened exclusively "
                                                     "by another program")) from None
            raise SnapfsError.from_oserror(exc, f"opening {name}") from None
        if kind == "file":
            # one daemon per file: a second snapfs, or a snapshot storage, naming it gets EBUSY
            lock_exclusive(fd, name, lambda: _held(name, st, "a snapshot's storage or another "
                                                   "snapfs holds a lock on it"))
        size = os.lseek(fd, 0, os.SEEK_END)
        # no read-ahead of our own: the kernel's read-ahead on the FUSE file already
        # sizes our requests, and a 4 KiB random read must stay 4 KiB on the disk
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if size == 0 or size % SECTOR:
            os.close(fd)
            raise SnapfsError(errno.EINVAL, f"{name} is empty" if not size else
                              f"{name} is {size} bytes, not a multiple of {SECTOR}-byte sectors")
        source = cls(name, fd, size, st, kind)
        if served_by:
            source.claim = Claim.take(st, served_by)
        return source

    def same_as(self, other: "Source") -> bool:
        """The same file or block device (a device by its number, a file by inode)."""
        if self.kind == "bdev" and other.kind == "bdev":
            return self.st.st_rdev == other.st.st_rdev
        return (self.st.st_dev, self.st.st_ino) == (other.st.st_dev, other.st.st_ino)

    def identity(self) -> Identity:
        st = os.fstat(self.fd)
        return Identity(self.path, st.st_dev, st.st_ino, self.size, st.st_mtime_ns, self.kind)

    def pread(self, offset: int, size: int) -> bytes:
        """Blocking read of exactly ``size`` bytes (OSError EIO if short)."""
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read from {self.path}")
        return data

    def pwrite(self, offset: int, data) -> None:
        """Blocking write of all of ``data``."""
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
        """Drop the claim first: while the lock is held no other mount can claim."""
        if self.claim is not None:
            self.claim.release()
        if self.io.direct_fd is not None:
            os.close(self.io.direct_fd)
        os.close(self.fd)


def _held(path: str, st: os.stat_result, otherwise: str) -> str:
    """Why ``path`` is busy: the mount that serves it when its claim is live."""
    serving = Claim.read(st)
    if serving is None:
        return f"{path} is in use ({otherwise}; no snapfs mount claims it here)"
    return (f"{path} is in use: the snapfs mounted at {serving['mountpoint']} (pid "
            f"{serving['pid']}) serves it; unmount that first")


LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); OSError on failure."""
    if LIBC.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
