"""Paths with spaces, tabs and backslashes everywhere that matters: the mountpoint,
sources, storage, and a filesystem stacked on a device. The kernel escapes these in
/proc/self/mountinfo; snapfs reads that file in one place (``snapfs.mountinfo``)."""

import os
import subprocess

from helpers import MiB, SnapMount, abort_fuse, bounded, make_device, requires_fuse

from snapfs import mountinfo
from snapfs.client import snapfs_mounts

ODD = "snap shots\tand\\back"


def test_parse_line_unescapes_every_path():
    line = (rb"36 35 98:0 /sub\040dir /mnt/snap\040shots\011x\134y rw,noatime master:1"
            rb" - fuse.snapfs /dev/a\040b rw,user_id=0")
    m = mountinfo.parse_line(line + b"\n")
    assert m.mountpoint == "/mnt/snap shots\tx\\y" and m.root == "/sub dir"
    assert m.fstype == "fuse.snapfs" and m.source == "/dev/a b"
    assert (os.major(m.dev), os.minor(m.dev)) == (98, 0)


@requires_fuse
def test_odd_paths_everywhere(tmp_path):
    base = tmp_path / ODD
    base.mkdir()
    src = base / "fs img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    other = base / "d 1.img"
    make_device(other, MiB)
    m = SnapMount(base, {"fs": str(src), "d1": str(other)})
    loop, fsmnt = None, base / "stacked fs"
    try:
        m.start()
        assert m.path in snapfs_mounts()
        assert mountinfo.at(m.path).fstype == "fuse.snapfs"
        # storage inside the mount is refused: the guard found the mount's device
        reply = m.ctl(f"snapshot_create '{m.p('devices')}' 16M d1")
        assert reply["errno"] == "EINVAL" and "inside this snapfs mount" in reply["error"], reply
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", m.dev("fs")], check=True)
        loop = subprocess.run(["losetup", "--find", "--show", m.dev("fs")], check=True,
                              capture_output=True, text=True).stdout.strip()
        fsmnt.mkdir()
        subprocess.run(["mount", loop, str(fsmnt)], check=True)
        store = base / "store dir"
        store.mkdir()
        snap = m.ok(f"snapshot_create '{store}' 64M fs d1")["id"]
        reply = bounded(lambda: m.ok(f"snapshot_take {snap}"), 30,
                        lambda: (abort_fuse(m.path), subprocess.run(["fsfreeze", "-u", str(fsmnt)])))
        assert reply["frozen"] == [str(fsmnt)]                       # found and frozen
        assert m.ok("status")["snapshots"][snap]["storage"] == f"tmpfile in {store}"
        m.ok(f"snapshot_destroy {snap}")
        subprocess.run(["umount", str(fsmnt)], check=True)
        subprocess.run(["losetup", "-d", loop], check=True)
        loop = None
        m.stop()
    finally:
        subprocess.run(["umount", "-l", str(fsmnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        m.cleanup()
