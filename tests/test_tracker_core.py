"""The write path below FUSE: DISCARD/punch-hole counts as a write (CBT + COW), and
the write gate holds writes during take."""

import os

import trio
import trio.testing
from helpers import MiB

from snapfs.diffstorage import DiffStorage
from snapfs.params import Params
from snapfs.snapshot import Snapshot
from snapfs.source import Source
from snapfs.tracker import Tracker

PARAMS = Params(chunk_minimum=64 * 1024, diff_storage_minimum=8 * MiB)


def make(tmp_path, size=4 * MiB):
    path = tmp_path / "d.img"
    data = os.urandom(size)
    path.write_bytes(data)
    tracker = Tracker("d", Source.open(str(path)), PARAMS)
    store = DiffStorage.open(str(tmp_path), 64 * MiB, PARAMS.diff_storage_minimum, lambda st: None)
    snap = Snapshot(store, PARAMS)
    snap.add(tracker)
    return tracker, snap, data


async def test_discard_copies_before_punching_and_marks_cbt(tmp_path):
    tracker, snap, data = make(tmp_path)
    snap.switch()
    before = bytes(tracker.cbt.write_map)
    await tracker.discard(100_000, 300_000)
    assert await tracker.read(100_000, 300_000) == bytes(300_000)          # punched: zeros
    assert await snap.areas["d"].read(0, len(data)) == data                # image kept the old data
    changed = [i for i, (a, b) in enumerate(zip(before, tracker.cbt.write_map, strict=True)) if a != b]
    bs = tracker.cbt.block_size
    assert changed == list(range(100_000 // bs, (400_000 - 1) // bs + 1))
    snap.destroy().close()


async def test_gate_holds_writes_until_open(tmp_path):
    tracker, snap, _ = make(tmp_path)
    tracker.gate.close()
    done = []

    async def writer():
        await tracker.write(0, b"x" * 10)
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done and await tracker.read(0, 10) != b"x" * 10
        tracker.gate.open()
    assert done and await tracker.read(0, 10) == b"x" * 10
    snap.destroy().close()


async def test_take_does_not_fsync_the_sources(tmp_path):
    """Take never fsyncs (snapshot.py docstring: it stalled writers 28-45 ms); the image
    is right without it, from the page cache the source shares."""
    from snapfs.snapshot import point_in_time

    tracker, snap, data = make(tmp_path)

    def failing_fsync():
        raise AssertionError("take called fsync on a source")

    tracker.source.fsync = failing_fsync
    frozen = await point_in_time(snap, set, nofreeze=True)
    assert frozen == []
    assert snap.taken and tracker.area is snap.areas["d"]
    await tracker.write(0, b"x" * 100)
    assert await snap.areas["d"].read(0, len(data)) == data
    snap.destroy().close()


async def test_image_reads_across_stored_runs(tmp_path):
    """Image reads merge copied chunks whose slots follow each other into one storage
    read. Chunks copied in the order 2,3,4,1,6,7,8,0 (so chunks 2-4 and 6-8 have
    consecutive slots, 0 and 1 do not, 5 is not copied): reads at every unaligned
    start and length over them must still return the take-time bytes."""
    tracker, snap, data = make(tmp_path, size=8 * 64 * 1024 + 1024)   # partial last chunk
    snap.switch()
    cs = snap.areas["d"].chunk_size
    for chunk in (2, 3, 4, 1, 6, 7, 8, 0):
        await tracker.write(chunk * cs + 17, b"\x01" * 5)
    area = snap.areas["d"]
    assert [area.slots[c] // cs for c in (2, 3, 4, 1)] == [0, 1, 2, 3]  # the order made runs
    for start in range(0, len(data), cs // 3):
        for length in (1, cs - 1, cs + 2, 3 * cs + 5, len(data)):
            assert await area.read(start, length) == data[start : start + length], (start, length)
    snap.destroy().close()


# ----- per-chunk ordering with I/O in worker threads -----------------------------------------

def slow(io, call: str, seconds: float = 0.2) -> None:
    """Make a file's data path (``FileIO``) run every call in a worker thread, and the
    first blocking ``call`` ("pread" or "pwrite") sleep there first, so other requests
    run while it is in flight."""
    real = getattr(io, call)
    armed = [True]

    def sleepy(*args):
        if armed[0]:
            armed[0] = False
            import time
            time.sleep(seconds)
        return real(*args)

    io.inline = False
    setattr(io, call, sleepy)


async def test_a_second_write_waits_for_the_chunks_copy(tmp_path):
    """While chunk 0's copy is in flight (a slow storage write), a second write to
    chunk 0 must not reach the source, and an image read of chunk 0 sees old data."""
    tracker, snap, data = make(tmp_path)
    snap.switch()
    area = snap.areas["d"]
    slow(area.storage.io, "pwrite")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracker.write, 0, b"A" * 10)
        await trio.sleep(0.05)                             # A's copy is in flight
        nursery.start_soon(tracker.write, 100, b"B" * 10)
        await trio.sleep(0.05)
        assert os.pread(tracker.source.fd, 10, 100) == data[100:110], "B passed the copy"
        assert await area.read(0, 200) == data[:200]
    assert await area.read(0, 64 * 1024) == data[: 64 * 1024]
    assert os.pread(tracker.source.fd, 110, 0) == b"A" * 10 + data[10:100] + b"B" * 10


async def test_an_image_read_racing_a_copy_and_write_rereads(tmp_path):
    """An image read of an uncopied chunk is in flight (a slow source read) while a
    device write copies that chunk and changes the source: the read must notice the
    copy and return the take-time data, not the new bytes."""
    tracker, snap, data = make(tmp_path)
    snap.switch()
    area = snap.areas["d"]
    slow(area.source.io, "pread")                      # the image read's source read
    result: list[bytes] = []

    async def read():
        result.append(await area.read(0, 4096))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.sleep(0.05)                             # the read sleeps in its thread
        await tracker.write(0, b"N" * 4096)                # copies (fast) and writes
    assert os.pread(tracker.source.fd, 4096, 0) == b"N" * 4096
    assert result == [data[:4096]]
