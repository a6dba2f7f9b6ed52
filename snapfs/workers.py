"""Blocking file I/O off the trio thread, in parallel, and the counters that let a
destroy or a take wait for it.

``read`` first tries ``preadv(RWF_NOWAIT)`` inline: data in the page cache costs no
thread hop; a miss (EAGAIN, or a short read) is read with O_DIRECT through Linux AIO
where the file has an O_DIRECT descriptor (``aio.pread``: no thread, no GIL hand-off),
else, or where AIO cannot serve it, in a worker thread; while a file's attempts mostly
miss, its reads skip the inline attempt (``HitRate``). Writes always
go to a worker thread (buffered ``pwritev(RWF_NOWAIT)`` is EOPNOTSUPP on ext4 here,
and a buffered write may wait in dirty-page throttling). ``THREADS`` long-lived
threads take calls from one queue, so N requests in flight on a device become N
requests in flight on its source.

Why a pool of our own and not ``trio.to_thread.run_sync``: the trio thread is the
bottleneck (100% CPU with 16 readers of an uncached device), and to_thread's
per-call work (limiter, thread cache, names) costs it more than one queue put and
one ``run_sync_soon``: 16 random 4 KiB readers of an uncached loop device measured
6277 IOPS with to_thread and 7734 with the pool (1 reader: 5427 and 6749). A call
cannot be cancelled once queued, like to_thread's default.

Everything here runs on the trio thread except the functions handed to ``run``.
"""

import collections
import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import outcome
import trio

from . import aio

THREADS = 32


async def run(fn: Callable, *args):
    """``fn(*args)`` in a worker thread (at most THREADS at once); its result, or its
    exception raised here. Foreground work: device I/O and copies (image reads go
    through ``read(..., bulk=True)``, which yields to it)."""
    _foreground()
    return await _pool.run(fn, *args)


def _foreground() -> None:
    """Device I/O is waiting on the disk now (``bulk_slots`` yields to it)."""
    global _last_foreground
    _last_foreground = time.monotonic()


