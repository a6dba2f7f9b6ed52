"""Copy-before-write correctness: every snapshot image equals, byte for byte, the
device content at take time, while writers keep writing, read every way a backup
tool reads (cp, dd, buffered, O_DIRECT, unaligned reads straddling chunk borders)."""

import mmap
import os
import random
import subprocess
import threading
import time

import pytest
from helpers import MiB, make_device, requires_fuse
from workload import (
    Writer,
    chunk_mismatches,
    final_content,
    read_direct,
    region_candidates,
    take_time_content,
)

pytestmark = requires_fuse

CHUNK = 64 * 1024


def timed_take(m, snap_id: str) -> tuple[float, float]:
    t0 = time.monotonic()
    m.ok(f"snapshot_take {snap_id} nofreeze")
    return t0, time.monotonic()


def start_writers(path: str, size: int, count: int, seed: int, direct_one: bool = True) -> list[Writer]:
    """``count`` writers on disjoint regions; region borders are not chunk-aligned so
    writes straddle chunk borders inside regions and near region ends."""
    bounds = [0] + [size * i // count + 777 * i for i in range(1, count)] + [size]
    writers = [Writer(path, bounds[i], bounds[i + 1], seed + i, direct=direct_one and i == 0)
               for i in range(count)]
    for w in writers:
        w.start()
    return writers


def assert_image(m, image: str, initial: bytes, writers, t0: float, t1: float) -> bytes:
    """The image read with cp must be a legal take-time content; return it."""
    copy = m.tmp / "image.copy"
    subprocess.run(["cp", image, str(copy)], check=True)
    got = copy.read_bytes()
    expected = take_time_content(initial, got, writers, t0, t1)
    bad = chunk_mismatches(got, expected, CHUNK)
    if bad and os.environ.get("SNAPFS_DUMP"):
        import pickle
        with open(os.environ["SNAPFS_DUMP"], "wb") as f:
            pickle.dump({"initial": initial, "image": got, "t0": t0, "t1": t1,
                         "logs": [(w.lo, w.hi, list(w.log)) for w in writers]}, f)
    assert not bad, f"image differs from take-time content in chunks {bad[:20]}"
    return expected


def test_image_equals_take_time_content_under_writers(mounter, tmp_path, storage_dir):
    size = 48 * MiB + 12_288          # not a chunk multiple: short last chunk
    src = tmp_path / "d0.img"
    initial = make_device(src, size, seed=7)
    m = mounter({"d0": str(src)})
    snap = m.ok(f"snapshot_create {storage_dir} 256M d0")["id"]
    writers = start_writers(m.dev("d0"), size, 4, seed=100)
    time.sleep(0.5)
    t0, t1 = timed_take(m, snap)
    time.sleep(0.5)
    image = m.image(snap, "d0")
    expected = assert_image(m, image, initial, writers, t0, t1)   # while writers run

    # every reader kind, still under writes
    with open(image, "rb") as f:
        assert f.read() == expected
    assert read_direct(image, size) == expected
    dd = subprocess.run(["dd", f"if={image}", "bs=1M", "iflag=direct", "status=none"],
                        capture_output=True, check=True)
    assert dd.stdout == expected
    check_unaligned_reads(image, expected, writers, t1)

    for w in writers:
        w.stop()
    with open(m.dev("d0"), "rb") as f:
        assert f.read() == final_content(initial, writers)
    with open(image, "rb") as f:
        assert f.read() == expected, "image changed after the writers stopped"
    info = m.ok("snapshot_info d0")
    assert info["error_code"] == 0


def check_unaligned_reads(image: str, expected: bytes, writers, t1: float) -> None:
    """Random unaligned reads straddling chunk borders, including reads that start in a
    chunk copied after take and run into a chunk never written since."""
    size = len(expected)
    written_after = {i for w in writers for x in list(w.log) if x.start > t1
                     for i in range(x.offset // CHUNK, (x.offset + len(x.data) - 1) // CHUNK + 1)}
    touched = {i for w in writers for x in list(w.log)
               for i in range(x.offset // CHUNK, (x.offset + len(x.data) - 1) // CHUNK + 1)}
    borders = [i for i in written_after if i + 1 not in touched and (i + 1) * CHUNK < size]
    assert borders, "workload produced no copied->uncopied border to test"
    rnd = random.Random(5)
    fd = os.open(image, os.O_RDONLY)
    try:
        for i in borders[:50]:
            off = (i + 1) * CHUNK - rnd.randrange(1, CHUNK)
            n = rnd.randrange(2, 3 * CHUNK)
            assert os.pread(fd, n, off) == expected[off : off + n], (off, n)
        for _ in range(300):
            border = rnd.randrange(1, size // CHUNK) * CHUNK
            off = max(0, border - rnd.randrange(1, 3 * CHUNK))
            n = rnd.randrange(1, 4 * CHUNK)
            assert os.pread(fd, n, off) == expected[off : off + n], (off, n)
        tail = os.pread(fd, 10_000, size - 5_000)   # read past the end: short read
        assert tail == expected[size - 5_000 :]
    finally:
        os.close(fd)


def test_two_devices_share_one_point_in_time(mounter, tmp_path, storage_dir):
    size = 16 * MiB
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    init_a, init_b = make_device(a, size, 1), make_device(b, size + 4096, 2)
    m = mounter({"a": str(a), "b": str(b)})
    snap = m.ok(f"snapshot_create {storage_dir} 128M a b")["id"]
    wa = start_writers(m.dev("a"), size, 2, seed=10)
    wb = start_writers(m.dev("b"), size + 4096, 2, seed=20, direct_one=False)
    time.sleep(0.3)
    t0, t1 = timed_take(m, snap)
    time.sleep(0.3)
    for w in wa + wb:
        w.stop()
    assert_image(m, m.image(snap, "a"), init_a, wa, t0, t1)
    assert_image(m, m.image(snap, "b"), init_b, wb, t0, t1)
    with open(m.dev("a"), "rb") as f:
        assert f.read() == final_content(init_a, wa)


def test_candidates_model_detects_foreign_data():
    """Negative control: the model rejects an image holding data written after take."""
    initial = bytes(1000)
    w = Writer("/dev/null", 0, 1000, seed=1)
    from workload import Write
    w.log = [Write(1.0, 2.0, 10, b"a" * 10), Write(5.0, 6.0, 20, b"b" * 10)]
    cands = [c for c, _ in region_candidates(initial, w, 3.0, 4.0)]
    assert len(cands) == 1 and cands[0][10:20] == b"a" * 10 and cands[0][20:30] == bytes(10)
    late = bytearray(cands[0])
    late[20:30] = b"b" * 10
    assert take_time_content(initial, bytes(late), [w], 3.0, 4.0) != bytes(late)


def test_model_accepts_only_page_aligned_torn_prefixes():
    """A write in flight during take may be torn at a page boundary of the file (two
    FUSE requests), never elsewhere, and never with its tail applied alone."""
    from workload import Write
    initial = bytes(20000)
    w = Writer("/dev/null", 0, 20000, seed=1)
    w.log = [Write(3.5, 3.6, 1000, b"n" * 9000)]              # in flight during the take
    image = bytearray(initial)
    image[1000:4096] = b"n" * 3096                             # torn at file offset 4096
    assert take_time_content(initial, bytes(image), [w], 3.0, 4.0) == bytes(image)
    image[4096:4100] = b"nnnn"                                 # torn mid-page: illegal
    assert take_time_content(initial, bytes(image), [w], 3.0, 4.0) != bytes(image)
    tail = bytearray(initial)
    tail[4096:10000] = b"n" * 5904                             # tail without head: illegal
    assert take_time_content(initial, bytes(tail), [w], 3.0, 4.0) != bytes(tail)


@pytest.mark.parametrize("where", ["device", "image"])
def test_boundaries(mounter, tmp_path, storage_dir, where):
    """blksnap test_boundary: first/last block of chunks written on the device or on the
    image; neighbours untouched; writes straddling a chunk border on the image; the
    short last chunk."""
    size = 4 * MiB + 1234 * 512     # last chunk short (sources are whole sectors)
    src = tmp_path / "d.img"
    initial = make_device(src, size, seed=3)
    m = mounter({"d": str(src)})
    snap = m.snapshot(storage_dir, "64M", "d")
    dev, img = m.dev("d"), m.image(snap, "d")
    target = dev if where == "device" else img
    model_dev, model_img = bytearray(initial), bytearray(initial)
    model = model_dev if where == "device" else model_img
    rnd = random.Random(9)
    last_chunk = (size - 1) // CHUNK
    chunks = rnd.sample(range(1, last_chunk - 1, 3), 12)
    writes = []
    for c in chunks:
        writes.append((c * CHUNK, 512))                       # first block
        writes.append(((c + 1) * CHUNK - 512, 512))           # last block
    for c in chunks[:4]:
        writes.append(((c + 1) * CHUNK - 512, 1024))          # two blocks across the border
    writes.append((last_chunk * CHUNK, 512))                  # first block of the short chunk
    writes.append((size - 300, 300))                          # its very end
    # O_DIRECT writes reach snapfs whole (buffered ones may be split per page):
    # one block on each side of a border between two untouched chunks.
    direct = [((c + 2) * CHUNK - 4096, 8192) for c in chunks[4:8]]
    fd = os.open(target, os.O_WRONLY)
    dfd = os.open(target, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 8192)
    try:
        for off, n in writes + direct:
            data = rnd.randbytes(n)
            if (off, n) in direct:
                buf[:n] = data
                assert os.pwritev(dfd, [buf], off) == n
            else:
                assert os.pwrite(fd, data, off) == n
            model[off : off + n] = data
            check_both(dev, img, model_dev, model_img, off, n)
    finally:
        os.close(fd)
        os.close(dfd)
    with open(dev, "rb") as f:
        assert f.read() == bytes(model_dev)
    with open(img, "rb") as f:
        assert f.read() == bytes(model_img)
    if where == "image":
        assert src.read_bytes() == initial, "an image write reached the source"


def check_both(dev, img, model_dev, model_img, off, n):
    """Neighbourhood of a write: the block before, the chunk, the block after."""
    lo = max(0, (off // CHUNK - 1) * CHUNK)
    hi = min(len(model_dev), ((off + n) // CHUNK + 2) * CHUNK)
    for path, model in ((dev, model_dev), (img, model_img)):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, hi - lo, lo) == bytes(model[lo:hi]), (path, off, n)
        finally:
            os.close(fd)


def test_destroy_while_image_read_and_device_written(mounter, tmp_path, storage_dir):
    size = 32 * MiB
    src = tmp_path / "d.img"
    initial = make_device(src, size, seed=4)
    m = mounter({"d": str(src)})
    snap = m.snapshot(storage_dir, "128M", "d")
    writers = start_writers(m.dev("d"), size, 2, seed=50)
    image = m.image(snap, "d")
    dd = subprocess.Popen(["dd", f"if={image}", "of=/dev/null", "bs=4k", "iflag=direct"],
                          stderr=subprocess.PIPE)
    fd = os.open(image, os.O_RDWR)
    img_writes = threading.Thread(target=hammer_image, args=(fd, size), daemon=True)
    img_writes.start()
    time.sleep(0.3)
    m.ok(f"snapshot_destroy {snap}")
    dd.wait(timeout=30)
    img_writes.join(30)
    assert not img_writes.is_alive()
    with pytest.raises(OSError):
        os.pread(fd, 4096, 0)
    os.close(fd)
    time.sleep(0.2)
    for w in writers:
        w.stop()
    with open(m.dev("d"), "rb") as f:
        assert f.read() == final_content(initial, writers)
    assert not os.path.exists(image)
    assert os.listdir(storage_dir) == []


def hammer_image(fd: int, size: int) -> None:
    """Write the image until it fails (destroy): EIO or ENOENT, never a hang."""
    rnd = random.Random(8)
    try:
        while True:
            os.pwrite(fd, rnd.randbytes(5000), rnd.randrange(0, size - 5000))
    except OSError:
        return
