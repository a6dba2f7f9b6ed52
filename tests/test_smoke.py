"""The shortest end-to-end path: mount, write, take, image equals take-time content."""

import os
import subprocess

import pytest
from helpers import requires_fuse

pytestmark = requires_fuse


def test_mount_take_read_destroy(mounter, device, storage_dir):
    path, content = device
    m = mounter({"d0": path})
    assert sorted(os.listdir(m.path)) == ["audit", "cbt", "control", "devices", "snapshots", "status"]
    assert os.path.getsize(m.dev("d0")) == len(content)
    snap = m.snapshot(storage_dir, "64M", "d0")
    fd = os.open(m.dev("d0"), os.O_WRONLY)
    os.pwrite(fd, b"x" * 200_000, 12345)
    os.close(fd)
    with open(m.image(snap, "d0"), "rb") as f:
        assert f.read() == content
    with open(m.dev("d0"), "rb") as f:
        assert f.read(12345 + 200_000)[12345:] == b"x" * 200_000
    m.ok(f"snapshot_destroy {snap}")
    assert not os.path.exists(m.image(snap, "d0"))


def _dirty_pages(path) -> int:
    """nr_dirty of the file's page cache, by the cachestat syscall (Linux 6.5+)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    rng = (ctypes.c_uint64 * 2)(0, 0)                 # offset 0, length 0 = whole file
    stat = (ctypes.c_uint64 * 5)()                    # cache, dirty, writeback, evicted, recently_evicted
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, rng, stat, 0) != 0:  # SYS_cachestat on x86_64
            pytest.skip(f"cachestat: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return stat[1]


def test_sync_of_a_device_file_makes_its_source_durable(mounter, device):
    """Take does not fsync the sources (README); `sync MNT/devices/NAME` is the way to
    make one durable, so it must reach the source's write-back."""
    path, _ = device
    m = mounter({"d0": path})
    fd = os.open(m.dev("d0"), os.O_WRONLY)
    os.pwrite(fd, b"y" * 1024 * 1024, 4096)
    os.close(fd)
    assert _dirty_pages(path) > 0
    subprocess.run(["sync", m.dev("d0")], check=True)
    assert _dirty_pages(path) == 0


def test_the_daemon_can_see_whether_requests_wait_in_the_fuse_queue(mounter, device):
    """The probe that lets a lone device read wait for the disk on the trio thread
    (``mount.fuse_queue_probe``) needs the daemon's one /dev/fuse descriptor; with
    none or several it is not made, and a connection that is not mounted answers
    "waits" (POLLERR), never "alone"."""
    from snapfs import mount

    m = mounter({"d0": device[0]})
    links = [os.readlink(f"/proc/{m.proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{m.proc.pid}/fd")]
    assert links.count("/dev/fuse") == 1
    assert mount.fuse_queue_probe() is None                 # this process has none
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        probe = mount.fuse_queue_probe()
        assert probe is not None and probe() is True
        second = os.open("/dev/fuse", os.O_RDWR)
        try:
            assert mount.fuse_queue_probe() is None
        finally:
            os.close(second)
    finally:
        os.close(fd)
