"""Where a read or write runs (snapfs/fileio.py): inline on the trio thread only when
the page cache takes it at once, else in a worker thread; the bytes are right on every
path. No FUSE here: FileIO over a real file, its blocking calls wrapped to record the
thread they ran in."""

import os
import subprocess
import threading
import time

import pytest
import trio

from snapfs import fileio
from snapfs.fileio import PAGE, FileIO

SIZE = 64 * PAGE


class Recorded:
    """A FileIO over ``path`` whose blocking pwrite records (thread ident, offset) and
    may sleep first."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)
        self.calls: list[tuple[int, int]] = []
        self.sleep = 0.0
        self.io = FileIO(self.fd, self.pread, self.pwrite)

    def pread(self, offset, size):
        return os.pread(self.fd, size, offset)

    def pwrite(self, offset, data):
        self.calls.append((threading.get_ident(), offset))
        if self.sleep:
            time.sleep(self.sleep)
        os.pwrite(self.fd, data, offset)

    def inline(self) -> list[bool]:
        main = threading.get_ident()
        return [ident == main for ident, _ in self.calls]

    def close(self):
        os.close(self.fd)


def uncached(path) -> bytearray:
    """Random content written to ``path`` and dropped from the page cache. The kernel
    may keep a page that something (writeback, a read-ahead) still holds at the first
    ``POSIX_FADV_DONTNEED``, so it asks until ``fincore`` counts no page cached."""
    content = bytearray(os.urandom(SIZE))
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
        for _ in range(100):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if cached_bytes(path) == 0:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"{path}: pages stay in the page cache")
    return content


def cached_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_whole_pages_go_inline_and_partial_uncached_pages_to_a_thread(tmp_path):
    path = tmp_path / "f"
    content = uncached(path)
    r = Recorded(path)

    async def main():
        await r.io.write(2 * PAGE, b"A" * PAGE)            # whole page: inline
        await r.io.write(10 * PAGE + 100, b"B" * 50)       # part of an uncached page: thread
        os.pread(r.fd, 1, 20 * PAGE)                       # now cached
        await r.io.write(20 * PAGE + 7, b"C" * 10)         # part of a cached page: inline
        await r.io.write(30 * PAGE + 1, b"D" * PAGE)       # straddles two uncached pages: thread

    try:
        trio.run(main)
        assert r.inline() == [True, False, True, False]
        for offset, data in ((2 * PAGE, b"A" * PAGE), (10 * PAGE + 100, b"B" * 50),
                             (20 * PAGE + 7, b"C" * 10), (30 * PAGE + 1, b"D" * PAGE)):
            content[offset : offset + len(data)] = data
        assert os.pread(r.fd, SIZE, 0) == bytes(content)
    finally:
        r.close()


def test_a_stalled_inline_write_sends_the_files_writes_to_threads_for_a_while(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "BACKOFF", 0.3)
    path = tmp_path / "f"
    uncached(path)
    r = Recorded(path)

    async def main():
        r.sleep = 2 * fileio.STALL
        await r.io.write(0, b"x" * PAGE)                   # inline, but it stalled
        r.sleep = 0
        await r.io.write(PAGE, b"y" * PAGE)                # backing off: thread
        await trio.sleep(0.35)
        await r.io.write(2 * PAGE, b"z" * PAGE)            # inline again

    try:
        trio.run(main)
        assert r.inline() == [True, False, True]
    finally:
        r.close()


def test_no_inline_write_while_a_write_of_the_file_is_in_a_thread(tmp_path):
    """A thread write holds the file's lock while it waits; an inline write behind it
    would stall the loop, so it goes to a thread too."""
    path = tmp_path / "f"
    uncached(path)
    r = Recorded(path)

    async def main():
        async with trio.open_nursery() as nursery:
            r.sleep = 0.2
            nursery.start_soon(r.io.write, 5 * PAGE + 1, b"s" * 10)   # partial, uncached: thread
            await trio.sleep(0.05)
            r.sleep = 0
            await r.io.write(0, b"w" * PAGE)               # whole page, but a thread write is in flight

    try:
        trio.run(main)
        assert r.inline() == [False, False]
    finally:
        r.close()


def test_reads_are_right_inline_and_from_the_disk(tmp_path):
    path = tmp_path / "f"
    content = uncached(path)
    r = Recorded(path)

    async def main():
        first = await r.io.read(3 * PAGE + 5, 3 * PAGE)     # uncached: a thread
        again = await r.io.read(3 * PAGE + 5, 3 * PAGE)     # cached now: inline
        return first, again

    try:
        first, again = trio.run(main)
        assert first == again == bytes(content[3 * PAGE + 5 : 6 * PAGE + 5])
    finally:
        r.close()


def test_a_readers_io_priority_is_carried_to_the_disk_reads(tmp_path):
    """``ionice -c3``: the idle class is read from the opener's pid, and reads that carry
    it (through AIO, and through a worker thread whose priority is set around the read)
    return the right bytes."""
    from snapfs import aio, ioprio

    sleeper = subprocess.Popen(["ionice", "-c3", "sleep", "5"])
    try:
        time.sleep(0.1)
        prio = ioprio.of(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ioprio.is_idle(prio) and not ioprio.is_idle(ioprio.of(os.getpid()))
    path = tmp_path / "f"
    content = uncached(path)
    r = Recorded(path)
    direct = aio.open_direct(r.fd)
    try:
        got = trio.run(aio.pread, direct, 4 * PAGE, 8 * PAGE, prio)
        assert got == bytes(content[4 * PAGE : 12 * PAGE])
        assert r.io._pread_at(prio, 100, 5000) == bytes(content[100:5100])
        assert ioprio.of(threading.get_native_id()) == 0      # reset after the read
    finally:
        os.close(direct)
        r.close()


def test_concurrent_syncs_share_flushes_and_each_covers_its_writes(tmp_path):
    """Eight clients each write, then sync (a database's commits): a flush that began
    after a client's write covers it, so far fewer than eight flushes run; every sync
    returns only after such a flush ended; a sync with nothing written since the last
    flush runs none; a failed flush fails only the caller that started it."""
    path = tmp_path / "f"
    uncached(path)
    r = Recorded(path)
    flushes: list[tuple[int, float, float]] = []      # (writes before it, start, end)

    def flush():
        t0 = time.monotonic()
        time.sleep(0.05)
        flushes.append((r.io.written, t0, time.monotonic()))

    r.io.written = 0
    wrote_at: dict[int, float] = {}
    synced_at: dict[int, float] = {}

    async def client(k):
        await r.io.write(k * PAGE, bytes([k]) * PAGE)
        wrote_at[k] = time.monotonic()
        await r.io.sync(flush)
        synced_at[k] = time.monotonic()

    async def main():
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(client, k)
        before = len(flushes)
        await r.io.sync(flush)                     # nothing new: no flush
        assert len(flushes) == before

        def failing():
            raise OSError(5, "injected")

        await r.io.write(0, b"z" * PAGE)
        try:
            await r.io.sync(failing)
        except OSError:
            pass
        else:
            raise AssertionError("the flush's error did not reach its caller")
        await r.io.sync(flush)                     # the write is still not durable: a flush
        assert len(flushes) == before + 1

    try:
        trio.run(main)
        assert len(flushes) <= 3, flushes
        for k in range(8):
            assert any(start >= wrote_at[k] and end <= synced_at[k] for _, start, end in flushes), k
    finally:
        r.close()


@pytest.fixture
def lone(tmp_path, monkeypatch):
    """A FileIO with an O_DIRECT descriptor over an uncached file, whose inline page-cache
    attempts are off (a miss of RWF_NOWAIT starts a read-ahead that would cache the next
    pages); ``took`` records each miss's path ("now": the trio thread, "aio"), and
    ``waits[0]`` is what the FUSE queue probe answers."""
    from snapfs import aio, workers

    path = tmp_path / "f"
    content = uncached(path)
    r = Recorded(path)
    direct = aio.open_direct(r.fd)
    if direct is None:
        r.close()
        pytest.skip("the file system of tmp_path refuses O_DIRECT")
    r.io = FileIO(r.fd, r.pread, r.pwrite, direct)
    took: list[str] = []
    waits = [False]
    real_now, real_aio = workers.pread_nowait, aio.pread

    def now(fd, *args):
        if fd == direct:
            took.append("now")
        return real_now(fd, *args)

    async def via_aio(*args):
        took.append("aio")
        return await real_aio(*args)

    monkeypatch.setattr(workers, "pread_nowait", now)
    monkeypatch.setattr(aio, "pread", via_aio)
    monkeypatch.setattr(workers, "_queue_waits", lambda: waits[0])
    monkeypatch.setattr(fileio.HitRate, "worth_trying", lambda self: False)
    yield r, content, took, waits
    os.close(direct)
    r.close()


def test_a_lone_device_miss_is_read_on_the_trio_thread_and_any_other_through_aio(lone, monkeypatch):
    """A device request's miss is read on the trio thread only while it is alone (no
    request waits in the kernel's queue, no other device request ready), at most
    DIRECT_NOW_MAX, page-aligned, of the daemon's own I/O priority, and while such reads
    are fast; every path returns the file's bytes, dirty pages included."""
    from snapfs import workers

    r, content, took, waits = lone

    async def read(page, size=PAGE, prio=0, request=True):
        took.clear()
        if request:
            with workers.priority.request():
                got = await r.io.read(page * PAGE, size, prio)
        else:
            got = await r.io.read(page * PAGE, size, prio)
        assert got == bytes(content[page * PAGE : page * PAGE + size])
        return list(took)

    async def main():
        assert await read(2) == ["now"]
        assert await read(4, 3 * PAGE) == ["now"]
        waits[0] = True
        assert await read(8) == ["aio"]                    # a request waits to be read
        waits[0] = False
        assert await read(10, request=False) == ["aio"]    # an image read, read-ahead
        assert await read(12, prio=3 << 13) == ["aio"]     # an idle-class reader
        with workers.priority.request():                   # another device request ready
            assert await read(14) == ["aio"]
        monkeypatch.setattr(fileio, "DIRECT_NOW_MAX", PAGE)
        assert await read(16, 2 * PAGE) == ["aio"]
        monkeypatch.setattr(fileio, "DIRECT_NOW_MAX", 128 * 1024)
        content[20 * PAGE : 21 * PAGE] = b"d" * PAGE       # dirty in the page cache:
        os.pwrite(r.fd, b"d" * PAGE, 20 * PAGE)           # RWF_NOWAIT refuses both paths
        assert await read(20) == ["now", "aio"]
        monkeypatch.setattr(fileio, "DIRECT_STALL", 0.0)   # every read is "slow" now
        assert await read(24) == ["now"]
        assert await read(26) == ["aio"]

    trio.run(main)
