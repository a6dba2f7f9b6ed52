"""The shortest end-to-end path: mount, write, take, image equals take-time content."""

import os

from conftest import requires_fuse

pytestmark = requires_fuse


def test_mount_take_read_destroy(mounter, device, storage_dir):
    path, content = device
    m = mounter({"d0": path})
    assert sorted(os.listdir(m.path)) == ["cbt", "control", "devices", "snapshots", "status"]
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
