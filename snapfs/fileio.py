"""Where each read and write of one open file runs (the one rule of docs/concurrency.md,
rule 2): on the trio thread when the kernel can answer from the page cache at once,
through Linux AIO when a read must wait for the disk, in a worker thread when neither
can.

Reads: ``preadv(RWF_NOWAIT)`` inline; a miss is read with O_DIRECT through AIO where
the file has an O_DIRECT descriptor (``aio.pread``), else, or where AIO cannot serve
it, in a worker thread. While a file's inline attempts mostly miss (``HitRate``), its
reads skip them. One exception for a miss: a device request that is alone
(``workers.alone``: no other request ready or waiting in the kernel's queue, no AIO in
flight), at most DIRECT_NOW_MAX bytes, page-aligned and of the daemon's own priority,
reads with O_DIRECT on the trio thread (``workers.pread_nowait``): it waits for the
disk, but nobody waits for the thread meanwhile, and it saves the round through the
loop that AIO costs. While such reads take DIRECT_STALL on average (a slow disk), the
file's misses go back to AIO (``Stopwatch``).

Writes: the kernels this runs on refuse ``pwritev(RWF_NOWAIT)`` on buffered files of
ext4, tmpfs and block devices (EOPNOTSUPP; docs/performance.md), so a write is done
inline with a plain ``pwrite`` only when it cannot wait for the disk: every page it
covers only in part is in the page cache (a 1-byte ``RWF_NOWAIT`` read of each edge
page says so; whole pages are never read), no call on this file is in a worker thread
(a write, fsync, fallocate or punch holds the file's lock while it waits, and so does a
read on xfs), and no inline write of this file
took longer than ``STALL`` in the last ``BACKOFF`` seconds while the thread slept in
it (a voluntary context switch: dirty-page throttling, a journal or lock wait, a read;
being preempted on a busy machine does not count): the file's writes then go to
threads for a while. Otherwise, and for
files whose owner turned ``inline`` off, the write runs in a worker thread.

Everything here runs on the trio thread except the blocking callables handed in.
"""

import errno
import os
import resource
import time
from collections.abc import Callable

import trio

from . import aio, ioprio, workers

PAGE = 4096
STALL = 0.002       # seconds: an inline write that took longer, sleeping, stalled the loop
BACKOFF = 1.0       # seconds a file's writes (or direct reads) go elsewhere after a stall
DIRECT_NOW_MAX = 128 * 1024   # bytes: a larger miss is never read on the trio thread
DIRECT_STALL = 0.001          # seconds: direct reads that take longer on average: a slow disk


