"""snapfs.fiemap on a real ext4 made on a loop device over a plain file (no snapfs).

The check that matters: the bytes at (filesystem offset + physical) in the backing
file, taken extent by extent, are the file's content.
"""

import contextlib
import errno
import os
import random
import shutil
import struct
import subprocess
import time
import types
from pathlib import Path

import pytest
from helpers import KiB, MiB, run

from snapfs import fiemap
from snapfs.errors import SnapfsError
from snapfs.fiemap import backing_device_file, file_extents

needs_loop = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4"),
    reason="needs root, losetup and mkfs.ext4")


@contextlib.contextmanager
def loop_fs(tmp_path: Path, size: int = 32 * MiB, mkfs: tuple[str, ...] = (), offset: int = 0,
            partition_start: int | None = None):
    """ext4 on a loop device over ``tmp_path/fs.img``; yields (image, mountpoint).

    ``offset``: losetup -o; ``partition_start``: put the filesystem in partition 1 of
    an MBR partition table, starting at that sector. Everything is undone on exit.
    """
    img = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size)
    if partition_start is not None:
        _write_mbr(img, partition_start, (size - offset) // 512 - partition_start)
    loop = None
    try:
        args = ["losetup", "-f", "--show"]
        if offset:
            args += ["-o", str(offset)]
        if partition_start is not None:
            args += ["-P"]
        loop = run(*args, str(img))
        target = loop
        if partition_start is not None:
            target = loop + "p1"
            if not os.path.exists(target) and shutil.which("partx"):
                # kernels without the MBR parser (CONFIG_MSDOS_PARTITION=n) do not scan
                # the table: partx reads it and adds the partition with BLKPG
                run("partx", "-a", loop)
            deadline = time.monotonic() + 5
            while not os.path.exists(target):
                assert time.monotonic() < deadline, f"{target} did not appear"
                time.sleep(0.05)
        run("mkfs.ext4", "-q", "-F", "-b", "4096", *mkfs, target)
        run("mount", "-t", "ext4", target, str(mnt))
        try:
            yield img, mnt
        finally:
            if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        if loop is not None:
            if partition_start is not None and shutil.which("partx"):
                subprocess.run(["partx", "-d", loop], check=False, capture_output=True)
            subprocess.run(["losetup", "-d", loop], check=False)


def _write_mbr(img: Path, start: int, sectors: int) -> None:
    """One Linux partition (type 0x83) from ``start`` for ``sectors`` sectors."""
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, sectors)
    with open(img, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")


def backing_bytes(path: Path) -> bytes:
    """The file's bytes, read from the loop device's backing file at its extents."""
    backing, base = backing_device_file(str(path))
    out = bytearray()
    with open(backing, "rb") as f:
        for physical, length in file_extents(str(path)):
            f.seek(base + physical)
            out += f.read(length)
    return bytes(out)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# ----- real ext4 on a loop device ---------------------------------------------------------

@needs_loop
def test_extents_match_content(tmp_path):
    with loop_fs(tmp_path) as (img, mnt):
        data = random.Random(1).randbytes(3 * MiB + 1000)   # not a block multiple
        write_file(mnt / "f", data)                         # not fsynced: FIEMAP_FLAG_SYNC does it
        extents = file_extents(str(mnt / "f"))
        assert extents
        assert sum(length for _, length in extents) == len(data)
        assert all(phys % 512 == 0 for phys, _ in extents)
        assert backing_device_file(str(mnt / "f")) == (str(img), 0)
        assert backing_bytes(mnt / "f") == data


@needs_loop
def test_fragmented_file_needs_several_fiemap_calls(tmp_path, monkeypatch):
    with loop_fs(tmp_path, size=16 * MiB) as (_, mnt):
        # fill the filesystem with small files, free every other one: a big file written
        # now has to use the gaps
        fillers = []
        chunk = os.urandom(64 * KiB)
        with contextlib.suppress(OSError):
            for i in range(1000):
                p = mnt / f"fill{i}"
                write_file(p, chunk)
                if i % 50 == 0:
                    os.sync()
                fillers.append(p)
        os.sync()
        for p in fillers[::2]:
            p.unlink()
        os.sync()
        data = random.Random(2).randbytes(2 * MiB + 123)
        write_file(mnt / "big", data)
        monkeypatch.setattr(fiemap, "EXTENTS_PER_CALL", 3)
        extents = file_extents(str(mnt / "big"))
        assert len(extents) > 6, extents
        assert sum(length for _, length in extents) == len(data)
        assert backing_bytes(mnt / "big") == data
        monkeypatch.undo()
        assert file_extents(str(mnt / "big")) == extents


@needs_loop
def test_filesystem_on_a_partition_of_a_loop_device(tmp_path):
    with loop_fs(tmp_path, partition_start=2048) as (img, mnt):
        data = random.Random(3).randbytes(MiB + 77)
        write_file(mnt / "f", data)
        assert backing_device_file(str(mnt / "f")) == (str(img), 2048 * 512)
        assert backing_bytes(mnt / "f") == data


@needs_loop
def test_loop_device_with_an_offset(tmp_path):
    with loop_fs(tmp_path, offset=3 * MiB) as (img, mnt):
        data = random.Random(4).randbytes(500 * KiB)
        write_file(mnt / "f", data)
        assert backing_device_file(str(mnt / "f")) == (str(img), 3 * MiB)
        assert backing_bytes(mnt / "f") == data


@needs_loop
def test_sparse_and_preallocated_files(tmp_path):
    with loop_fs(tmp_path) as (_, mnt):
        empty = mnt / "empty"
        write_file(empty, b"")
        assert file_extents(str(empty)) == []

        sparse = mnt / "sparse"
        with open(sparse, "wb") as f:
            f.seek(MiB)
            f.write(b"x" * 8192)
            f.truncate(4 * MiB)
        extents = file_extents(str(sparse))
        assert sum(length for _, length in extents) == 8192, "holes have no extents"
        assert backing_bytes(sparse) == b"x" * 8192

        # preallocated (unwritten) space belongs to the file: reported, no error
        pre = mnt / "pre"
        fd = os.open(pre, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, MiB)
        finally:
            os.close(fd)
        assert sum(length for _, length in file_extents(str(pre))) == MiB

        # allocated past the end (fallocate --keep-size) is not the file's content
        keep = mnt / "keep"
        write_file(keep, b"k" * 5000)
        run("fallocate", "--keep-size", "-o", "0", "-l", str(MiB), str(keep))
        assert sum(length for _, length in file_extents(str(keep))) == 5000
        assert backing_bytes(keep) == b"k" * 5000


@needs_loop
def test_inline_data_is_refused(tmp_path):
    with loop_fs(tmp_path, mkfs=("-O", "inline_data")) as (_, mnt):
        small = mnt / "small"
        write_file(small, b"tiny file kept in the inode")
        with pytest.raises(SnapfsError) as info:
            file_extents(str(small))
        assert info.value.errno == errno.EINVAL
        big = mnt / "big"
        data = os.urandom(100 * KiB)
        write_file(big, data)
        assert backing_bytes(big) == data


# ----- errors that need no loop device ---------------------------------------------------

def test_not_on_a_loop_device(tmp_path):
    p = tmp_path / "f"
    write_file(p, b"data")
    with pytest.raises(SnapfsError) as info:
        backing_device_file(str(p))
    assert info.value.errno == errno.EINVAL


def test_tmpfs_has_no_block_device_nor_fiemap():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    p = Path("/dev/shm") / f"snapfs-fiemap-{os.getpid()}"
    try:
        write_file(p, b"x" * 5000)
        with pytest.raises(SnapfsError) as info:
            backing_device_file(str(p))
        assert info.value.errno == errno.EINVAL
        with pytest.raises(SnapfsError) as info:
            file_extents(str(p))
        assert info.value.errno in (errno.EOPNOTSUPP, errno.ENOTTY)
    finally:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SnapfsError) as info:
        file_extents(str(tmp_path / "nope"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(SnapfsError) as info:
        backing_device_file(str(tmp_path / "nope"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(SnapfsError) as info:
        file_extents(str(tmp_path))
    assert info.value.errno == errno.EINVAL


# ----- the ioctl protocol, with a fake ioctl ---------------------------------------------

def fake_ioctl(extents: list[tuple[int, int, int, int]], calls: list):
    """An FS_IOC_FIEMAP that serves ``extents`` (logical, physical, length, flags)
    like the kernel: from fm_start on, at most fm_extent_count per call."""

    def ioctl(fd, request, buf, mutate):
        assert request == fiemap.FS_IOC_FIEMAP and mutate
        start, length, flags, _, count, _ = struct.unpack_from("=QQIIII", buf)
        assert flags & fiemap.FIEMAP_FLAG_SYNC and length == 2**64 - 1
        assert len(buf) == 32 + 56 * count
        calls.append(start)
        todo = [e for e in extents if e[0] + e[2] > start][:count]
        struct.pack_into("=QQIIII", buf, 0, start, length, flags, len(todo), count, 0)
        for i, (lg, ph, ln, fl) in enumerate(todo):
            struct.pack_into("=QQQ16xI12x", buf, 32 + 56 * i, lg, ph, ln, fl)
        return 0

    return types.SimpleNamespace(ioctl=ioctl)


LAST = fiemap.FIEMAP_EXTENT_LAST


@pytest.fixture
def file_of(tmp_path):
    def make(size: int) -> str:
        p = tmp_path / "fake"
        with open(p, "wb") as f:
            f.truncate(size)
        return str(p)
    return make


def test_fake_loops_until_last_and_merges(file_of, monkeypatch):
    extents = [
        (0, 4096 * 10, 4096, 0),
        (4096, 4096 * 11, 4096, 0),            # contiguous: merged with the first
        (8192, 4096 * 50, 8192, 0),
        (16384, 4096 * 60, 4096, fiemap.FIEMAP_EXTENT_UNWRITTEN),
        (65536, 4096 * 70, 4096, 0),           # after a hole
        (69632, 4096 * 71, 8192, LAST),        # extends past the end: clipped
    ]
    calls: list[int] = []
    monkeypatch.setattr(fiemap, "fcntl", fake_ioctl(extents, calls))
    monkeypatch.setattr(fiemap, "EXTENTS_PER_CALL", 2)
    result = file_of(69632 + 5000)
    assert file_extents(result) == [
        (4096 * 10, 8192), (4096 * 50, 8192), (4096 * 60, 4096), (4096 * 70, 4096 + 5000)]
    assert calls == [0, 8192, 20480]


def test_fake_stops_when_nothing_is_mapped(file_of, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(fiemap, "fcntl", fake_ioctl([(0, 8192, 4096, 0)], calls))
    monkeypatch.setattr(fiemap, "EXTENTS_PER_CALL", 1)
    assert file_extents(file_of(MiB)) == [(8192, 4096)]     # no LAST flag: the rest is a hole
    assert calls == [0, 4096]


@pytest.mark.parametrize("flags", [
    fiemap.FIEMAP_EXTENT_UNKNOWN,
    fiemap.FIEMAP_EXTENT_UNKNOWN | fiemap.FIEMAP_EXTENT_DELALLOC,
    fiemap.FIEMAP_EXTENT_ENCODED,
    fiemap.FIEMAP_EXTENT_ENCODED | fiemap.FIEMAP_EXTENT_DATA_ENCRYPTED,
    fiemap.FIEMAP_EXTENT_NOT_ALIGNED,
    fiemap.FIEMAP_EXTENT_NOT_ALIGNED | fiemap.FIEMAP_EXTENT_DATA_INLINE,
    fiemap.FIEMAP_EXTENT_NOT_ALIGNED | fiemap.FIEMAP_EXTENT_DATA_TAIL,
])
def test_fake_unusable_extents_raise_einval(file_of, monkeypatch, flags):
    extents = [(0, 4096, 4096, 0), (4096, 1 << 20, 4096, flags | LAST)]
    monkeypatch.setattr(fiemap, "fcntl", fake_ioctl(extents, []))
    with pytest.raises(SnapfsError) as info:
        file_extents(file_of(8192))
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("extent", [(0, 4096 + 100, 4096, LAST), (0, 4096, 1000, LAST)])
def test_fake_misaligned_numbers_raise_einval(file_of, monkeypatch, extent):
    monkeypatch.setattr(fiemap, "fcntl", fake_ioctl([extent], []))
    with pytest.raises(SnapfsError) as info:
        file_extents(file_of(4096))
    assert info.value.errno == errno.EINVAL
