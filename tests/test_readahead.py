"""Read-ahead of a sequential image reader (snapfs/readahead.py): pieces are read ahead,
and a read answered from one returns exactly what the image holds at the read, with
image writes, device writes, failures and parallel readers in between. Below FUSE
(real files as the source and storage), then one check through a real mount."""

import errno
import os
import threading

import pytest
import trio
import trio.testing
from helpers import MiB, make_device, requires_fuse
from test_tracker_core import make, slow

from snapfs import readahead
from snapfs.errors import SnapfsError

SIZE = 4 * MiB
PIECE = 256 * 1024


def counting(area) -> list:
    """Record every area.read (offset, size) made through ``area``."""
    calls: list = []
    real = area.read

    async def read(offset, size, prio=0, **kw):
        calls.append((offset, size))
        return await real(offset, size, prio, **kw)

    area.read = read
    return calls


async def streaming(tmp_path):
    """A taken snapshot of a SIZE device and an image handle after three sequential
    reads: its read-ahead has started. (tracker, snap, data, image)"""
    tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    image = snap.image("d")
    for off in range(0, 3 * PIECE, PIECE):
        assert await image.read(off, PIECE) == data[off : off + PIECE]
    return tracker, snap, data, image


async def test_a_sequential_reader_gets_pieces_read_ahead(tmp_path):
    _tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    image = snap.image("d")
    calls = counting(snap.areas["d"])
    out = b""
    for off in range(0, SIZE, PIECE):
        out += await image.read(off, PIECE)
        await trio.testing.wait_all_tasks_blocked()
    assert out == data
    # the first MIN_STREAK reads read for themselves, the rest came from pieces of
    # readahead.PIECE: every byte read once, nothing past the end
    assert calls[: readahead.MIN_STREAK] == [(i * PIECE, PIECE) for i in range(readahead.MIN_STREAK)]
    ahead = sorted(calls[readahead.MIN_STREAK :])
    assert [size for _, size in ahead[:-1]] == [readahead.PIECE] * (len(ahead) - 1)
    pos = 0
    for off, size in sorted(calls):
        assert off == pos
        pos += size
    assert pos == SIZE
    assert len(image.ahead.pieces) == 0
    snap.destroy().close()


async def test_device_writes_ahead_of_the_reader_do_not_leak_into_pieces(tmp_path):
    """Pieces read before a device write (source) or after it (stored old data): both
    are the take-time bytes."""
    tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    image = snap.image("d")
    out = b""
    for n, off in enumerate(range(0, SIZE, PIECE)):
        out += await image.read(off, PIECE)
        if n % 2:
            await trio.testing.wait_all_tasks_blocked()
        if off + 2 * PIECE < SIZE:
            await tracker.write(off + 2 * PIECE - 100, b"\xee" * 300)     # straddles pieces
    assert out == data
    snap.destroy().close()


@pytest.mark.parametrize("settle", [True, False])
async def test_an_image_write_inside_the_window_is_seen(tmp_path, settle):
    """R1: an image write into a range already read ahead (settled or still in
    flight) is what the next read of it returns."""
    _tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    image, writer = snap.image("d"), snap.image("d")
    for off in range(0, 3 * PIECE, PIECE):
        assert await image.read(off, PIECE) == data[off : off + PIECE]
    assert image.ahead.pieces, "nothing was read ahead"
    if settle:
        await trio.testing.wait_all_tasks_blocked()
    target = 4 * PIECE + 1000
    await writer.write(target, b"\x77" * 5000)
    expected = bytearray(data)
    expected[target : target + 5000] = b"\x77" * 5000
    for off in range(3 * PIECE, SIZE, PIECE):
        assert await image.read(off, PIECE) == expected[off : off + PIECE], off
    snap.destroy().close()


async def test_no_piece_starts_while_an_image_write_is_in_flight(tmp_path):
    """R1's other half: a piece started during a write could read the range before the
    write lands and be used after it: none is started then."""
    _tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    area = snap.areas["d"]
    image, writer = snap.image("d"), snap.image("d")
    slow(area.storage.io, "pwrite", 0.3)
    target = 3 * PIECE + 10
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, target, b"\x55" * 100)
        await trio.sleep(0.05)                       # the write is in flight
        for off in range(0, 3 * PIECE, PIECE):
            assert await image.read(off, PIECE) == data[off : off + PIECE]
        assert not image.ahead.pieces
    got = await image.read(3 * PIECE, PIECE)
    assert got[10:110] == b"\x55" * 100
    snap.destroy().close()


async def test_a_failed_piece_is_not_the_answer(tmp_path):
    """R3: a piece whose read failed makes the reader read for itself."""
    _tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    area = snap.areas["d"]
    image = snap.image("d")
    real = area.read
    fail = {2 * PIECE}                          # the first piece (see the first test)

    async def flaky(offset, size, prio=0, **kw):
        if offset in fail:
            fail.discard(offset)
            raise SnapfsError(errno.EIO, "injected")
        return await real(offset, size, prio, **kw)

    area.read = flaky
    out = b""
    for off in range(0, SIZE, PIECE):
        out += await image.read(off, PIECE)
        await trio.testing.wait_all_tasks_blocked()
    assert out == data and not fail, "the injected failure was not met"
    snap.destroy().close()


