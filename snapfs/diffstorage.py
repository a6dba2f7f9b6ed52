"""Difference storage: one file per snapshot holding the old contents of copied chunks.

Fields:
    fd: the open storage file (a named file, an unnamed O_TMPFILE, or a block device).
    description: what users see ("tmpfile in DIR" or the path).
    capacity: bytes reserved so far (file size after fallocate).
    requested: the high-water mark slots may use; grows by ``minimum`` portions up to
        ``limit``. Invariant: filled <= requested; requested <= max(limit, initial size).
    filled: bytes handed out. Slots are handed out in order and never freed.
    overflow: sticky; once a slot could not be had, every later ``alloc`` fails.

Growth (blksnap v2): after an allocation leaves ``requested - filled <= minimum/2``,
``requested`` grows by min(minimum, limit - requested) at once, and the file is
extended with fallocate by the ``on_grow`` hook (a worker thread in the mount), so
writers never wait for it: a slot in [capacity, requested) is written with pwrite,
which extends the file. When ``requested`` already equals ``limit``, one ``no_space``
event is posted instead.

Error handling: storage I/O errors surface as OSError to the caller (diffarea.py),
which marks the device image corrupted; they never reach the original's writer.
"""

import errno
import logging
import os
import stat
from collections.abc import Callable

from .errors import SnapfsError
from .fileio import FileIO
from .osutil import lock_exclusive
from .workers import InFlight

log = logging.getLogger(__name__)


