"""snapfs.aio: O_DIRECT reads through Linux AIO on the trio thread, against real files
(no FUSE): every byte equal to the file's, the cases that must fall back to a thread
(None), errors raised, reads that cannot be cancelled, and the end of a run."""

import errno
import os
import random

import pytest
import trio

from snapfs import aio
from snapfs.source import Source

MiB = 1024 * 1024


@pytest.fixture
def datafile(tmp_path):
    """A 4 MiB + 8 KiB random file, written back and dropped from the page cache (an
    O_DIRECT read of dirty pages answers EAGAIN). Returns (path, content)."""
    path = tmp_path / "data.img"
    content = random.Random(7).randbytes(4 * MiB + 8192)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return path, content


def direct(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        dfd = aio.open_direct(fd)
    finally:
        os.close(fd)
    if dfd is None:
        pytest.skip("the file system of tmp_path refuses O_DIRECT")
    return dfd


async def test_concurrent_reads_return_the_files_bytes(datafile):
    """64 reads at once, 4 KiB to 1.5 MiB (several pieces), page-aligned: each one
    served by AIO and equal to the file."""
    path, content = datafile
    fd = direct(path)
    rng = random.Random(1)
    jobs = []
    for _ in range(64):
        size = rng.choice([4096, 8192, 65536, aio.PIECE, aio.PIECE + 4096, 3 * aio.PIECE // 2,
                           MiB, 3 * MiB // 2])
        offset = rng.randrange(0, (len(content) - size) // 4096 + 1) * 4096
        jobs.append((offset, size))
    results = {}

    async def one(i, offset, size):
        results[i] = await aio.pread(fd, offset, size)

    try:
        async with trio.open_nursery() as nursery:
            for i, (offset, size) in enumerate(jobs):
                nursery.start_soon(one, i, offset, size)
    finally:
        os.close(fd)
    for i, (offset, size) in enumerate(jobs):
        assert results[i] == content[offset:offset + size], (offset, size)


async def test_what_aio_cannot_serve_is_none(datafile, tmp_path):
    """Unaligned offset or size, nothing to read, a read past the end of the file
    (short): None, so the caller reads through a thread."""
    path, content = datafile
    fd = direct(path)
    try:
        assert await aio.pread(fd, 512, 4096) is None
        assert await aio.pread(fd, 4096, 1000) is None
        assert await aio.pread(fd, 0, 0) is None
        assert await aio.pread(fd, len(content) - 4096, 3 * 4096) is None     # short
        assert await aio.pread(fd, 0, 4096) == content[:4096]
    finally:
        os.close(fd)


async def test_dirty_pages_are_never_read_stale(datafile):
    """A buffered write not yet written back: the O_DIRECT read must not return the
    old bytes (RWF_NOWAIT answers EAGAIN: None, and the thread path reads the cache)."""
    path, _ = datafile
    fd = direct(path)
    wfd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(wfd, b"\xab" * 8192, 65536)
        got = await aio.pread(fd, 65536, 8192)
        assert got is None or got == b"\xab" * 8192
    finally:
        os.close(wfd)
        os.close(fd)


async def test_an_io_error_is_raised(datafile):
    """The kernel's error comes back as OSError, as os.pread would raise it."""
    path, _ = datafile
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)        # not readable: EBADF
    try:
        with pytest.raises(OSError) as exc:
            await aio.pread(fd, 0, 4096)
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_reads_in_flight_finish_although_cancelled_and_each_run_has_its_own_ring(datafile):
    """A submitted read cannot be cancelled: the task gets its bytes; the run ends
    cleanly (the reaper drains and closes), and the next run works."""
    path, content = datafile
    fd = direct(path)
    got = []

    async def main():
        async def one(offset):
            got.append((offset, await aio.pread(fd, offset, 65536)))

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for k in range(32):
                    nursery.start_soon(one, k * 65536)
                await trio.lowlevel.checkpoint()
                scope.cancel()

    try:
        trio.run(main)
        assert len(got) == 32
        for offset, data in got:
            assert data == content[offset:offset + 65536]
        assert trio.run(aio.pread, fd, 0, 4096) == content[:4096]
    finally:
        os.close(fd)


async def test_more_reads_than_slots_fall_back_and_workers_read_serves_all(datafile):
    """Beyond MAX_IN_FLIGHT pieces at once aio answers None; ``FileIO.read`` then
    reads through a thread: all 400 reads are correct."""
    path, content = datafile
    source = Source.open(str(path))
    source.io.hits.rate = 0.0            # skip the inline attempt, as after misses
    results = {}

    async def one(i):
        offset = (i * 37 % 1000) * 4096
        results[i] = (offset, await source.io.read(offset, 4096))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(400):
                nursery.start_soon(one, i)
    finally:
        source.close()
    assert all(data == content[off:off + 4096] for off, data in results.values())


def test_without_an_aio_context_reads_go_to_threads(datafile, monkeypatch):
    """io_setup refused (fs.aio-max-nr reached): aio answers None for the whole run and
    ``FileIO.read`` serves every read through a thread, correctly."""
    path, content = datafile
    source = Source.open(str(path))
    source.io.hits.rate = 0.0

    def refuse(*args):
        raise OSError(errno.EAGAIN, "io_setup")

    monkeypatch.setattr(aio._k, "io_setup", refuse)

    async def main():
        assert await aio.pread(source.io.direct_fd, 0, 4096) is None
        return [await source.io.read(k * 8192, 8192) for k in range(8)]

    try:
        got = trio.run(main)
    finally:
        source.close()
    assert got == [content[k * 8192:(k + 1) * 8192] for k in range(8)]


def test_without_the_libaio_library_sources_have_no_direct_fd(datafile, monkeypatch):
    """The system's libaio.so.1 missing (the import failed): no O_DIRECT descriptor,
    so every miss reads through a thread; the daemon still starts and serves."""
    path, content = datafile
    monkeypatch.setattr(aio, "_k", None)
    monkeypatch.setattr(aio, "_MISSING", "libaio.so.1: cannot open shared object file")
    source = Source.open(str(path))
    try:
        assert source.io.direct_fd is None
        assert trio.run(source.io.read, 4096, 4096) == content[4096:8192]
    finally:
        source.close()


def test_a_priority_the_daemon_may_not_give_sends_the_read_to_a_thread(datafile):
    """The real-time class of an ``ionice -c1`` reader, for a daemon without
    CAP_SYS_NICE: io_submit answers EPERM, and the read must go to a thread (returning
    None here), not fail (which would corrupt a snapshot image)."""
    import subprocess
    import sys

    path, _ = datafile
    script = (
        "import os, sys, trio\n"
        "from snapfs import aio\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY)\n"
        "dfd = aio.open_direct(fd)\n"
        "print(trio.run(aio.pread, dfd, 0, 4096, 1 << 13 | 4) is None)\n")
    done = subprocess.run(["setpriv", "--bounding-set=-sys_nice,-sys_admin", "--inh-caps=-all",
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_fdatasync_through_aio_and_after_it_reads(datafile):
    """An fdatasync submitted through AIO completes (True) on a file that has data to
    write back, and the slot it used serves reads again afterwards."""
    path, content = datafile
    source = Source.open(str(path))

    async def main():
        os.pwrite(source.fd, b"x" * 4096, 0)           # a dirty page to write back
        assert await aio.fdatasync(source.fd) is True
        again = [await aio.pread(source.io.direct_fd, k * 4096, 4096) for k in range(1, 300)]
        return again

    try:
        again = trio.run(main)
    finally:
        source.close()
    assert again == [content[k * 4096:(k + 1) * 4096] for k in range(1, 300)]