async def test_parallel_readers_get_no_read_ahead(tmp_path):
    """R4: two reads in flight on one handle turn read-ahead off for it."""
    _tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    image = snap.image("d")
    slow(snap.areas["d"].source.io, "pread", 0.1)
    for off in range(0, 3 * PIECE, PIECE):
        await image.read(off, PIECE)
    async with trio.open_nursery() as nursery:
        for off in (3 * PIECE, 7 * PIECE):
            nursery.start_soon(image.read, off, PIECE)
    assert image.ahead.parallel and not image.ahead.pieces
    for off in range(8 * PIECE, 12 * PIECE, PIECE):
        assert await image.read(off, PIECE) == data[off : off + PIECE]
    assert not image.ahead.pieces
    snap.destroy().close()


async def test_a_miss_or_release_cancels_the_pieces(tmp_path):
    _tracker, snap, data, image = await streaming(tmp_path)
    pieces = list(image.ahead.pieces)
    assert pieces[0].offset == 2 * PIECE
    assert pieces[-1].offset + pieces[-1].size == min(2 * PIECE + readahead.WINDOW, SIZE)
    assert await image.read(PIECE // 2, 100) == data[PIECE // 2 : PIECE // 2 + 100]   # R2: a miss
    assert not image.ahead.pieces and all(p.scope.cancel_called for p in pieces)
    for off in range(0, 3 * PIECE, PIECE):
        await image.read(off, PIECE)
    pieces = list(image.ahead.pieces)
    image.close()
    assert not image.ahead.pieces and all(p.scope.cancel_called for p in pieces)
    snap.destroy().close()


async def test_a_destroyed_image_fails_even_from_a_piece(tmp_path):
    _tracker, snap, _data, image = await streaming(tmp_path)
    await trio.testing.wait_all_tasks_blocked()
    assert image.ahead.pieces[0].data is not None
    snap.destroy().close()
    with pytest.raises(SnapfsError) as exc:
        await image.read(3 * PIECE, PIECE)
    assert exc.value.errno == errno.EIO


# ----- through a real mount -------------------------------------------------------------------

@requires_fuse
def test_a_cp_like_reader_sees_an_image_write_made_ahead_of_it(mounter, tmp_path, storage_dir):
    """1 MiB reads one after the other (as cp reads an image) while a second handle
    writes into the image ahead of the reader, and a device writer rewrites the device:
    every read is the take-time content with the image writes made before it."""
    size = 24 * MiB
    src = tmp_path / "d0.img"
    initial = make_device(src, size, seed=3)
    m = mounter({"d0": str(src)})
    snap = m.ok(f"snapshot_create {storage_dir} 256M d0")["id"]
    m.ok(f"snapshot_take {snap} nofreeze")
    image = m.image(snap, "d0")
    stop = threading.Event()

    def device_writer():
        fd = os.open(m.dev("d0"), os.O_WRONLY)
        try:
            pos = 0
            while not stop.is_set():
                os.pwrite(fd, os.urandom(70_000), pos % (size - 70_000))
                pos += 1_234_567
        finally:
            os.close(fd)

    t = threading.Thread(target=device_writer)
    t.start()
    expected = bytearray(initial)
    got = bytearray()
    reader = os.open(image, os.O_RDONLY)
    writer = os.open(image, os.O_WRONLY)
    try:
        for n, off in enumerate(range(0, size, MiB)):
            if n >= 3 and n % 3 == 0:                       # inside the window read ahead
                at = off + 2 * MiB + 4095 * n
                if at + 9000 <= size:
                    blob = os.urandom(9000)
                    assert os.pwrite(writer, blob, at) == 9000
                    expected[at : at + 9000] = blob
            got += os.pread(reader, MiB, off)
    finally:
        stop.set()
        t.join()
        os.close(reader)
        os.close(writer)
    assert bytes(got) == bytes(expected)
    assert m.ok("snapshot_info d0")["error_code"] == 0


async def test_a_piece_that_fails_does_not_corrupt_the_image(tmp_path):
    """R3: an I/O error in a piece read ahead (a bad range the reader has not reached)
    fails only that piece; the image stays usable until a read someone asked for
    meets the error."""
    _tracker, snap, data = make(tmp_path, size=SIZE)
    snap.switch()
    area = snap.areas["d"]
    image = snap.image("d")
    io = area.source.io
    real = io.read
    bad = 3 * MiB

    async def failing(offset, size, prio=0):
        if offset <= bad < offset + size:
            raise OSError(errno.EIO, "injected bad sector")
        return await real(offset, size, prio)

    io.read = failing
    for off in range(0, bad - PIECE, PIECE):       # pieces up to and over the bad range
        assert await image.read(off, PIECE) == data[off : off + PIECE]
        await trio.testing.wait_all_tasks_blocked()
    assert area.error == 0
    with pytest.raises(SnapfsError) as exc:
        await image.read(bad - PIECE, 2 * PIECE)
    assert exc.value.errno == errno.EIO and area.error == errno.EIO
    snap.destroy().close()


async def test_empty_reads_keep_the_pieces_and_busy_devices_get_one_piece(tmp_path):
    """A read at the end returns b"" and keeps the pieces; while the devices are busy
    a reader has one piece ahead (R5)."""
    import time

    from snapfs import workers

    _tracker, snap, _data, image = await streaming(tmp_path)
    pieces = list(image.ahead.pieces)
    assert len(pieces) > 1
    assert await image.read(SIZE, PIECE) == b""
    assert list(image.ahead.pieces) == pieces
    image.close()
    busy = snap.image("d")
    workers.priority.last = time.monotonic()          # a device request just now
    for off in range(0, 3 * PIECE, PIECE):
        await busy.read(off, PIECE)
    assert sum(p.size for p in busy.ahead.pieces) <= readahead.PIECE
    snap.destroy().close()
