"""Reads that wait for the disk without a thread: O_DIRECT reads submitted with Linux
native AIO (``io_submit``, the ``libaio`` package) from the trio thread, completed
through an eventfd that one reaper task per trio run watches.

Why not worker threads for them: with 16 readers of an uncached device the trio thread
and the worker threads take turns on the GIL, and every hand-off costs the one request
loop tens of microseconds. Here the kernel does the waiting: a read costs the trio
thread one ``io_submit`` and its share of one ``io_getevents`` (figures:
docs/performance.md, "Misses through Linux AIO").

Contract of ``pread``: returns the bytes, or None when this path cannot serve the read
(not aligned to ``ALIGN``, too many in flight, the kernel answered EAGAIN because the
read would block in submission, e.g. dirty pages to write back first, a short read at
the end of a file, or O_DIRECT refused); the caller then reads through a thread. An
I/O error raises OSError, as ``os.pread`` would. A submitted read cannot be cancelled
(like a call in a worker thread): the task waits until the kernel completes it.

Coherence: an O_DIRECT read writes back dirty page-cache pages of its range before it
reads (with RWF_NOWAIT it answers EAGAIN instead, and the thread path reads them from
the cache), so it returns what a buffered read would. Ordering against writes is the
caller's business, as for any read (diffarea.py re-checks a chunk after the read).

Everything here runs on the trio thread.
"""

import ctypes
import errno
import logging
import mmap
import os

import outcome
import trio

log = logging.getLogger(__name__)

try:
    from libaio import libaio as _k  # the package's ctypes declarations of libaio.h
    _MISSING = ""
except OSError as exc:               # the system's libaio.so.1 is not installed
    _k = None
    _MISSING = str(exc)

ALIGN = 4096            # offsets, sizes and buffers: a page (O_DIRECT needs the device's block)
PIECE = 256 * 1024      # a larger read is split: a request that the block layer would
                        # have to split answers EAGAIN under RWF_NOWAIT (a loop device
                        # takes 128 segments: 512 KiB of scattered pages)
MAX_IN_FLIGHT = 256     # pieces submitted at once per trio run; more go to threads
_POOLED = 32            # idle buffers kept per size
_IOCB_FLAG_RESFD = 1    # completion bumps the eventfd in ``resfd``
_IOCB_FLAG_IOPRIO = 2   # the read carries the I/O priority in ``aio_reqprio``
# answers that mean "use a thread" (EPERM: a priority this daemon may not give, e.g. the
# real-time class of an ``ionice -c1`` reader without CAP_SYS_NICE)
_NOT_HERE = (errno.EAGAIN, errno.EINVAL, errno.EOPNOTSUPP, errno.EINTR, errno.EPERM)


class _Read:
    """One ``pread`` in flight: its task, pieces not yet completed, and ``status``:
    0 while every completed piece read all its bytes, else the first failure
    (-errno, or the short count)."""

    __slots__ = ("left", "status", "task")

    def __init__(self, task, left: int) -> None:
        self.task = task
        self.left = left
        self.status = 0


class _Slot:
    """One piece's kernel control block (``data`` names the slot, 1-based: ctypes
    reads a NULL pointer back as None) and the read it belongs to."""

    __slots__ = ("index", "iocb", "read")

    def __init__(self, index: int, efd: int) -> None:
        self.index = index
        self.iocb = cb = _k.iocb()
        cb.data = index + 1
        cb.aio_lio_opcode = _k.IO_CMD_PREAD
        cb.aio_rw_flags = os.RWF_NOWAIT
        cb.u.c.flags = _IOCB_FLAG_RESFD
        cb.u.c.resfd = efd
        self.read: _Read | None = None