class DiffStorage:
    """Slot allocator and I/O on one storage file. Trio thread only, except
    ``grow_blocking`` (worker thread) and ``open`` (worker thread, before sharing)."""

    def __init__(self, fd: int, description: str, capacity: int, limit: int, minimum: int,
                 growable: bool = True, on_grow: "Callable[[DiffStorage], bool] | None" = None,
                 on_no_space: Callable[[int], None] | None = None):
        self.fd = fd
        self.io = FileIO(fd, self.read, self.write)   # the data path (no AIO: reads use threads)
        self.description = description
        self.capacity = capacity
        self.requested = capacity
        self.limit = limit
        self.minimum = minimum
        self.filled = 0
        self.overflow = False
        self.growable = growable
        self.closed = False
        self.retired = False        # destroy began: no new growth may start
        self._low = False           # growth requested or no_space posted for this portion
        self.on_grow = on_grow            # starts a growth worker; False: grow inline
        self.on_no_space = on_no_space    # the limit is reached: post the event
        self._fault: Callable[[str], None] | None = None
        self.in_flight = InFlight()   # worker threads using ``fd``: close only when drained

    @property
    def fault(self) -> Callable[[str], None] | None:
        """Test hook called with "write", "read" or "grow" before each blocking call;
        may raise OSError. While set, no I/O of this storage runs inline."""
        return self._fault

    @fault.setter
    def fault(self, hook: Callable[[str], None] | None) -> None:
        self._fault = hook
        self.io.inline = hook is None

    # ----- creation -----------------------------------------------------------------

    @classmethod
    def open(cls, target: str, limit: int, minimum: int,
             forbidden: Callable[[os.stat_result], str | None],
             on_grow: "Callable[[DiffStorage], bool] | None" = None,
             on_no_space: Callable[[int], None] | None = None, shown: str = "") -> "DiffStorage":
        """Open or create the storage at ``target`` (blocking; call from a thread).
        ``shown`` names it in messages and status when ``target`` is a
        ``/proc/self/fd/N`` path (a path resolved in another mount namespace).

        ``forbidden(st)`` returns a reason when the storage (or the directory a new file
        goes into) must not be used: inside the mount, or a device source.

        Raises SnapfsError: EINVAL (bad kind, forbidden), ENOSPC (an existing small file
        already bigger than ``limit``, or no room for the first portion), ENOENT/EACCES.
        """
        fd, desc, growable = cls._open_target(target, forbidden, shown or target)
        try:
            capacity = os.lseek(fd, 0, os.SEEK_END)
            storage = cls(fd, desc, capacity, limit, minimum, growable, on_grow, on_no_space)
            storage._initial_size()
            return storage
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _open_target(target: str, forbidden, name: str) -> tuple[int, str, bool]:
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"storage {name}") from None
        check = st if st is not None else _stat_parent(target)
        reason = forbidden(check)
        if reason:
            raise SnapfsError(errno.EINVAL, f"storage {name}: {reason}")
        try:
            if st is None:   # unlinked at once: a crash can leave nothing behind
                fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.unlink(target)
                except OSError:
                    os.close(fd)
                    raise
                return fd, f"{target} (unlinked)", True
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(target, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
                return fd, f"tmpfile in {name}", True
            if stat.S_ISREG(st.st_mode):
                # a second snapshot naming the same file would overwrite its slots
                fd = lock_exclusive(os.open(target, os.O_RDWR | os.O_CLOEXEC), f"storage {name}",
                                    lambda: f"storage {name} is in use by another snapshot")
                return fd, name, True
            if stat.S_ISBLK(st.st_mode):
                fd = os.open(target, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
                return fd, name, False
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"storage {name}") from None
        raise SnapfsError(errno.EINVAL, f"storage {name}: not a directory, file or block device")

    def _initial_size(self) -> None:
        """blksnap's rule: a small (<= minimum/2) file gets its first portion now."""
        if not self.growable or self.capacity > self.minimum // 2:
            return
        if self.capacity > self.limit:
            raise SnapfsError(errno.ENOSPC, f"storage {self.description} is already "
                              f"{self.capacity} bytes, more than the limit {self.limit}")
        if self.capacity < self.limit:
            self.requested = self.capacity + min(self.minimum, self.limit - self.capacity)
            try:
                self.grow_blocking(self.requested)
            except OSError as exc:
                raise SnapfsError.from_oserror(exc, f"reserving storage {self.description}") from None
            self.capacity = self.requested

    # ----- slots --------------------------------------------------------------------

    def alloc(self, size: int) -> int:
        """Hand out the next ``size`` bytes; return their offset.

        Raises SnapfsError(ENOSPC) on overflow (sticky: all later calls fail too).
        """
        if self.overflow or self.closed or self.filled + size > self.requested:
            self.overflow = True
            raise SnapfsError(errno.ENOSPC, "difference storage overflow")
        offset = self.filled
        self.filled += size
        self._check_low()
        return offset

    def _check_low(self) -> None:
        if self._low or self.requested - self.filled > self.minimum // 2:
            return
        self._low = True
        if self.growable and self.requested < self.limit:
            self.requested += min(self.minimum, self.limit - self.requested)
            if self.on_grow is None or not self.on_grow(self):
                self.grow_now()
        elif self.on_no_space is not None:
            self.on_no_space(self.requested)

    def grow_now(self) -> None:
        """Grow inline (no worker available); failures are logged, not raised."""
        try:
            self.grow_blocking(self.requested)
            self.grow_done(self.requested)
        except OSError as exc:
            self.grow_failed(exc)

    def grow_blocking(self, target: int) -> None:
        """Reserve the file up to ``target`` bytes (blocking; any thread)."""
        if self.fault is not None:
            self.fault("grow")
        os.posix_fallocate(self.fd, 0, target)

    def grow_done(self, target: int) -> None:
        """Growth to ``target`` finished: accept the next low-space trigger."""
        self.capacity = max(self.capacity, target)
        self._low = False
        self._check_low()

    def grow_failed(self, exc: OSError) -> None:
        """fallocate failed: keep the slots (pwrite may still succeed); a later write
        failure corrupts the image with its errno."""
        log.warning("growing storage %s failed: %s", self.description, exc)
        self._low = False

    # ----- I/O ----------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        """Write all of ``data`` at ``offset`` (blocking); OSError (ENOSPC for a short
        write)."""
        if self.fault is not None:
            self.fault("write")
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def sync(self) -> None:
        """fsync the storage (blocking; a worker thread, never after ``close``)."""
        os.fsync(self.fd)

    def read(self, offset: int, size: int) -> bytes:
        """Read exactly ``size`` bytes at ``offset`` (blocking); OSError(EIO) if short."""
        if self.fault is not None:
            self.fault("read")
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, "short read from difference storage")
        return data

    def retire(self) -> None:
        """Destroy's synchronous step: no growth starts from now on (a growth task
        queued earlier checks this before touching the fd, which may be reused once
        closed)."""
        self.retired = True
        self.on_grow = None

    def close(self) -> None:
        """Release the storage: close it (a file snapfs created has no name left, so
        its space is freed now). Idempotent."""
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)

    def statistics(self) -> dict:
        return {
            "storage": self.description,
            "size": self.capacity,
            "requested": self.requested,
            "used": self.filled,
            "limit": self.limit,
            "overflow": self.overflow,
        }


def _stat_parent(path: str) -> os.stat_result:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"storage directory {parent}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SnapfsError(errno.ENOENT, f"storage directory {parent} is not a directory")
    return st