def _sleeps() -> int:
    """Voluntary context switches of the calling thread so far (it slept in the
    kernel)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


class HitRate:
    """How often the inline read attempt on one file found its data in the page cache,
    as a moving average. A miss is not free (RWF_NOWAIT starts the disk read before it
    gives up), so while misses dominate, reads skip the attempt and only every PROBE-th
    read tries inline, to notice when the data is cached again."""

    PROBE = 16
    __slots__ = ("rate", "skipped")

    def __init__(self) -> None:
        self.rate = 1.0
        self.skipped = 0

    def worth_trying(self) -> bool:
        if self.rate >= 0.25:
            return True
        self.skipped += 1
        if self.skipped < self.PROBE:
            return False
        self.skipped = 0
        return True

    def record(self, hit: bool) -> None:
        self.rate += ((1.0 if hit else 0.0) - self.rate) / 8


class Stopwatch:
    """How long one kind of blocking call on the trio thread takes, as a moving average:
    while it exceeds DIRECT_STALL (a slow disk), ``fast()`` is False, and the caller
    sends such calls elsewhere, trying one again after BACKOFF. One slow call among
    fast ones does not turn it."""

    __slots__ = ("average", "until")

    def __init__(self) -> None:
        self.average = 0.0
        self.until = 0.0

    def fast(self) -> bool:
        return time.monotonic() >= self.until

    def time(self, fn: Callable, *args):
        t0 = time.monotonic()
        try:
            return fn(*args)
        finally:
            t1 = time.monotonic()
            self.average += (t1 - t0 - self.average) / 8
            if self.average > DIRECT_STALL:
                self.until = t1 + BACKOFF


class FileIO:
    """The data path of one open file. ``pread(offset, size) -> bytes`` and
    ``pwrite(offset, data)`` are the owner's blocking calls (they raise OSError), run in
    worker threads; ``direct_fd`` an O_DIRECT descriptor for AIO reads, or None.
    ``inline = False`` sends every call to a thread (the storage's fault hook)."""

    def __init__(self, fd: int, pread: Callable[[int, int], bytes], pwrite: Callable[[int, object], None],
                 direct_fd: int | None = None):
        self.fd = fd
        self.pread = pread
        self.pwrite = pwrite
        self.direct_fd = direct_fd
        self.inline = True
        self.hits = HitRate()
        self.thread_calls = 0            # calls on this file in worker threads now
        self.written = 0                 # writes that returned so far
        self.durable = 0                 # of those, how many a finished flush covers
        self._flush: trio.Event | None = None   # set when the flush in flight ends
        self.stalled_until = 0.0         # monotonic: inline writes resume then
        self.direct_reads = Stopwatch()  # misses read on the trio thread

    # ----- reads --------------------------------------------------------------------

    async def read(self, offset: int, size: int, prio: int = 0) -> bytes:
        """``size`` bytes at ``offset`` (OSError on failure or a short read); ``prio``:
        the I/O priority of the disk read it may cause (``ioprio``; 0: the daemon's)."""
        if self.inline and self.hits.worth_trying():
            data = workers.pread_nowait(self.fd, size, offset)
            self.hits.record(data is not None)
            if data is not None:
                return data
        if self.direct_fd is not None and self.inline:
            if self._may_read_direct_now(offset, size, prio):
                data = self.direct_reads.time(workers.pread_nowait, self.direct_fd, size, offset)
                if data is not None:
                    return data
            with workers.priority.waiting():
                data = await aio.pread(self.direct_fd, offset, size, prio)
            if data is not None:
                return data
        if prio:
            return await self.run(self._pread_at, prio, offset, size)
        return await self.run(self.pread, offset, size)

    def _pread_at(self, prio: int, offset: int, size: int) -> bytes:
        """Worker thread: ``pread`` with the thread's I/O priority set to ``prio`` (and
        back to what it was)."""
        before = ioprio.current_thread()
        ioprio.set_current_thread(prio)
        try:
            return self.pread(offset, size)
        finally:
            ioprio.set_current_thread(before)

    def _may_read_direct_now(self, offset: int, size: int, prio: int) -> bool:
        return (not prio and size <= DIRECT_NOW_MAX and not (offset | size) % PAGE
                and self.direct_reads.fast() and aio.idle() and workers.alone())

    # ----- writes -------------------------------------------------------------------

    async def write(self, offset: int, data) -> None:
        """All of ``data`` at ``offset`` (module docstring: inline or a thread)."""
        if self._may_write_inline(offset, len(data)):
            slept = _sleeps()
            t0 = time.monotonic()
            self.pwrite(offset, data)
            t1 = time.monotonic()
            if t1 - t0 > STALL and _sleeps() != slept:
                self.stalled_until = t1 + BACKOFF
        else:
            await self.run(self.pwrite, offset, data)
        self.written += 1

    async def sync(self, fn: Callable[[], None]) -> None:
        """Make every write that returned before this call durable (``_flush_once``:
        an AIO fdatasync, or ``fn``, the blocking fdatasync, in a thread), sharing
        flushes: a flush in flight that began
        after those writes covers them, so concurrent callers (a database's committing
        clients) wait for it instead of each starting one; otherwise one starts. A
        flush's error reaches the caller that started it; the others try their own."""
        target = self.written
        while self.durable < target:
            if self._flush is not None:
                await self._flush.wait()
                continue
            start, self._flush = self.written, trio.Event()
            try:
                await self._flush_once(fn)
                self.durable = max(self.durable, start)
            finally:
                self._flush.set()
                self._flush = None

    async def _flush_once(self, fn: Callable[[], None]) -> None:
        """One flush: an fdatasync through AIO where the file has AIO (a source; the
        kernel's worker waits, no thread of ours), else ``fn`` in a worker thread."""
        if self.inline and self.direct_fd is not None:
            with workers.priority.waiting():
                if await aio.fdatasync(self.fd):
                    return
        await self.run(fn)

    async def run(self, fn: Callable, *args):
        """A blocking call on this file (a read or write that cannot run inline, punch,
        fdatasync, fallocate) in a worker thread, counted in ``thread_calls`` so inline
        writes do not queue on the file's lock behind it."""
        self.thread_calls += 1
        try:
            with workers.priority.waiting():
                return await workers.run(fn, *args)
        finally:
            self.thread_calls -= 1

    def _may_write_inline(self, offset: int, size: int) -> bool:
        if not self.inline or self.thread_calls or time.monotonic() < self.stalled_until:
            return False
        end = offset + size
        head, tail = offset % PAGE, end % PAGE
        if head and not self._cached(offset - head):
            return False
        return not tail or (end - tail == offset - head and head) or self._cached(end - tail)

    def _cached(self, page: int) -> bool:
        """Whether the page at ``page`` is in the page cache (its first byte, read
        without waiting; past the end of the file counts as cached: nothing to read)."""
        try:
            os.preadv(self.fd, [bytearray(1)], page, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
                return False
            raise
        return True