class _Ring:
    """One trio run's AIO context, eventfd, slots (``free``: idle ones) and buffers."""

    def __init__(self) -> None:
        self.ctx = _k.io_context_t()
        _k.io_setup(MAX_IN_FLIGHT, ctypes.byref(self.ctx))
        try:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            _k.io_destroy(self.ctx)
            raise
        self.slots = [_Slot(i, self.efd) for i in range(MAX_IN_FLIGHT)]
        self.pointers = [ctypes.pointer(slot.iocb) for slot in self.slots]
        self.singles = [(_k.iocb_p * 1)(p) for p in self.pointers]   # for one-piece reads
        self.free = list(reversed(self.slots))
        self.buffers: dict[int, list[mmap.mmap]] = {}
        self.events = (_k.io_event * 64)()
        self.now = _k.timespec(0, 0)

    @property
    def busy(self) -> int:
        return MAX_IN_FLIGHT - len(self.free)

    def buffer(self, size: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``size`` bytes (a power of two)."""
        cap = max(ALIGN, 1 << (size - 1).bit_length())
        pool = self.buffers.get(cap)
        return pool.pop() if pool else mmap.mmap(-1, cap)

    def release(self, buf: mmap.mmap) -> None:
        pool = self.buffers.setdefault(len(buf), [])
        if len(pool) < _POOLED:
            pool.append(buf)

    def submit(self, fd: int, buf: mmap.mmap, offset: int, size: int, ioprio: int = 0) -> _Read | None:
        """Submit the pieces of one read into ``buf`` (with I/O priority ``ioprio``
        unless 0); None if none could be."""
        count = (size + PIECE - 1) // PIECE
        if count > len(self.free):
            return None
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        slots = [self.free.pop() for _ in range(count)]
        read = _Read(trio.lowlevel.current_task(), count)
        for k, slot in enumerate(slots):
            cb = slot.iocb
            cb.aio_lio_opcode = _k.IO_CMD_PREAD       # a slot may have carried an fdatasync
            cb.aio_rw_flags = os.RWF_NOWAIT
            cb.aio_fildes = fd
            cb.u.c.buf = base + k * PIECE
            cb.u.c.nbytes = min(PIECE, size - k * PIECE)
            cb.u.c.offset = offset + k * PIECE
            cb.u.c.flags = _IOCB_FLAG_RESFD | (_IOCB_FLAG_IOPRIO if ioprio else 0)
            cb.aio_reqprio = ioprio
            slot.read = read
        array = (self.singles[slots[0].index] if count == 1 else
                 (_k.iocb_p * count)(*[self.pointers[slot.index] for slot in slots]))
        try:
            done = _k.io_submit(self.ctx, count, array)
        except OSError as exc:
            if exc.errno not in _NOT_HERE:
                self._unclaim(slots)
                raise
            done = 0
        if done < count:                 # the rest never reached the kernel
            self._unclaim(slots[done:])
            read.left, read.status = done, -errno.EAGAIN
        return read if done else None

    def submit_datasync(self, fd: int) -> _Read | None:
        """Submit an fdatasync of ``fd`` (the kernel runs it in its own worker); None
        if it could not be submitted here."""
        if not self.free:
            return None
        slot = self.free.pop()
        cb = slot.iocb
        cb.aio_lio_opcode = _k.IO_CMD_FDSYNC
        cb.aio_rw_flags = 0                  # the kernel refuses flags, buffer and range here
        cb.aio_fildes = fd
        cb.u.c.buf = None
        cb.u.c.nbytes = cb.u.c.offset = 0
        cb.u.c.flags = _IOCB_FLAG_RESFD
        cb.aio_reqprio = 0
        slot.read = read = _Read(trio.lowlevel.current_task(), 1)
        try:
            done = _k.io_submit(self.ctx, 1, self.singles[slot.index])
        except OSError as exc:
            self._unclaim([slot])
            if exc.errno not in _NOT_HERE:
                raise
            return None
        if not done:
            self._unclaim([slot])
            return None
        return read

    def _unclaim(self, slots: list[_Slot]) -> None:
        for slot in slots:
            slot.read = None
            self.free.append(slot)

    def deliver(self, timeout) -> None:
        """Hand completed reads to their tasks (``timeout`` None: wait for a piece;
        a signal interrupts that wait, and the kernel does not restart it)."""
        while True:
            try:
                n = _k.io_getevents(self.ctx, 0 if timeout is not None else 1, len(self.events),
                                    self.events, timeout)
                break
            except InterruptedError:
                continue
        for ev in self.events[:n]:
            slot = self.slots[ev.data - 1]
            read, slot.read = slot.read, None
            self.free.append(slot)
            if ev.res != slot.iocb.u.c.nbytes and read.status == 0:
                read.status = ev.res if ev.res < 0 else -errno.EAGAIN
            read.left -= 1
            if read.left == 0:
                trio.lowlevel.reschedule(read.task, outcome.Value(read.status))

    async def reap(self) -> None:
        """System task: hand completions to their tasks. At the end of the run (this
        task is cancelled) it waits for the reads still in flight, then closes."""
        now = ctypes.byref(self.now)
        try:
            while True:
                await trio.lowlevel.wait_readable(self.efd)
                try:
                    os.eventfd_read(self.efd)
                except BlockingIOError:
                    continue
                while self.busy:
                    before = self.busy
                    self.deliver(now)
                    if self.busy == before:
                        break
        finally:
            # io_destroy waits for the reads in flight; their tasks get them first
            try:
                while self.busy:
                    self.deliver(None)
            finally:
                _k.io_destroy(self.ctx)
                os.close(self.efd)


_ring = trio.lowlevel.RunVar("snapfs_aio_ring")


def _this_run() -> _Ring | None:
    """This run's ring, made at the first read; None for the whole run if the kernel
    refuses an AIO context (``fs.aio-max-nr`` reached): reads then go to threads."""
    try:
        return _ring.get()
    except LookupError:
        try:
            ring = _Ring()
        except OSError as exc:
            log.warning("no AIO context (%s): reads that miss the page cache use threads", exc)
            ring = None
        _ring.set(ring)
        if ring is not None:
            trio.lowlevel.spawn_system_task(ring.reap, name="snapfs-aio-reaper")
        return ring


def idle() -> bool:
    """No read or flush of this run is in flight here (trio thread only)."""
    try:
        ring = _ring.get()
    except LookupError:
        return True
    return ring is None or not ring.busy


@trio.lowlevel.enable_ki_protection
async def fdatasync(fd: int) -> bool:
    """``os.fdatasync(fd)`` without a thread: True once done (OSError if it failed),
    False where this path cannot do it (no AIO context, the kernel refused the
    submission); the caller then syncs in a thread. Cannot be cancelled once
    submitted."""
    ring = _this_run()
    if ring is None:
        return False
    done = ring.submit_datasync(fd)
    if done is None:
        return False
    status = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    if status == 0:
        return True
    if -status in _NOT_HERE:
        return False
    raise OSError(-status, os.strerror(-status))


def open_direct(fd: int) -> int | None:
    """A read-only O_DIRECT descriptor of the file open as ``fd``, or None where the
    file system refuses O_DIRECT (then every read of it goes through threads)."""
    global _MISSING
    if os.environ.get("SNAPFS_NO_AIO"):
        return None
    if _k is None:
        if _MISSING:
            log.warning("no libaio (%s): reads that miss the page cache use threads", _MISSING)
            _MISSING = ""
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


@trio.lowlevel.enable_ki_protection
async def pread(fd: int, offset: int, size: int, ioprio: int = 0) -> bytes | None:
    """``size`` bytes at ``offset`` of the O_DIRECT descriptor ``fd``, or None where
    this path cannot serve them (module docstring); ``ioprio``: the I/O priority the
    read carries (0: the daemon's). Protected from KeyboardInterrupt:
    one raised between the submission and the wait would hand the buffer, which the
    kernel still fills, to the next read."""
    if (offset | size) % ALIGN or not size:
        return None
    ring = _this_run()
    if ring is None:
        return None
    try:
        buf = ring.buffer(size)
    except OSError:                       # no memory for a buffer: a thread reads it
        return None
    try:
        read = ring.submit(fd, buf, offset, size, ioprio)
        if read is None:
            return None
        status = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if status == 0:
            return buf[:size]
        if -status in _NOT_HERE:
            return None
        raise OSError(-status, os.strerror(-status))
    finally:
        ring.release(buf)
