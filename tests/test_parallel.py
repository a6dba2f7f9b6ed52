"""Copy-before-write under parallel I/O: many writers on the same chunks, image readers
reading those chunks while their copies are in flight, writes straddling chunk
borders, O_DIRECT and buffered, on a file source and on an uncached block device (a
loop device with --direct-io=on).

The oracle is simple: the snapshot is taken before the writers start, so every image
read, at any moment, must equal the take-time content byte for byte. The writers own
interleaved 4 KiB blocks of the same chunks, so the device's final content is known
too.
"""

import mmap
import os
import random
import threading
import time

from helpers import KiB, MiB, make_device, requires_fuse, run

pytestmark = requires_fuse

CHUNK = 256 * KiB         # big chunks: a copy takes a while, so races have room
SIZE = 16 * MiB
HOT = 6 * CHUNK           # each round, every writer and reader works in one window
WRITERS = 6
READERS = 4
ROUNDS = 8
ROUND_SECONDS = 0.4
OPTIONS = ["--chunk-minimum", "256K", "--diff-storage-minimum", "16M"]


def aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)


class Worker(threading.Thread):
    def __init__(self, path: str, seed: int, direct: bool, window: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.path, self.seed, self.direct, self.window, self.stop = path, seed, direct, window, stop
        self.error: BaseException | None = None
        self.count = 0

    def run(self):
        fd = os.open(self.path, (os.O_RDWR if isinstance(self, Writer) else os.O_RDONLY)
                     | (os.O_DIRECT if self.direct else 0))
        try:
            rnd = random.Random(self.seed)
            while not self.stop.is_set():
                self.step(fd, rnd)
                self.count += 1
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(fd)


class Writer(Worker):
    """Writes runs of its own 4 KiB blocks (block % WRITERS == k) in the window, 1 to
    3 blocks long, so runs straddle chunk borders; buffered or O_DIRECT."""

    def __init__(self, path, k, direct, window, stop, model: bytearray):
        super().__init__(path, k * 1000 + window, direct, window, stop)
        self.k, self.model, self.buf = k, model, aligned(4096)

    def step(self, fd, rnd):
        block = self.window // 4096 + rnd.randrange(HOT // 4096 // WRITERS) * WRITERS + self.k
        data = rnd.randbytes(4096)
        self.buf[:] = data
        os.pwritev(fd, [self.buf], block * 4096)
        self.model[block * 4096 : (block + 1) * 4096] = data


class Reader(Worker):
    """Reads random ranges of the window of the image (crossing chunks, unaligned when
    buffered) and compares each with the take-time content."""

    def __init__(self, path, k, direct, window, stop, expected: bytes):
        super().__init__(path, 100 + k * 1000 + window, direct, window, stop)
        self.expected, self.bad, self.buf = expected, [], aligned(HOT)

    def step(self, fd, rnd):
        if self.direct:
            offset = self.window + rnd.randrange(HOT // 4096 - 1) * 4096
            length = rnd.randrange(1, (self.window + HOT - offset) // 4096 + 1) * 4096
        else:
            offset = self.window + rnd.randrange(HOT - 1)
            length = rnd.randrange(1, self.window + HOT - offset + 1)
        n = os.preadv(fd, [memoryview(self.buf)[:length]], offset)
        if n != length or self.buf[:n] != self.expected[offset : offset + n]:
            self.bad.append((offset, length))


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def hammer(m, device: str, source: str, initial: bytes, storage_dir: str) -> None:
    """ROUNDS rounds of: take; writers and readers on one window of uncopied chunks;
    check every read, the whole image and the device; destroy."""
    model = bytearray(initial)
    rnd = random.Random(5)
    counts = [0, 0]
    for _ in range(ROUNDS):
        expected = bytes(model)
        drop_cache(source)
        snap = m.snapshot(storage_dir, "64M", device)
        image = m.image(snap, device)
        window = rnd.randrange((SIZE - HOT) // CHUNK) * CHUNK
        stop = threading.Event()
        writers = [Writer(m.dev(device), k, k % 2 == 0, window, stop, model) for k in range(WRITERS)]
        readers = [Reader(image, k, k % 2 == 1, window, stop, expected) for k in range(READERS)]
        for t in writers + readers:
            t.start()
        time.sleep(ROUND_SECONDS)
        stop.set()
        for t in writers + readers:
            t.join(60)
            assert not t.is_alive() and t.error is None, t.error
        bad = [b for r in readers for b in r.bad]
        assert not bad, f"image reads differed from take-time content: {bad[:10]}"
        with open(image, "rb") as f:
            assert f.read() == expected
        counts[0] += sum(w.count for w in writers)
        counts[1] += sum(r.count for r in readers)
        m.ok(f"snapshot_destroy {snap}")
    with open(m.dev(device), "rb") as f:
        assert f.read() == bytes(model)
    assert counts[0] > 500 and counts[1] > 200, counts


def test_parallel_writers_and_readers_on_a_file_source(mounter, tmp_path, storage_dir):
    initial = make_device(tmp_path / "d.img", SIZE, seed=9)
    m = mounter({"d": str(tmp_path / "d.img")}, options=OPTIONS)
    hammer(m, "d", str(tmp_path / "d.img"), initial, storage_dir)


def test_parallel_writers_and_readers_on_an_uncached_block_device(mounter, tmp_path, storage_dir):
    initial = make_device(tmp_path / "disk.img", SIZE, seed=10)
    loop = run("losetup", "--find", "--show", "--direct-io=on", str(tmp_path / "disk.img"))
    try:
        m = mounter({"b": loop}, options=OPTIONS)
        hammer(m, "b", loop, initial, storage_dir)
        m.ok("detach b")
    finally:
        run("losetup", "-d", loop)


def test_a_device_request_is_answered_while_many_image_reads_wait(mounter, tmp_path, storage_dir):
    """The workload before the backup: 160 O_DIRECT readers of a snapshot image keep
    requests parked in the daemon (image reads take turns on the disk), and a device
    read still gets its answer at once, not after the image reads queued before it."""
    make_device(tmp_path / "disk.img", 64 * MiB, seed=11)
    loop = run("losetup", "--find", "--show", "--direct-io=on", str(tmp_path / "disk.img"))
    try:
        m = mounter({"b": loop}, options=OPTIONS)
        snap = m.snapshot(storage_dir, "64M", "b")
        stop = threading.Event()
        done = [0]

        def image_reader(seed):
            fd = os.open(m.image(snap, "b"), os.O_RDONLY | os.O_DIRECT)
            buf, rnd = aligned(MiB), random.Random(seed)
            try:
                while not stop.is_set():
                    os.preadv(fd, [buf], rnd.randrange(63) * MiB)
                    done[0] += 1
            finally:
                os.close(fd)

        readers = [threading.Thread(target=image_reader, args=(k,), daemon=True) for k in range(160)]
        for t in readers:
            t.start()
        time.sleep(1.0)
        before = done[0]
        waits = []
        fd = os.open(m.dev("b"), os.O_RDONLY | os.O_DIRECT)
        buf, rnd = aligned(4096), random.Random(3)
        try:
            for _ in range(20):
                t0 = time.monotonic()
                os.preadv(fd, [buf], rnd.randrange(16384) * 4096)
                waits.append(time.monotonic() - t0)
                time.sleep(0.02)
        finally:
            os.close(fd)
        queued = done[0] - before
        stop.set()
        for t in readers:
            t.join(60)
        m.ok(f"snapshot_destroy {snap}")
        m.ok("detach b")
    finally:
        run("losetup", "-d", loop)
    waits.sort()
    print("device read waits (ms):", [round(w * 1000, 1) for w in waits], "image reads meanwhile:", queued)
    assert queued > 20, "the image readers did not run"
    assert waits[len(waits) // 2] < 0.05 and waits[-1] < 0.5, waits