class Pool:
    """THREADS long-lived threads fed by one queue. Results come back in batches: a
    worker appends its result to ``_done`` and wakes the trio thread with one
    ``run_sync_soon`` only if no wake-up is already pending, so under load one wake-up
    delivers many results. One trio run uses the pool at a time (the daemon's; tests
    run one after another). 16 random readers of an uncached device: 20k reads/s with a
    wake-up per result, 35k with batches, in a loop without FUSE)."""

    def __init__(self, size: int):
        self.size = size
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.started = 0
        self._done: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False

    def _work(self) -> None:
        while True:
            fn, args, task, token = self.queue.get()
            self._done.append((task, outcome.capture(fn, *args)))
            with self._lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:     # the loop ended meanwhile: nothing to wake
                with self._lock:
                    self._wake_pending = False

    def _deliver(self) -> None:
        """Trio thread: hand every finished result to its task. The flag is cleared
        before the deque is emptied, so a result appended after that point either is
        seen here or brings a wake-up of its own."""
        with self._lock:
            self._wake_pending = False
        done = self._done
        while done:
            task, result = done.popleft()
            trio.lowlevel.reschedule(task, result)

    @trio.lowlevel.enable_ki_protection
    async def run(self, fn: Callable, *args):
        """Protected from KeyboardInterrupt: one raised between the queue put and the
        wait would leave a result for a task that is gone."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.started < self.size:
            self.started += 1
            threading.Thread(target=self._work, name=f"snapfs-io-{self.started}", daemon=True).start()
        self.queue.put((fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token()))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


_pool = Pool(THREADS)


def pread_nowait(fd: int, size: int, offset: int) -> bytes | None:
    """``size`` bytes at ``offset`` if the page cache holds them all, else None. Trio
    thread only: it reads into one scratch buffer that stays allocated (a fresh 1 MiB
    buffer costs an allocation and page faults on every call)."""
    global _scratch
    if len(_scratch) < size:
        _scratch = memoryview(bytearray(size))
    buf = _scratch[:size]
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
            return None
        raise
    return bytes(buf) if n == size else None


_scratch = memoryview(bytearray(0))


class HitRate:
    """How often the inline attempt (``pread_nowait``) on one file found its data in
    the page cache, as a moving average. A miss is not free: RWF_NOWAIT starts the
    disk read before it gives up (the kernel's read-ahead path), and that costs the trio
    thread about 0.3 ms per MiB and 20-40 us per 4 KiB request. So while misses
    dominate, reads go straight to a worker thread, which then pays for it, and only
    every PROBE-th read tries inline, to notice when the data is cached again."""

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


class Readable(Protocol):
    cache: HitRate
    direct_fd: int | None       # an O_DIRECT descriptor for ``aio.pread``, or None

    def pread_nowait(self, offset: int, size: int) -> bytes | None: ...
    def pread(self, offset: int, size: int) -> bytes: ...


async def read(file: Readable, offset: int, size: int, bulk: bool = False) -> bytes:
    """``file.pread`` with the page-cache fast path (module docstring, ``HitRate``).
    ``bulk``: a snapshot-image read, which waits for a slot of ``bulk_slots`` before
    it waits on the disk (AIO or a thread); other reads count as foreground I/O."""
    if file.cache.worth_trying():
        data = file.pread_nowait(offset, size)
        file.cache.record(data is not None)
        if data is not None:
            return data
    if bulk:
        async with bulk_slots():
            return await _read_miss(file, offset, size)
    _foreground()
    return await _read_miss(file, offset, size)


async def _read_miss(file: Readable, offset: int, size: int) -> bytes:
    """A read the page cache could not answer: AIO where the file has an O_DIRECT
    descriptor and AIO can serve it, else a worker thread."""
    if file.direct_fd is not None:
        data = await aio.pread(file.direct_fd, offset, size)
        if data is not None:
            return data
    return await _pool.run(file.pread, offset, size)


# Image reads that may wait on the disk at once: BULK_IDLE, and BULK_BUSY while the
# devices have had I/O waiting on the disk (a worker thread or an AIO read) within the
# last FOREGROUND_WINDOW seconds.
# A backup copy of an image streams large reads (the kernel's read-ahead keeps many in
# flight); unbounded, they fill the thread pool and the disk queue, and the workload's
# own requests on the devices wait behind them. pgbench on ext4 over a snapfs device,
# tps during a cp of a 2 GiB image relative to a plain copy of as much data from the
# same disk (noisy VM, rounds of two): unbounded 0.20-0.25, 2 slots 0.35-0.59, 1 slot
# 0.67-0.76; the image copy stayed as fast as the plain one in all of them.
BULK_IDLE = 4
BULK_BUSY = 1
FOREGROUND_WINDOW = 0.1
_bulk = trio.lowlevel.RunVar("snapfs_bulk_slots")
_last_foreground = -1e9


def bulk_slots() -> trio.CapacityLimiter:
    """This run's limiter for image reads that need a thread, sized for now: BULK_BUSY
    slots while the devices are busy, BULK_IDLE otherwise (a smaller size applies to
    new reads; reads holding a slot finish)."""
    try:
        limiter = _bulk.get()
    except LookupError:
        limiter = trio.CapacityLimiter(BULK_IDLE)
        _bulk.set(limiter)
    busy = time.monotonic() - _last_foreground < FOREGROUND_WINDOW
    limiter.total_tokens = BULK_BUSY if busy else BULK_IDLE
    return limiter


class InFlight:
    """Operations in flight on one resource (a device's writes, a storage's I/O);
    ``drained`` waits until there are none. Trio thread only."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: trio.Event | None = None

    @contextmanager
    def using(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def drained(self) -> None:
        while self.count:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
