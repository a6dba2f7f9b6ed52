"""Blocking calls off the trio thread: one pool of worker threads for every blocking
call of the daemon (data I/O that cannot run inline, opens, fsync, freeze, cache
invalidation), the read that never waits but for the disk (``pread_nowait``), the bulk slots
that keep image reads behind the devices' own I/O, and the in-flight counters that let
a destroy or a take wait for I/O. Where each data read and write runs is decided in
``fileio``.

Why a pool of our own and not ``trio.to_thread.run_sync``: its per-call work
(limiter, thread cache, names) costs the trio thread, the daemon's bottleneck, more
than one queue put and one batched wake-up (docs/performance.md). A call cannot be
cancelled once queued, like to_thread's default.

Everything here runs on the trio thread except the functions handed to ``run``.
"""

import collections
import contextvars
import errno
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable

import outcome
import trio

THREADS = 32


async def run(fn: Callable, *args):
    """``fn(*args)`` in a worker thread (at most THREADS at once); its result, or its
    exception raised here."""
    return await _pool.run(fn, *args)


class Pool:
    """THREADS long-lived threads fed by one queue. Results come back in batches: a
    worker appends its result to ``_done`` and wakes the trio thread with one
    ``run_sync_soon`` only if no wake-up is already pending, so under load one wake-up
    delivers many results. One trio run uses the pool at a time (the daemon's; tests
    run one after another)."""

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
    """``size`` bytes at ``offset`` read with ``RWF_NOWAIT``, or None where the kernel
    would have to wait for anything but the disk itself, refuses, or reads short. On a
    buffered descriptor: only what the page cache holds (all of it, or None). On an
    O_DIRECT descriptor (``offset`` and ``size`` aligned to a page): the disk read, on
    the calling thread, None where dirty pages of the range would first have to be
    written back or no request slot is free. Trio thread only: it reads into one
    page-aligned scratch buffer that stays allocated (a fresh 1 MiB buffer costs an
    allocation and page faults on every call)."""
    global _scratch
    if len(_scratch) < size:
        _scratch = memoryview(mmap.mmap(-1, size))
    buf = _scratch[:size]
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return bytes(buf) if n == size else None


_scratch = memoryview(mmap.mmap(-1, 4096))


def _never_alone() -> bool:
    return True


# Whether a request waits in the kernel's queue for the daemon to read it: the FUSE
# adapter sets it (``set_queue_probe``); until then the answer is "maybe" (True).
_queue_waits: Callable[[], bool] = _never_alone


def set_queue_probe(probe: Callable[[], bool] | None) -> None:
    """``probe()``: True while a request waits to be read from the FUSE device (None:
    back to the default, "maybe")."""
    global _queue_waits
    _queue_waits = probe or _never_alone


def alone() -> bool:
    """The calling task is a device request and the only thing that wants the trio
    thread now: no other device request is ready in a handler and none waits in the
    kernel's queue. Blocking the thread for a moment then delays nobody (``fileio``)."""
    return _in_device_request.get() and priority.ready <= 1 and not _queue_waits()


# The devices' requests before the images' (docs/concurrency.md rule 4). A backup copy
# of an image streams large reads (the kernel's read-ahead keeps several in flight);
# unbounded, they fill the AIO queue (or the thread pool, for what AIO cannot serve), the
# disk queue and the trio thread, and the workload's own requests on the devices wait
# behind them (docs/performance.md). So:
# image reads at once: BULK_IDLE, and BULK_BUSY while the devices had a request within
# the last DEVICE_WINDOW seconds; an image read does its work on the trio thread (its
# start, and the reply once its data is in) only while no device request is ready to
# run there, or after waiting QUIET_LIMIT for that (so a busy loop still copies);
# and while the devices are busy, each image read keeps its slot for a pause of YIELD
# times its own duration (at most MAX_PAUSE) after it, so image reads take at most
# 1 / (1 + YIELD) of the loop and the disk, and requests that queue behind them wait
# parked in the daemon, not in the kernel's queue ahead of the next device request.
BULK_IDLE = 4
BULK_BUSY = 1
DEVICE_WINDOW = 0.1
QUIET_LIMIT = 0.02
YIELD = 0.5
MAX_PAUSE = 0.02
_bulk = trio.lowlevel.RunVar("snapfs_bulk_slots")
_in_device_request: contextvars.ContextVar[bool] = contextvars.ContextVar("snapfs_device_request",
                                                                         default=False)


