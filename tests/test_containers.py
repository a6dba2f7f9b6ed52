"""Containers and shared hosts (issue 12): one daemon per source, naming the mount
that serves it; paths in the caller's mount namespace; real containers made with
bubblewrap and unshare reading images, driving the control file, and running snapfs;
systemd readiness.

Whatever could block on a mount runs under ``bounded``, whose timeout aborts the FUSE
connection; every container is a child process killed at the end of its test, so no
mount, loop device or namespace outlives a test.
"""

import json
import os
import shlex
import subprocess
from pathlib import Path

from helpers import MiB, abort_fuse, bounded, is_mounted, make_device, requires_fuse, run, snapfs

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


# ----- containers made with bubblewrap ----------------------------------------------------------

# a minimal container: the host's /usr read-only, its own /proc, /dev and /tmp, and a new
# mount namespace (bwrap makes every mount in it a slave of the host's)
BWRAP = ["bwrap", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc",
         "--dev", "/dev", "--tmpfs", "/tmp"]


def container(m, script: str, *binds: str, prefix: tuple[str, ...] = (), seconds: float = 30) -> str:
    """Run ``sh -c script`` in a bwrap container with ``binds`` (bwrap options), bounded:
    a hang aborts the mount's FUSE connection. Its stdout; it must exit 0."""
    cmd = [*prefix, *BWRAP, *binds, "sh", "-c", script]

    def go():
        return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 10)

    result = bounded(go, seconds, lambda: abort_fuse(m.path))
    assert result.returncode == 0, (cmd, result.stderr)
    return result.stdout


def control_in(m, line: str, *binds: str) -> dict:
    """One command written from inside a container that has the mount at /snap; its reply."""
    script = f"exec 3<>/snap/control; echo {shlex.quote(line)} >&3; head -n1 <&3"
    return json.loads(container(m, script, "--bind", m.path, "/snap", *binds))


# ----- item 3: paths in the caller's view -----------------------------------------------------

def storage_holds(path: Path, chunk: bytes) -> bool:
    return chunk in path.read_bytes()


def test_a_storage_path_named_in_a_container_is_the_containers(mounter, tmp_path, device):
    """The same path names different files on the host and in the container (the
    container has another directory bound there, and an absolute symlink to a place
    only it has): the storage is the container's file, never the host's; and the
    guards judge what was opened (a path in the container that is the mount or a
    source is refused)."""
    m = mounter({"d0": device[0]})
    host, mine = tmp_path / "hstore", tmp_path / "cstore"
    for d in (host, mine):
        d.mkdir()
        for name in ("store.bin", "store2.bin"):
            (d / name).write_bytes(bytes(8 * MiB))
    os.symlink("/inside/store2.bin", mine / "abs")           # only the container has /inside
    binds = ("--bind", str(mine), str(host), "--bind", str(mine), "/inside",
             "--ro-bind", os.path.dirname(device[0]), "/src")
    old = device[1][:64 * 1024]
    for named, used in ((host / "store.bin", "store.bin"), (host / "abs", "store2.bin")):
        reply = control_in(m, f"snapshot_create {named} 8M d0", *binds)
        assert reply["ok"], reply
        snap = reply["id"]
        shown = m.ok("status")["snapshots"][snap]["storage"]
        m.ok(f"snapshot_take {snap} nofreeze")
        with open(m.dev("d0"), "r+b") as f:                  # copy-before-write into the storage
            f.write(os.urandom(64 * 1024))
        m.ok(f"snapshot_destroy {snap}")
        assert storage_holds(mine / used, old), f"the container's {used} got no copy"
        assert (host / used).read_bytes() == bytes(8 * MiB), f"the host's {used} was written"
        assert shown.startswith(f"{named} (in the mount namespace of pid"), shown
        with open(m.dev("d0"), "r+b") as f:
            f.write(old)
    for line, why in (("snapshot_create /snap/devices 8M d0", "inside this snapfs mount"),
                      (f"snapshot_create /src/{os.path.basename(device[0])} 8M d0", "source of device d0"),
                      ("attach again /src/" + os.path.basename(device[0]), "already attached as d0")):
        reply = control_in(m, line, *binds)
        assert not reply["ok"] and why in reply["error"], (line, reply)
    assert m.ok("snapshot_collect")["ids"] == []


def test_a_new_storage_file_and_a_source_named_in_a_container(mounter, tmp_path, device):
    """A new storage file is created in the container's tmpfs (and unlinked at once);
    a source attached by a container path is the container's file."""
    m = mounter({"d0": device[0]})
    other = tmp_path / "other.img"
    content = make_device(other, MiB, seed=7)
    reply = control_in(m, "snapshot_create /store/new.bin 8M d0", "--tmpfs", "/store")
    assert reply["ok"], reply
    storage = m.ok("status")["snapshots"][reply["id"]]["storage"]
    assert storage.startswith("/store/new.bin (in the mount namespace of pid") and "unlinked" in storage
    m.ok(f"snapshot_destroy {reply['id']}")
    reply = control_in(m, "attach x /dev/disk.img", "--bind", str(other), "/dev/disk.img")
    assert reply["ok"], reply
    with open(m.dev("x"), "rb") as f:
        assert f.read() == content
    m.ok("detach x")
    reply = control_in(m, "attach y /nonexistent.img")
    assert reply["errno"] == "ENOENT" and "mount namespace of pid" in reply["error"], reply
