"""Blocking file I/O off the trio thread, in parallel, and the counters that let a
destroy or a take wait for it.

``read`` first tries ``preadv(RWF_NOWAIT)`` inline: data in the page cache costs no
thread hop; a miss (EAGAIN, or a short read) goes to a worker thread. Writes always
go to a worker thread (buffered ``pwritev(RWF_NOWAIT)`` is EOPNOTSUPP on ext4 here,
and a buffered write may wait in dirty-page throttling). At most ``THREADS`` calls run
at once (a ``trio.CapacityLimiter``), so N requests in flight on a device become N
requests in flight on its source.

Everything here runs on the trio thread except the functions handed to ``run``.
"""

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import trio

THREADS = 32
_limiter: trio.CapacityLimiter | None = None


def limiter() -> trio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(THREADS)
    return _limiter


async def run(fn: Callable, *args):
    """``fn(*args)`` in a worker thread (at most THREADS at once)."""
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter())


def pread_nowait(fd: int, size: int, offset: int) -> bytes | None:
    """``size`` bytes at ``offset`` if the page cache holds them all, else None."""
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
            return None
        raise
    return bytes(buf) if n == size else None


class Readable(Protocol):
    def pread_nowait(self, offset: int, size: int) -> bytes | None: ...
    def pread(self, offset: int, size: int) -> bytes: ...


async def read(file: Readable, offset: int, size: int) -> bytes:
    """``file.pread`` with the page-cache fast path (module docstring)."""
    data = file.pread_nowait(offset, size)
    if data is None:
        data = await run(file.pread, offset, size)
    return data


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