def outside_request() -> None:
    """The calling task is no device request (a task spawned from one inherits its
    context)."""
    _in_device_request.set(False)


class Priority:
    """The devices' requests before the images' (trio thread only). ``ready``: device
    requests in a handler and not waiting on I/O, i.e. wanting the trio thread;
    ``last``: when one last began or resumed."""

    def __init__(self) -> None:
        self.ready = 0
        self.last = -1e9
        self._quiet: trio.Event | None = None

    def request(self) -> "_Request":
        """Around a device request's handler (``with``)."""
        return _Request(self)

    def waiting(self) -> "_Waiting":
        """Around an I/O wait (AIO, a worker thread); counts only inside ``request``."""
        return _Waiting(self)

    def busy(self) -> bool:
        return self.ready > 0 or time.monotonic() - self.last < DEVICE_WINDOW

    async def quiet(self) -> None:
        """Return once no device request is ready, or after QUIET_LIMIT."""
        if not self.ready:
            return
        with trio.move_on_after(QUIET_LIMIT):
            while self.ready:
                if self._quiet is None:
                    self._quiet = trio.Event()
                await self._quiet.wait()

    def _up(self) -> None:
        self.ready += 1
        self.last = time.monotonic()

    def _down(self) -> None:
        self.ready -= 1
        if not self.ready and self._quiet is not None:
            self._quiet.set()
            self._quiet = None


class _Request:
    """``Priority.request``: a class, not a generator: it runs on every device request."""

    __slots__ = ("priority", "token")

    def __init__(self, priority: Priority) -> None:
        self.priority = priority

    def __enter__(self) -> None:
        self.token = _in_device_request.set(True)
        self.priority._up()

    def __exit__(self, *exc) -> None:
        self.priority._down()
        _in_device_request.reset(self.token)


class _Waiting:
    """``Priority.waiting``."""

    __slots__ = ("counted", "priority")

    def __init__(self, priority: Priority) -> None:
        self.priority = priority

    def __enter__(self) -> None:
        self.counted = _in_device_request.get()
        if self.counted:
            self.priority._down()

    def __exit__(self, *exc) -> None:
        if self.counted:
            self.priority._up()


priority = Priority()


def bulk_slots(busy: bool) -> trio.CapacityLimiter:
    """This run's limiter for image reads, sized for now: BULK_BUSY slots while the
    devices are ``busy``, BULK_IDLE otherwise (a smaller size applies to new reads;
    reads holding a slot finish)."""
    try:
        limiter = _bulk.get()
    except LookupError:
        limiter = trio.CapacityLimiter(BULK_IDLE)
        _bulk.set(limiter)
    limiter.total_tokens = BULK_BUSY if busy else BULK_IDLE
    return limiter


def bulk(idle: bool = False) -> "_Bulk":
    """One image read's turn (``async with``): a slot of ``bulk_slots``, then
    ``priority.quiet``; after the read, while the devices are busy, the pause (not
    after a failed read). The reader calls ``priority.quiet`` again before it returns
    its data. ``idle``: a reader of the idle I/O class, treated as if the devices were
    always busy. Uncontended (a slot free, no device request ready, the devices idle)
    it never yields to the loop: an image read the page cache answers costs no round."""
    return _Bulk(idle)


class _Bulk:
    __slots__ = ("idle", "limiter", "t0")

    def __init__(self, idle: bool) -> None:
        self.idle = idle

    async def __aenter__(self) -> None:
        self.limiter = bulk_slots(self.idle or priority.busy())
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            await self.limiter.acquire()
        try:
            await priority.quiet()
        except BaseException:
            self.limiter.release()
            raise
        self.t0 = time.monotonic()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and (self.idle or priority.busy()):
                await trio.sleep(min((time.monotonic() - self.t0) * YIELD, MAX_PAUSE))
        finally:
            self.limiter.release()


class InFlight:
    """Operations in flight on one resource (a device's writes, a storage's I/O);
    ``drained`` waits until there are none. Trio thread only."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: trio.Event | None = None

    def using(self) -> "InFlight":
        """``with``: count one operation while the block runs."""
        return self

    def __enter__(self) -> None:
        self.enter()

    def __exit__(self, *exc) -> None:
        self.leave()

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def drained(self) -> None:
        while self.count:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
