"""Containers and shared hosts (issue 12): one daemon per source, naming the mount
that serves it; paths in the caller's mount namespace; real containers made with
bubblewrap and unshare reading images, driving the control file, and running snapfs;
systemd readiness.

Whatever could block on a mount runs under ``bounded``, whose timeout aborts the FUSE
connection; every container is a child process killed at the end of its test, so no
mount, loop device or namespace outlives a test.
"""

import os
import subprocess

from helpers import MiB, is_mounted, make_device, requires_fuse, run, snapfs

pytestmark = requires_fuse


def second_mount(tmp_path, source: str) -> subprocess.CompletedProcess:
    mnt = tmp_path / "second"
    mnt.mkdir()
    result = snapfs("mount", "--state-dir", str(tmp_path / "st2"), str(mnt), f"again={source}")
    assert not is_mounted(str(mnt))
    return result


# ----- item 1: one daemon per source, and the refusal names the mount serving it ------------

def test_a_second_mount_of_a_served_file_names_the_serving_mount(mounter, tmp_path, device):
    m = mounter({"d0": device[0]})
    link = tmp_path / "other-name.img"
    os.symlink(device[0], link)                     # any path to the same file
    result = second_mount(tmp_path, str(link))
    assert result.returncode == 1, result
    assert f"the snapfs mounted at {m.path} (pid {m.proc.pid})" in result.stderr, result.stderr


def test_a_second_mount_of_a_served_block_device_names_the_serving_mount(mounter, tmp_path):
    backing = tmp_path / "bdev.img"
    make_device(backing, 4 * MiB)
    loop = run("losetup", "--find", "--show", str(backing))
    try:
        m = mounter({"b": loop})
        result = second_mount(tmp_path, loop)
        assert result.returncode == 1, result
        assert f"the snapfs mounted at {m.path}" in result.stderr, result.stderr
        m.ok("detach b")
        m.stop()
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_busy_source_no_snapfs_claims_says_so(mounter, tmp_path):
    """A block device mounted by something else: still EBUSY, and no mount named."""
    backing = tmp_path / "bdev.img"
    make_device(backing, 4 * MiB)
    loop = run("losetup", "--find", "--show", str(backing))
    fd = os.open(loop, os.O_RDONLY | os.O_EXCL)      # as a mounted filesystem holds it
    try:
        result = second_mount(tmp_path, loop)
        assert result.returncode == 1 and "no snapfs mount claims it" in result.stderr, result.stderr
    finally:
        os.close(fd)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
