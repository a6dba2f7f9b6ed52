"""Containers and shared hosts (issue 12): one daemon per source, naming the mount
that serves it; paths in the caller's mount namespace; real containers made with
bubblewrap and unshare reading images, driving the control file, and running snapfs;
systemd readiness.

Whatever could block on a mount runs under ``bounded``, whose timeout aborts the FUSE
connection; every container is a child process killed at the end of its test, so no
mount, loop device or namespace outlives a test.
"""

import contextlib
import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (
    MiB,
    SnapMount,
    abort_fuse,
    bounded,
    is_mounted,
    make_device,
    requires_fuse,
    run,
    snapfs,
    snapfs_cli,
    state_files,
)

from snapfs.client import read_status, send

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


def test_a_crashed_daemons_claim_is_not_believed(mounter, tmp_path, device):
    """After a crash the claim file stays, but nobody holds its lock: a source locked
    by something else is then not said to be served by the dead mount."""
    import fcntl
    m = mounter({"d0": device[0]})
    m.kill()                                            # SIGKILL, then the dead mount cleared
    fd = os.open(device[0], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a snapshot's storage holds it
        result = second_mount(tmp_path, device[0])
        assert result.returncode == 1 and "no snapfs mount claims it" in result.stderr, result.stderr
        assert m.path not in result.stderr
    finally:
        os.close(fd)


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


@pytest.fixture
def claims(tmp_path, monkeypatch):
    """Claims in a directory of this test's; a source file's stat to claim."""
    import snapfs.claims
    base = tmp_path / "claims"
    monkeypatch.setattr(snapfs.claims, "claims_dir", lambda: str(base))
    src = tmp_path / "src.img"
    src.write_bytes(bytes(4096))
    return base, os.stat(src)


def test_a_claim_is_taken_while_another_process_briefly_looks_at_the_old_one(claims):
    """A crashed daemon left a claim file; a refused mount reading it (Claim.read), or
    another mount sweeping stale claims, holds its lock for a moment just as the new
    daemon claims the source: the new daemon must still be named, not go unclaimed."""
    import fcntl
    import threading

    from snapfs.claims import Claim
    base, st = claims
    base.mkdir()
    stale = Claim.file_for(st)
    Path(stale).write_text('{"mountpoint": "/old", "pid": 1}')
    fd = os.open(stale, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)                  # as Claim.read holds it
    threading.Timer(0.05, os.close, [fd]).start()
    assert_claimed_by_us(Claim.take(st, "/new"), st)


def test_a_claim_file_unlinked_as_it_is_locked_is_made_again(claims, monkeypatch):
    """Another mount's sweep removes the stale claim file between the new daemon's
    open and its lock: the claim must not be written into the unlinked file."""
    import fcntl

    import snapfs.claims
    from snapfs.claims import Claim
    base, st = claims
    base.mkdir()
    stale = Claim.file_for(st)
    Path(stale).write_text('{"mountpoint": "/old", "pid": 1}')
    calls = []

    def flock(fd, op):
        if not calls:
            os.unlink(stale)                        # the sweep of another mount, just now
        calls.append(op)
        return fcntl.flock(fd, op)

    monkeypatch.setattr(snapfs.claims, "fcntl", type("F", (), {"flock": staticmethod(flock),
                        **{k: getattr(fcntl, k) for k in ("LOCK_EX", "LOCK_SH", "LOCK_NB")}}))
    monkeypatch.setattr(snapfs.claims, "_remove_stale", lambda base: None)
    claim = Claim.take(st, "/new")
    monkeypatch.setattr(snapfs.claims, "fcntl", fcntl)
    assert_claimed_by_us(claim, st)


def assert_claimed_by_us(claim, st) -> None:
    """``claim`` was taken, and its file names this process and "/new"; released."""
    from snapfs.claims import Claim
    try:
        assert claim is not None
        assert Claim.read(st) == {"mountpoint": "/new", "pid": os.getpid()}
    finally:
        if claim is not None:
            claim.release()


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
    # a proc filesystem only the container has (its own pid namespace): not storage
    reply = control_in(m, "snapshot_create /proc/1/mem 8M d0", "--unshare-pid")
    assert reply.get("errno") == "EINVAL" and "on a proc filesystem" in reply["error"], reply
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
    loop = run("losetup", "--find", "--show", str(other))       # a block device, by its node there
    try:
        reply = control_in(m, "attach b /dev/xdisk", "--dev-bind", loop, "/dev/xdisk")
        assert reply["ok"], reply
        assert m.ok("status")["devices"]["b"]["kind"] == "bdev"
        with open(m.dev("b"), "rb") as f:
            assert f.read() == content
        m.ok("detach b")
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    reply = control_in(m, "attach y /nonexistent.img")
    assert reply["errno"] == "ENOENT" and "mount namespace of pid" in reply["error"], reply


# ----- (a) a rootless backup container reading images --------------------------------------------

BACKUP_GID = 64123      # a group the backup uid is given; any number works


@pytest.fixture
def wide():
    """Mounts under a directory every uid may traverse (pytest's tmp_path is root's
    0700, and a rootless bwrap must reach what it binds). ``wide(sources)`` starts a
    SnapMount; ``wide.base`` is the directory. Everything is unmounted and removed at
    the end."""
    base = Path(tempfile.mkdtemp(prefix="snapfs-ct-", dir="/tmp"))
    base.chmod(0o755)
    mounts: list[SnapMount] = []

    def start(sources: dict, where: Path | None = None, options: list[str] | None = None) -> SnapMount:
        sub = where or base / f"m{len(mounts)}"
        sub.mkdir(exist_ok=True)
        m = SnapMount(sub, sources, options).start()
        mounts.append(m)
        return m

    start.base = base
    start.mounts = mounts
    try:
        yield start
        for m in mounts:
            if m.proc.poll() is None and is_mounted(m.path):
                m.stop()
    finally:
        for m in mounts:
            with contextlib.suppress(Exception):
                m.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(*groups: int) -> tuple[str, ...]:
    """setpriv to uid/gid 65534 (and ``groups``): bwrap then makes a rootless container."""
    grant = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ("setpriv", "--reuid=65534", "--regid=65534", grant, "--")


def test_a_rootless_backup_container_reads_images_byte_exact(wide):
    """uid 65534 in a user namespace, the mount bound read-only: cp and dd iflag=direct
    of an image give the take-time bytes. The source is 0640 root:BACKUP_GID, so the
    image is too: the backup uid reads it through that group, and not without it."""
    src = wide.base / "disk.img"
    content = make_device(src, 8 * MiB, seed=3)
    os.chown(src, 0, BACKUP_GID)
    os.chmod(src, 0o640)
    m = wide({"d0": str(src)})
    store = wide.base / "store"
    store.mkdir()
    snap = m.snapshot(str(store), "16M", "d0")
    with open(m.dev("d0"), "r+b") as f:                     # the workload writes after take
        f.write(os.urandom(MiB))
    out = wide.base / "out"
    out.mkdir()
    out.chmod(0o777)
    binds = ("--ro-bind", m.path, "/snap", "--bind", str(out), "/out")
    image = f"/snap/snapshots/{snap}/d0"
    script = (f"cp {image} /out/cp.img && dd if={image} of=/out/dd.img bs=1M iflag=direct "
              "status=none && id -u")
    assert container(m, script, *binds, prefix=as_nobody(BACKUP_GID)).strip() == "65534"
    assert (out / "cp.img").read_bytes() == content
    assert (out / "dd.img").read_bytes() == content
    denied = container(m, f"cat {image} >/dev/null 2>&1 || echo denied; "
                       "echo x 2>/dev/null >/snap/control || echo read-only", *binds, prefix=as_nobody())
    assert denied.split() == ["denied", "read-only"], denied
    m.ok(f"snapshot_destroy {snap}")


def test_image_group_grants_a_backup_uid_images_and_cbt_of_a_private_source(wide):
    """--image-group: a 0600 root:root source stays private as a device, but its
    images and CBT files are readable by the group, so a rootless backup in that group
    reads the image byte-exact and the CBT map, without touching the source."""
    src = wide.base / "private.img"
    content = make_device(src, 4 * MiB, seed=4)
    os.chmod(src, 0o600)
    m = wide({"d0": str(src)}, options=["--chunk-minimum", "64K", "--diff-storage-minimum", "8M",
                                        "--image-group", str(BACKUP_GID)])
    store = wide.base / "store"
    store.mkdir()
    snap = m.snapshot(str(store), "16M", "d0")
    st = os.stat(m.image(snap, "d0"))
    assert (st.st_gid, st.st_mode & 0o777) == (BACKUP_GID, 0o640), st
    image = f"/snap/snapshots/{snap}/d0"
    script = (f"cat {image} > /out/img; cat /snap/cbt/d0/map > /dev/null && echo map; "
              "cat /snap/devices/d0 > /dev/null 2>&1 || echo device-denied")
    out = wide.base / "out"
    out.mkdir()
    out.chmod(0o777)
    binds = ("--ro-bind", m.path, "/snap", "--bind", str(out), "/out")
    said = container(m, script, *binds, prefix=as_nobody(BACKUP_GID))
    assert said.split() == ["map", "device-denied"], said
    assert (out / "img").read_bytes() == content
    m.ok(f"snapshot_destroy {snap}")


# ----- (b) an agent container driving the control file ------------------------------------------

AGENT = """set -e
exec 3<>/snap/control
echo "snapshot_create /store 64M d0" >&3
id=$(head -n1 <&3 | sed -n 's/.*"id": "\\([^"]*\\)".*/\\1/p')
exec 3>&-
echo "snapshot_take $id" > /snap/control
echo "$id"
read go
cp /snap/snapshots/$id/d0 /backup/d0.img
dd if=/snap/snapshots/$id/d0 of=/backup/d0.dd bs=1M iflag=direct status=none
echo "snapshot_destroy $id" > /snap/control
echo done
"""


def test_an_agent_container_creates_takes_copies_and_destroys(mounter, tmp_path, device):
    """A privileged agent (root, its own mount namespace) with the mount bound at
    /snap and its own tmpfs at /store: the storage is its /store; the backup it copies
    is the take-time content although the workload wrote meanwhile."""
    m = mounter({"d0": device[0]})
    backup = tmp_path / "backup"
    backup.mkdir()
    cmd = [*BWRAP, "--bind", m.path, "/snap", "--tmpfs", "/store", "--bind", str(backup), "/backup",
           "sh", "-c", AGENT]
    agent = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        snap = bounded(agent.stdout.readline, 30, lambda: abort_fuse(m.path)).strip()
        storage = m.ok("status")["snapshots"][snap]["storage"]
        assert storage.startswith("tmpfile in /store (in the mount namespace of pid"), storage
        with open(m.dev("d0"), "r+b") as f:                 # the workload writes after take
            f.write(os.urandom(MiB))
        agent.stdin.write("go\n")
        agent.stdin.flush()
        out = bounded(lambda: agent.communicate(timeout=60)[0], 60, lambda: abort_fuse(m.path))
        assert agent.returncode == 0 and out.strip() == "done", out
    finally:
        agent.kill()
        agent.wait()
    assert (backup / "d0.img").read_bytes() == device[1]
    assert (backup / "d0.dd").read_bytes() == device[1]
    assert m.ok("snapshot_collect")["ids"] == []


# ----- (c) snapfs itself in a privileged container ----------------------------------------------

@contextlib.contextmanager
def shared_dir(path: Path):
    """``path`` made a shared mount (a bind onto itself), so mounts beneath it propagate
    to and from the namespaces that copy it; unmounted (lazily, with all beneath) after."""
    path.mkdir(exist_ok=True)
    run("mount", "--bind", str(path), str(path))
    try:
        run("mount", "--make-shared", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-R", "-l", str(path)], capture_output=True, timeout=30)


def wait_mounted(path: str, proc: subprocess.Popen, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not is_mounted(path):
        assert proc.poll() is None, f"the container exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@contextlib.contextmanager
def snapfs_in_a_container(wide, src: Path):
    """snapfs in its own mount and pid namespaces with its own /proc (unshare, as root:
    /dev/fuse and CAP_SYS_ADMIN), mounted beneath a shared host directory. Yields (mountpoint, the
    daemon's host pid, the container process); the test stops it with `snapfs
    umount`, or it is aborted and killed."""
    with shared_dir(wide.base / "shared") as shared:
        mnt = str(shared / "mnt")
        os.mkdir(mnt)
        cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "unchanged",
               "--mount-proc", sys.executable, "-m", "snapfs", "mount",
               "--log-file", str(wide.base / "c.log"), "--state-dir", str(wide.base / "c-state"),
               "-o", "allow_other", mnt, f"d0={src}"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        try:
            wait_mounted(mnt, proc)
            daemon = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
            yield mnt, daemon, proc
        finally:
            if proc.poll() is None:
                abort_fuse(mnt)
                proc.kill()
                proc.wait()


def create_inside(mnt: str, daemon: str, line: str) -> str:
    """snapshot_create sent from inside the daemon's namespaces (nsenter); its id."""
    inside = ["nsenter", "-t", daemon, "-m", "-p", *snapfs_cli(), "-m", mnt, *line.split()]
    return bounded(lambda: run(*inside), 30, lambda: abort_fuse(mnt)).split("=", 1)[1]


def stop_from_the_host(wide, mnt: str, proc: subprocess.Popen) -> None:
    """`snapfs umount` from the host (retried while busy: loop devices detach
    asynchronously); the daemon exits 0 having saved CBT."""
    deadline = time.monotonic() + 10
    while True:
        result = bounded(lambda: snapfs("umount", mnt), 60, lambda: abort_fuse(mnt))
        if result.returncode == 0 or "busy" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert result.returncode == 0, result.stderr
    assert bounded(proc.wait, 30, lambda: abort_fuse(mnt)) == 0
    assert len(state_files(wide.base / "c-state")) == 1          # CBT saved
    assert "Traceback" not in (wide.base / "c.log").read_text()


def test_snapfs_in_a_privileged_container_serves_the_host(wide):
    """The host sees the container's mount, reads an image byte-exact, sends
    path-free commands, and `snapfs umount` stops it cleanly. A path command from the
    host is refused (the daemon cannot see the host's pid: EXDEV); the same command
    sent inside the container works."""
    src = wide.base / "disk.img"
    content = make_device(src, 8 * MiB, seed=5)
    store = wide.base / "store"
    store.mkdir()
    with snapfs_in_a_container(wide, src) as (mnt, daemon, proc):
        assert bounded(lambda: read_status(mnt), 15, lambda: abort_fuse(mnt))["pid"] == 1
        line = f"snapshot_create {store} 16M d0"
        reply = bounded(lambda: send(mnt, line), 15, lambda: abort_fuse(mnt))
        assert reply["errno"] == "EXDEV" and "pid namespace" in reply["error"], reply
        snap = create_inside(mnt, daemon, line)
        assert bounded(lambda: send(mnt, f"snapshot_take {snap}"), 15, lambda: abort_fuse(mnt))["ok"]
        with open(os.path.join(mnt, "devices", "d0"), "r+b") as f:
            f.write(os.urandom(MiB))
        with open(os.path.join(mnt, "snapshots", snap, "d0"), "rb") as f:
            assert f.read() == content
        stop_from_the_host(wide, mnt, proc)


def test_freeze_from_a_container_reaches_only_its_own_mounts(wide):
    """ext4 on a loop device over the container's device file, mounted on the host
    after the container started: the daemon cannot see that mount, so take lists the
    loop device in not_frozen instead of freezing it."""
    src = wide.base / "fs.img"
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
    store = wide.base / "store"
    store.mkdir()
    with snapfs_in_a_container(wide, src) as (mnt, daemon, proc):
        loop = run("losetup", "--find", "--show", os.path.join(mnt, "devices", "d0"))
        fs = wide.base / "fs"
        fs.mkdir()
        try:
            run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
            run("mount", loop, str(fs))
            snap = create_inside(mnt, daemon, f"snapshot_create {store} 16M d0")
            reply = bounded(lambda: send(mnt, f"snapshot_take {snap}"), 30, lambda: abort_fuse(mnt))
            assert reply["frozen"] == [] and reply["not_frozen"] == [os.path.basename(loop)], reply
            send(mnt, f"snapshot_destroy {snap}")
        finally:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True, timeout=30)
            for _ in range(50):
                if subprocess.run(["losetup", "-d", loop], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        stop_from_the_host(wide, mnt, proc)


# ----- (d) surviving a daemon restart ----------------------------------------------------------

def test_a_container_sees_the_mount_again_after_a_restart_or_a_crash(wide):
    """A shared host directory bound into a container (bwrap binds are slaves of the
    host): a clean restart, and a crash whose dead mount (ENOTCONN) the host clears,
    both show the new mount inside without restarting the container."""
    src = wide.base / "disk.img"
    make_device(src, 4 * MiB, seed=6)
    with shared_dir(wide.base / "shared") as shared:
        cmd = [*BWRAP, "--bind", str(shared), "/data", "sh", "-c",
               "while read x; do ls /data/mnt/devices 2>&1 | tr '\\n' ' '; echo; done"]
        box = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def look() -> str:
            box.stdin.write("\n")
            box.stdin.flush()
            return bounded(box.stdout.readline, 15, lambda: abort_fuse(str(shared / "mnt"))).strip()

        try:
            first = wide({"d0": str(src)}, shared)
            assert look() == "d0"
            result = bounded(lambda: snapfs("umount", first.path), 60, first.abort_connection)
            assert result.returncode == 0, result.stderr         # the unmount reached the container
            assert first.proc.wait(timeout=30) == 0              # a clean restart
            assert "No such file" in look()
            second = wide({"d0": str(src)}, shared)
            assert look() == "d0"
            second.proc.kill()                                   # a crash
            second.proc.wait()
            assert "not connected" in look()                     # ENOTCONN: the daemon is gone
            run("fusermount3", "-u", "-z", second.path)          # the host clears the dead mount
            wide({"d0": str(src)}, shared)
            assert look() == "d0"
        finally:
            box.kill()
            box.wait()


# ----- namespace.View itself: thread ids and pid 0 ---------------------------------------------

def test_a_view_from_a_thread_id_or_pid_0():
    """FUSE reports the opening thread's id (not always a process id), or 0 for a
    thread the daemon's pid namespace cannot see: a thread of this process is in the
    daemon's own view; pid 0 refuses paths with EXDEV and says what to do."""
    import threading

    from snapfs.errors import SnapfsError
    from snapfs.namespace import View

    found = []
    thread = threading.Thread(target=lambda: found.append(View.of_pid(threading.get_native_id())))
    thread.start()
    thread.join()
    assert found[0].pid != os.getpid() and not found[0].foreign
    assert found[0].resolve("/etc").path == "/etc"
    blind = View.of_pid(0)
    with pytest.raises(SnapfsError) as info:
        blind.resolve("/etc")
    assert info.value.errno == errno.EXDEV and "nsenter" in info.value.message


# a daemon in a new pid namespace: which process a FUSE pid names depends on its /proc
VIEW_PROBE = r"""
import json, os, subprocess, sys
from snapfs.errors import SnapfsError
from snapfs.namespace import View
where = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "probe", where], check=True)   # only this namespace has it
open(os.path.join(where, "marker"), "w").close()
child = subprocess.Popen(["sleep", "30"])                               # a sender in the same view
try:
    try:
        found = View.of_pid(child.pid).resolve(os.path.join(where, "marker")).path
    except SnapfsError as exc:
        found = f"{exc.errno_name}: {exc.message}"
    print(json.dumps(found))
finally:
    child.kill()
"""


@pytest.mark.parametrize("own_proc", [False, True], ids=["parents-proc", "own-proc"])
def test_a_view_in_a_new_pid_namespace_never_looks_up_another_process(tmp_path, own_proc):
    """FUSE reports pids in the daemon's pid namespace. With the parent's /proc left
    (unshare --pid without --mount-proc) the same number is another process there, so
    paths must be refused (EXDEV, saying why), not resolved in that process's view;
    with its own /proc, a sender sharing the daemon's view is resolved as its own."""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
           *(["--mount-proc"] if own_proc else []), sys.executable, "-c", VIEW_PROBE, str(tmp_path)]
    found = json.loads(run(*cmd))
    if own_proc:
        assert found == str(tmp_path / "marker"), found
    else:
        assert found.startswith("EXDEV") and "another pid namespace" in found, found
