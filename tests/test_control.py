"""The control file against a real mount (docs/design.md sections 2-4).

Every errno row of the command table, the write/read protocol, the uid check,
malformed lines, the CLI front end, fixed sizes and the modes and owners of the files.
Each test mounts its own filesystem (``mounter``); a mount takes a fraction of a second.
"""

import errno
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import MiB, make_device, read_all, requires_fuse, snapfs_cli

from snapfs import __version__
from snapfs.client import snapfs_mounts

pytestmark = requires_fuse

NOBODY = 65534


# ----- helpers -------------------------------------------------------------------------

def raw_command(m, data: bytes) -> tuple[int | None, dict]:
    """Write ``data`` as is to a fresh control handle; return (errno of the write or
    None if it succeeded, the JSON reply)."""
    fd = os.open(m.p("control"), os.O_RDWR)
    try:
        try:
            n = os.write(fd, data)
            code = None
            assert n == len(data)
        except OSError as exc:
            code = exc.errno
        reply = json.loads(read_all(fd))
    finally:
        os.close(fd)
    return code, reply


def assert_einval(m, data: bytes) -> str:
    """``data`` must fail with EINVAL (write and reply) with a message; returns it."""
    code, reply = raw_command(m, data)
    assert code == errno.EINVAL, (data[:80], code, reply)
    assert reply["ok"] is False and reply["errno"] == "EINVAL", reply
    assert isinstance(reply["error"], str) and reply["error"].strip(), reply
    return reply["error"]


def assert_serving(m) -> None:
    """The daemon is alive and still answers commands."""
    assert m.proc.poll() is None, m.read_log()[-2000:]
    assert m.ok("version")["version"] == __version__


def wait_ok(m, line: str, timeout: float = 3.0) -> dict:
    """Retry a command that may see EBUSY for a moment: FUSE sends RELEASE
    asynchronously, so a close() can return before the daemon has seen it."""
    deadline = time.monotonic() + timeout
    while True:
        reply = m.ctl(line)
        if reply["ok"] or reply["errno"] != "EBUSY" or time.monotonic() > deadline:
            return reply
        time.sleep(0.02)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*snapfs_cli(), *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def system_python() -> str:
    """An interpreter an unprivileged uid can execute (the venv's may live under a
    0700 home directory)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system python3 for the unprivileged child")


def run_as_nobody(script: str, dir_fd: int, dac_override: bool = False) -> dict:
    """Run ``script`` (Python) as uid/gid 65534 with ``dir_fd`` (the mount's root)
    inherited as DIR_FD; the script prints one JSON line, returned decoded.

    pytest's temporary directories are 0700, so the child cannot walk the path to the
    mount: it reaches it through the inherited directory descriptor instead. With
    ``dac_override`` the child keeps CAP_DAC_OVERRIDE (an ambient capability), so the
    kernel's mode check lets it open anything and only snapfs' own uid check remains."""
    cmd = [system_python(), "-I", "-S", "-c", f"DIR_FD = {dir_fd}\n{script}"]
    if dac_override:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) not installed")
        cmd = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               "--inh-caps=+dac_override", "--ambient-caps=+dac_override", *cmd]
        ids = {}
    else:
        ids = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    result = subprocess.run(cmd, **ids, pass_fds=[dir_fd], cwd="/", capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def m(mounter, device):
    """One mount with device d0 (the 8 MiB + 4608 bytes ``device`` fixture)."""
    return mounter({"d0": device[0]})


@pytest.fixture
def two(mounter, device, tmp_path):
    """One mount with devices d0 and d1."""
    other = tmp_path / "disk1.img"
    make_device(other, 1 * MiB, seed=2)
    return mounter({"d0": device[0], "d1": str(other)})


# ----- version, attach, detach -------------------------------------------------------------

def test_version(m):
    reply = m.ok("version")
    assert reply == {"ok": True, "version": __version__}


def test_attach_ok(m, tmp_path):
    path = tmp_path / "new.img"
    make_device(path, 2 * MiB, seed=3)
    reply = m.ok(f"attach n1 {path}")
    assert reply["name"] == "n1" and reply["size"] == 2 * MiB
    assert "n1" in os.listdir(m.p("devices"))
    assert os.path.getsize(m.dev("n1")) == 2 * MiB
    assert os.path.isdir(m.p("cbt", "n1"))


def test_attach_eexist_name_taken(m, tmp_path):
    path = tmp_path / "new.img"
    make_device(path, MiB, seed=3)
    assert m.err(f"attach d0 {path}") == "EEXIST"
    # the original d0 is untouched
    assert os.path.getsize(m.dev("d0")) == 8 * MiB + 4096 + 512


def test_attach_enoent_path(m, tmp_path):
    assert m.err(f"attach n1 {tmp_path / 'missing.img'}") == "ENOENT"
    assert m.err(f"attach n1 {tmp_path / 'no-dir' / 'x.img'}") == "ENOENT"
    assert "n1" not in os.listdir(m.p("devices"))


def test_attach_eacces_path(mounter, m, tmp_path):
    """EACCES as root: the daemon runs as root, so mode bits (a 000 directory or file)
    never deny it anything (CAP_DAC_OVERRIDE). A file whose open for writing is
    refused by its filesystem still gives EACCES: the ``status`` file of a second
    snapfs mount is a regular file that snapfs refuses to open read/write with
    EACCES."""
    other = tmp_path / "other.img"
    make_device(other, MiB, seed=4)
    m2 = mounter({"e0": str(other)})
    assert m.err(f"attach n1 {m2.p('status')}") == "EACCES"
    assert "n1" not in os.listdir(m.p("devices"))


BAD_NAMES = ["../x", ".", "..", "a/b", "''", "n" * 65, "bad*name", "sp\\ ace", "ümlaut"]


def test_attach_einval_bad_name(m, tmp_path):
    path = tmp_path / "new.img"
    make_device(path, MiB, seed=3)
    for name in BAD_NAMES:
        assert m.err(f"attach {name} {path}") == "EINVAL", name
    assert os.listdir(m.p("devices")) == ["d0"]


def test_attach_name_of_64_chars_is_fine(m, tmp_path):
    path = tmp_path / "new.img"
    make_device(path, MiB, seed=3)
    name = "N" * 64
    m.ok(f"attach {name} {path}")
    assert name in os.listdir(m.p("devices"))


def test_attach_einval_not_file_or_bdev(m, tmp_path):
    assert m.err(f"attach n1 {tmp_path}") == "EINVAL"            # a directory
    assert m.err("attach n1 /dev/null") == "EINVAL"              # a character device
    assert os.listdir(m.p("devices")) == ["d0"]


def test_attach_einval_source_inside_mount(m):
    assert m.err(f"attach n1 {m.dev('d0')}") == "EINVAL"
    assert m.err(f"attach n1 {m.p('status')}") == "EINVAL"
    assert os.listdir(m.p("devices")) == ["d0"]


def test_detach_ok_and_enoent(m):
    assert m.err("detach nosuch") == "ENOENT"
    m.ok("detach d0")
    assert os.listdir(m.p("devices")) == []
    assert os.listdir(m.p("cbt")) == []
    assert m.err("detach d0") == "ENOENT"


def test_detach_ebusy_in_snapshot(m, storage_dir):
    snap = m.snapshot(storage_dir, "64M", "d0", take=False)
    assert m.err("detach d0") == "EBUSY"          # created, not taken
    m.ok(f"snapshot_take {snap} nofreeze")
    assert m.err("detach d0") == "EBUSY"          # taken
    m.ok(f"snapshot_destroy {snap}")
    m.ok("detach d0")


def test_detach_ebusy_while_open(m):
    fd = os.open(m.dev("d0"), os.O_RDONLY)
    try:
        assert m.err("detach d0") == "EBUSY"
    finally:
        os.close(fd)
    reply = wait_ok(m, "detach d0")
    assert reply["ok"], reply


# ----- cbtinfo, markdirtyblock ---------------------------------------------------------------

def test_cbtinfo(m, device):
    info = m.ok("cbtinfo d0")
    assert info["device_capacity"] == len(device[1])
    for key in ("block_size", "block_count", "generation_id", "changes_number"):
        assert key in info
    with open(m.p("cbt", "d0", "info")) as f:
        assert json.load(f) == {k: v for k, v in info.items() if k != "ok"}
    assert m.err("cbtinfo nosuch") == "ENOENT"


def test_markdirtyblock(m, device):
    sectors = len(device[1]) // 512            # 16393: the device is 8 MiB + 4608 bytes
    assert m.err("markdirtyblock nosuch 0:1") == "ENOENT"
    m.ok(f"markdirtyblock d0 0:1 {sectors - 1}:1")
    for bad in (f"{sectors - 1}:2", f"{sectors}:1", f"0:{sectors + 1}", f"{10**12}:1", "0:0",
                "abc", "1-2", "-1:1"):
        assert m.err(f"markdirtyblock d0 {bad}") == "EINVAL", bad
    # one bad range among good ones: the whole command fails
    assert m.err(f"markdirtyblock d0 0:1 {sectors}:1") == "EINVAL"


# ----- snapshot_create ---------------------------------------------------------------------

def test_snapshot_create_ok(m, storage_dir):
    reply = m.ok(f"snapshot_create {storage_dir} 64M d0")
    assert uuid.UUID(reply["id"])
    assert os.path.isdir(m.p("snapshots", reply["id"]))
    assert m.ok("snapshot_collect")["ids"] == [reply["id"]]


def test_snapshot_create_enoent_device(m, storage_dir):
    assert m.err(f"snapshot_create {storage_dir} 64M nosuch") == "ENOENT"
    assert m.err(f"snapshot_create {storage_dir} 64M d0 nosuch") == "ENOENT"
    assert m.ok("snapshot_collect")["ids"] == []
    # d0 was not left claimed by the failed create
    m.ok("detach d0")


def test_snapshot_create_ebusy_device_in_other_snapshot(two, storage_dir):
    m = two
    first = m.snapshot(storage_dir, "64M", "d0", take=False)
    assert m.err(f"snapshot_create {storage_dir} 64M d0") == "EBUSY"
    assert m.err(f"snapshot_create {storage_dir} 64M d1 d0") == "EBUSY"
    m.ok(f"snapshot_take {first} nofreeze")
    assert m.err(f"snapshot_create {storage_dir} 64M d0") == "EBUSY"
    assert m.ok("snapshot_collect")["ids"] == [first]
    # d1 was not claimed by the failed create: a snapshot of it alone works
    m.snapshot(storage_dir, "64M", "d1")


def test_snapshot_create_einval_storage_inside_mount(m):
    assert m.err(f"snapshot_create {m.path} 64M d0") == "EINVAL"              # a directory
    assert m.err(f"snapshot_create {m.p('snapshots')} 64M d0") == "EINVAL"
    assert m.err(f"snapshot_create {m.p('store.bin')} 64M d0") == "EINVAL"    # a new file
    assert m.err(f"snapshot_create {m.dev('d0')} 64M d0") == "EINVAL"         # a device file
    assert m.ok("snapshot_collect")["ids"] == []


def test_snapshot_create_einval_storage_is_device_source(two, device):
    m = two
    before = Path(device[0]).read_bytes()
    assert m.err(f"snapshot_create {device[0]} 64M d0") == "EINVAL"
    assert m.err(f"snapshot_create {device[0]} 64M d1") == "EINVAL"   # source of another device
    assert m.err(f"snapshot_create {device[0]} 64M") == "EINVAL"
    assert Path(device[0]).read_bytes() == before
    assert m.ok("snapshot_collect")["ids"] == []


def test_snapshot_create_enospc_existing_storage_bigger_than_limit(m, tmp_path):
    """--diff-storage-minimum 8M: a 1 MiB existing file is small (<= 4M) and is bigger
    than a 512K limit."""
    store = tmp_path / "store.bin"
    store.write_bytes(b"s" * MiB)
    assert m.err(f"snapshot_create {store} 512K d0") == "ENOSPC"
    # an existing file is used as is and left in place, even on failure
    assert store.read_bytes() == b"s" * MiB
    assert m.ok("snapshot_collect")["ids"] == []
    m.ok("detach d0")      # d0 was not left claimed


def test_snapshot_create_einval_bad_size(m, storage_dir):
    for limit in ("12Q", "0", "-5M", "1.5M", "M", "", "12 M"):
        assert m.err(f"snapshot_create {storage_dir} '{limit}' d0") == "EINVAL", limit
    assert m.ok("snapshot_collect")["ids"] == []
    for good in ("64M", "65536K", "1G", "1T", "67108864"):    # binary units are accepted
        snap = m.ok(f"snapshot_create {storage_dir} {good}")["id"]
        m.ok(f"snapshot_destroy {snap}")


def test_snapshot_create_storage_file_created_and_unlinked_at_once(m, tmp_path):
    """A new storage path is created and unlinked at once, so a crash leaves nothing
    behind that a later snapshot could take for a file of the user's."""
    store = tmp_path / "new-store.bin"
    snap = m.snapshot(str(store), "16M", "d0")
    assert not store.exists()
    assert m.ok("status")["snapshots"][snap]["storage"] == f"{store} (unlinked)"
    m.ok(f"snapshot_destroy {snap}")
    assert not store.exists()
    m.ok(f"snapshot_destroy {m.snapshot(str(store), '16M', 'd0')}")   # the name is free again


def test_snapshot_create_existing_storage_file_is_locked(two, tmp_path):
    """Two snapshots naming one existing file would overwrite each other's slots: the
    second gets EBUSY while the first lives, and the file is free after destroy."""
    store = tmp_path / "store.bin"
    store.write_bytes(bytes(16 << 20))
    first = two.snapshot(str(store), "16M", "d0")
    assert two.err(f"snapshot_create {store} 16M d1") == "EBUSY"
    two.ok(f"snapshot_destroy {first}")
    two.ok(f"snapshot_destroy {two.snapshot(str(store), '16M', 'd1')}")


# ----- snapshot_add, take, destroy, collect ------------------------------------------------

def test_snapshot_add(two, storage_dir):
    m = two
    a = m.snapshot(storage_dir, "64M", take=False)
    b = m.snapshot(storage_dir, "64M", take=False)
    assert m.err(f"snapshot_add {uuid.uuid4()} d0") == "ESRCH"
    assert m.err("snapshot_add nosuch d0") == "ESRCH"
    assert m.err(f"snapshot_add {a} nosuch") == "ENOENT"
    m.ok(f"snapshot_add {a} d0")
    assert m.err(f"snapshot_add {a} d0") == "EALREADY"
    assert m.err(f"snapshot_add {b} d0") == "EBUSY"
    m.ok(f"snapshot_add {b} d1")
    m.ok(f"snapshot_take {a} nofreeze")
    assert m.err(f"snapshot_add {a} d0") == "EALREADY"
    info = json.loads(Path(m.p("snapshots", a, "info")).read_text())
    assert list(info["devices"]) == ["d0"]
    assert sorted(os.listdir(m.p("snapshots", a))) == ["d0", "events", "info"]


def test_snapshot_take_errors(m, storage_dir):
    assert m.err(f"snapshot_take {uuid.uuid4()}") == "ESRCH"
    assert m.err("snapshot_take nosuch nofreeze") == "ESRCH"
    empty = m.snapshot(storage_dir, "64M", take=False)
    assert m.err(f"snapshot_take {empty} nofreeze") == "ENODEV"
    m.ok(f"snapshot_add {empty} d0")
    reply = m.ok(f"snapshot_take {empty} nofreeze")
    assert reply["id"] == empty
    assert m.err(f"snapshot_take {empty} nofreeze") == "EALREADY"
    assert m.err(f"snapshot_take {empty}") == "EALREADY"
    assert os.path.exists(m.image(empty, "d0"))


def test_snapshot_destroy_and_collect(two, storage_dir):
    m = two
    assert m.ok("snapshot_collect") == {"ok": True, "ids": []}
    a = m.snapshot(storage_dir, "64M", "d0")
    b = m.snapshot(storage_dir, "64M", "d1", take=False)
    assert sorted(m.ok("snapshot_collect")["ids"]) == sorted([a, b])
    assert m.err(f"snapshot_destroy {uuid.uuid4()}") == "ESRCH"
    assert m.err("snapshot_destroy nosuch") == "ESRCH"
    m.ok(f"snapshot_destroy {a}")
    assert m.err(f"snapshot_destroy {a}") == "ESRCH"
    assert m.ok("snapshot_collect")["ids"] == [b]
    assert not os.path.exists(m.p("snapshots", a))
    m.ok(f"snapshot_destroy {b}")          # a snapshot that was never taken
    assert m.ok("snapshot_collect")["ids"] == []
    assert os.listdir(m.p("snapshots")) == []
    # tracking goes on and the devices are free again
    m.snapshot(storage_dir, "64M", "d0", "d1")


# ----- snapshot_info, snapshot_waitevent ---------------------------------------------------

def test_snapshot_info(two, storage_dir):
    m = two
    assert m.err("snapshot_info nosuch") == "ENOENT"
    assert m.err("snapshot_info d0") == "ESRCH"          # not in a snapshot
    snap = m.snapshot(storage_dir, "64M", "d0")
    reply = m.ok("snapshot_info d0")
    assert reply == {"ok": True, "id": snap, "image": f"snapshots/{snap}/d0", "error_code": 0}
    assert os.path.isfile(m.p(reply["image"]))
    assert m.err("snapshot_info d1") == "ESRCH"
    m.ok(f"snapshot_destroy {snap}")
    assert m.err("snapshot_info d0") == "ESRCH"


def test_snapshot_waitevent_errors(m, storage_dir):
    snap = m.snapshot(storage_dir, "64M", "d0")
    t0 = time.monotonic()
    assert m.err(f"snapshot_waitevent {snap} 50") == "ETIMEDOUT"
    assert time.monotonic() - t0 < 5
    assert m.err(f"snapshot_waitevent {snap} 0") == "ETIMEDOUT"
    assert m.err(f"snapshot_waitevent {uuid.uuid4()} 50") == "ESRCH"
    assert m.err("snapshot_waitevent nosuch 50") == "ESRCH"
    assert m.err(f"snapshot_waitevent {snap} soon") == "EINVAL"


def test_snapshot_waitevent_other_handles_keep_working(m, storage_dir):
    """The kernel runs one write() to the control file at a time (one inode), so a raw
    waitevent holds other commands for its timeout (README, Limits). The CLI waits in
    short slices: while it waits, commands on other handles answer at once, and destroy
    ends the wait with ESRCH."""
    snap = m.snapshot(storage_dir, "64M", "d0")
    waiter = subprocess.Popen([sys.executable, "-m", "snapfs", "-m", m.path, "snapshot_waitevent",
                               snap, "20000"], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        assert m.ok("version")["version"] == __version__
        version_s = time.monotonic() - t0
        assert waiter.poll() is None, "the waiter ended early"
        t0 = time.monotonic()
        m.ok(f"snapshot_destroy {snap}")
        _, stderr = waiter.communicate(timeout=10)
        woke_s = time.monotonic() - t0
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert version_s < 1, f"version took {version_s:.2f} s while a CLI waitevent waited"
    assert waiter.returncode == 1 and "ESRCH" in stderr, stderr
    assert woke_s < 2, f"destroy took {woke_s:.2f} s to end the wait"


# ----- the protocol --------------------------------------------------------------------------

def test_shell_echo_works(m, storage_dir):
    ctl = m.p("control")
    res = subprocess.run(["sh", "-c", f'echo "version" > {ctl}'], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    snap = m.snapshot(storage_dir, "64M", "d0", take=False)
    res = subprocess.run(["sh", "-c", f'echo "snapshot_take {snap} nofreeze" > {ctl}'],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert os.path.exists(m.image(snap, "d0"))
    # a failing command fails the shell's write
    res = subprocess.run(["sh", "-c", f'echo "detach nosuch" > {ctl}'], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode != 0
    # write then read on one read/write descriptor, from a shell
    res = subprocess.run(["sh", "-c", f'exec 3<>{ctl}; echo snapshot_collect >&3; cat <&3'],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"ok": True, "ids": [snap]}


def test_write_returns_line_length_and_reply_is_read_once(m):
    fd = os.open(m.p("control"), os.O_RDWR)
    try:
        assert os.read(fd, 4096) == b""                 # nothing pending yet
        assert os.write(fd, b"version\n") == 8
        reply = os.read(fd, 65536)                      # the offset is now 8: ignored
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1
        assert json.loads(reply) == {"ok": True, "version": __version__}
        assert os.read(fd, 65536) == b""                # EOF until the next command
        assert os.read(fd, 65536) == b""
        assert os.write(fd, b"version") == 7            # the newline is optional
        assert json.loads(os.read(fd, 65536))["ok"] is True
        assert os.read(fd, 65536) == b""
    finally:
        os.close(fd)


def test_reads_ignore_offset(m):
    fd = os.open(m.p("control"), os.O_RDWR)
    try:
        os.write(fd, b"version\n")
        whole = os.pread(fd, 65536, 123456)
        assert json.loads(whole)["version"] == __version__
        assert os.pread(fd, 65536, 0) == b""
        os.lseek(fd, 1 << 30, os.SEEK_SET)
        os.write(fd, b"snapshot_collect\n")
        assert json.loads(os.pread(fd, 65536, 7)) == {"ok": True, "ids": []}
        # small reads return consecutive pieces of one reply
        os.write(fd, b"version\n")
        pieces = [os.pread(fd, 5, 0) for _ in range(20)]
        assert all(len(p) <= 5 for p in pieces)
        assert json.loads(b"".join(pieces))["version"] == __version__
    finally:
        os.close(fd)


def test_new_command_replaces_unread_all(m):
    fd = os.open(m.p("control"), os.O_RDWR)
    try:
        os.write(fd, b"version\n")
        os.write(fd, b"snapshot_collect\n")
        assert json.loads(read_all(fd)) == {"ok": True, "ids": []}
    finally:
        os.close(fd)


def test_two_handles_have_independent_replies(m):
    a = os.open(m.p("control"), os.O_RDWR)
    b = os.open(m.p("control"), os.O_RDWR | os.O_TRUNC)
    try:
        os.write(a, b"version\n")
        with pytest.raises(OSError) as info:
            os.write(b, b"detach nosuch\n")
        assert info.value.errno == errno.ENOENT
        reply_b = json.loads(read_all(b))
        reply_a = json.loads(read_all(a))
        assert reply_a == {"ok": True, "version": __version__}
        assert reply_b["ok"] is False and reply_b["errno"] == "ENOENT"
        assert read_all(a) == b"" and read_all(b) == b""
    finally:
        os.close(a)
        os.close(b)


def test_failed_reply_has_errno_and_message(m):
    code, reply = raw_command(m, b"detach nosuch\n")
    assert code == errno.ENOENT
    assert set(reply) == {"ok", "errno", "error"}
    assert reply["ok"] is False and reply["errno"] == "ENOENT"
    assert "nosuch" in reply["error"]


def test_write_only_handle(m):
    """echo > control opens O_WRONLY|O_TRUNC: commands work without reading."""
    fd = os.open(m.p("control"), os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.write(fd, b"version\n") == 8
        with pytest.raises(OSError) as info:
            os.write(fd, b"cbtinfo nosuch\n")
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(fd)


# ----- the uid check -------------------------------------------------------------------------

UID_SCRIPT = """
import errno, json, os
out = {}
for name, flags in (("wronly", os.O_WRONLY), ("rdwr", os.O_RDWR), ("trunc", os.O_WRONLY | os.O_TRUNC)):
    try:
        fd = os.open("control", flags, dir_fd=DIR_FD)
    except OSError as exc:
        out[name] = errno.errorcode[exc.errno]
    else:
        try:
            os.write(fd, b"snapshot_create /tmp 1M\\n")
            out[name] = "written"
        except OSError as exc:
            out[name] = "write " + errno.errorcode[exc.errno]
        os.close(fd)
for name in ("status", "cbt/d0/map", "cbt/d0/info"):
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=DIR_FD)
    except OSError as exc:
        out[name] = errno.errorcode[exc.errno]
        continue
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    out[name] = len(data) if name.endswith("map") else json.loads(data)
out["uid"] = os.getuid()
out["cap_eff"] = int(open("/proc/self/status").read().split("CapEff:")[1].split()[0], 16)
print(json.dumps(out))
"""


@pytest.mark.parametrize("dac_override", [False, True], ids=["plain", "cap_dac_override"])
def test_non_root_gets_eacces_on_control_status_and_private_cbt(m, dac_override):
    """A non-root uid gets EACCES opening control for writing, and reading status (it
    names sources and storage) or the CBT map of a 0600 device. With CAP_DAC_OVERRIDE
    the kernel's mode check (default_permissions) passes, so this variant checks
    snapfs' own check of the request's uid on control."""
    os.chmod(m.sources["d0"], 0o600)
    m.ok("detach d0")
    m.ok(f"attach d0 {m.sources['d0']}")      # modes are read at attach
    dir_fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = run_as_nobody(UID_SCRIPT, dir_fd, dac_override)
    finally:
        os.close(dir_fd)
    assert out["uid"] == NOBODY
    assert bool(out["cap_eff"] & (1 << 1)) == dac_override     # CAP_DAC_OVERRIDE is bit 1
    assert out["wronly"] == "EACCES"
    assert out["rdwr"] == "EACCES"
    assert out["trunc"] == "EACCES"
    if dac_override:
        assert out["status"]["version"] == __version__
        assert list(out["status"]["devices"]) == ["d0"]
        assert out["cbt/d0/map"] == m.ok("cbtinfo d0")["block_count"]
        assert out["cbt/d0/info"]["block_count"] == out["cbt/d0/map"]
    else:
        assert out["status"] == out["cbt/d0/map"] == out["cbt/d0/info"] == "EACCES"
    assert m.ok("snapshot_collect")["ids"] == []      # nothing ran
    assert_serving(m)


# ----- malformed lines -----------------------------------------------------------------------

MALFORMED = [
    b"\n", b"   \n", b"\t\n",
    b"frobnicate\n", b"VERSION\n", b"snapshot_frobnicate x\n",
    b"version extra\n", b"attach d0\n", b"attach a b c\n", b"detach\n", b"cbtinfo\n",
    b"markdirtyblock d0\n", b"snapshot_create /tmp\n", b"snapshot_add x\n", b"snapshot_take\n",
    b"snapshot_take x nofreeze extra\n", b"snapshot_take x freeze\n", b"snapshot_destroy\n",
    b"snapshot_collect x\n", b"snapshot_info\n", b"snapshot_waitevent x\n",
    b"snapshot_create DIR 12Q\n",
    b"attach ../x PATH\n", b"attach . PATH\n", b"attach " + b"x" * 65 + b" PATH\n",
    b'attach "unbalanced PATH\n',
    b"version\xff\n", b"\xff\xfe\xfd\n", b"attach d\xc3\x28 PATH\n",
    b"version\nversion\n", b"detach d0\nversion\n", b"version\ndetach d0\n",
    b"version\x00\n", b"detach d0\x00\n",
]


def test_malformed_lines_are_einval(m):
    """Every malformed line fails with EINVAL and a message, runs nothing, and the
    daemon keeps serving. (A zero-byte write never reaches the daemon: the kernel
    answers it with 0 itself.)"""
    wrong = []
    for data in MALFORMED:
        code, reply = raw_command(m, data)
        if code != errno.EINVAL or reply.get("errno") != "EINVAL" or not reply.get("error"):
            wrong.append((data[:60], errno.errorcode.get(code, code), reply))
    assert not wrong, wrong
    assert_serving(m)
    assert os.listdir(m.p("devices")) == ["d0"]     # nothing ran (e.g. detach d0)


def test_garbage_is_einval(m):
    """8 KiB of random bytes, of printable junk, of one letter: EINVAL, short
    messages, and the mount keeps serving."""
    rng = random.Random(7)
    garbage = rng.randbytes(8000)
    assert_einval(m, garbage)
    assert_einval(m, garbage.replace(b"\n", b" ") + b"\n")
    printable = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(8000))
    message = assert_einval(m, printable + b"\n")
    assert len(message) < 1000       # the reply does not echo the line back
    assert_einval(m, b"x" * 8000)
    assert_einval(m, b"attach " + b"n" * 8000 + b" /dev/null\n")
    assert_serving(m)
    assert os.listdir(m.p("devices")) == ["d0"]
    status = json.loads(Path(m.p("status")).read_text())
    assert list(status["devices"]) == ["d0"]


# ----- the CLI -------------------------------------------------------------------------------

def test_cli_version_with_mount_option(m):
    res = run_cli("version", "-m", m.path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"version={__version__}\n"
    res = run_cli("version", "--mount", m.path, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"ok": True, "version": __version__}


def test_cli_mount_option_before_command(m):
    """The form ``snapfs -m MOUNT version`` (global option before the command)."""
    res = run_cli("-m", m.path, "version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"version={__version__}\n"


def test_cli_snapshot_commands(m, storage_dir):
    res = run_cli("snapshot_create", "-m", m.path, storage_dir, "64M", "d0")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("id="), res.stdout
    snap = lines[0][len("id="):]
    assert uuid.UUID(snap)
    res = run_cli("snapshot_take", "-m", m.path, snap, "--nofreeze")
    assert res.returncode == 0, res.stderr
    assert os.path.exists(m.image(snap, "d0"))
    res = run_cli("snapshot_collect", "-m", m.path, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"ok": True, "ids": [snap]}
    res = run_cli("snapshot_collect", "-m", m.path)
    assert res.returncode == 0 and snap in res.stdout, res
    res = run_cli("snapshot_info", "-m", m.path, "d0", "--json")
    assert json.loads(res.stdout)["image"] == f"snapshots/{snap}/d0"
    res = run_cli("status", "-m", m.path, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["snapshots"][snap]["state"] == "taken"
    res = run_cli("snapshot_destroy", "-m", m.path, snap)
    assert res.returncode == 0, res.stderr
    assert m.ok("snapshot_collect")["ids"] == []


def test_cli_failure_exit_status_and_stderr(m):
    res = run_cli("detach", "-m", m.path, "nosuch")
    assert res.returncode == 1
    assert res.stdout == ""
    assert "ENOENT" in res.stderr and "nosuch" in res.stderr
    res = run_cli("snapshot_take", "-m", m.path, str(uuid.uuid4()), "--json")
    assert res.returncode == 1
    assert "ESRCH" in res.stderr
    res = run_cli("version", "-m", str(Path(m.path).parent / "not-a-mount"))
    assert res.returncode == 1
    assert res.stderr.startswith("snapfs: ")
    assert_serving(m)


def test_cli_autodetects_the_only_mount(m):
    if snapfs_mounts() != [m.path]:
        pytest.skip("other snapfs mounts exist (tests running concurrently)")
    res = run_cli("version")
    if res.returncode != 0 and "several snapfs mounts" in res.stderr:
        pytest.skip("another snapfs mount appeared meanwhile")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"version={__version__}\n"
    res = run_cli("snapshot_collect", "--json")
    if res.returncode != 0 and "several snapfs mounts" in res.stderr:
        pytest.skip("another snapfs mount appeared meanwhile")
    assert json.loads(res.stdout) == {"ok": True, "ids": []}


# ----- sizes -----------------------------------------------------------------------------------

def expect_errno(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, (errno.errorcode.get(info.value.errno), fn, args)


def test_device_size_is_fixed(m, device):
    size = len(device[1])
    dev = m.dev("d0")
    expect_errno(errno.EPERM, os.truncate, dev, size - 4096)
    expect_errno(errno.EPERM, os.truncate, dev, size + 4096)
    expect_errno(errno.EPERM, os.truncate, dev, 0)
    fd = os.open(dev, os.O_RDWR)
    try:
        expect_errno(errno.EPERM, os.ftruncate, fd, size // 2)
    finally:
        os.close(fd)
    # O_TRUNC: refused (EPERM) or ignored as on a block device, never a truncation
    try:
        fd = os.open(dev, os.O_WRONLY | os.O_TRUNC)
    except PermissionError:
        pass
    else:
        try:
            assert os.fstat(fd).st_size == size
        finally:
            os.close(fd)
    assert os.path.getsize(dev) == size
    assert os.path.getsize(device[0]) == size
    assert Path(device[0]).read_bytes() == device[1]


def test_device_write_past_end(m, device):
    size = len(device[1])
    fd = os.open(m.dev("d0"), os.O_RDWR)
    try:
        expect_errno(errno.ENOSPC, os.pwrite, fd, b"x", size)
        expect_errno(errno.ENOSPC, os.pwrite, fd, b"x" * 4096, size + MiB)
        # a write straddling the end is cut short at the end
        assert os.pwrite(fd, b"y" * 4096, size - 512) == 512
        os.lseek(fd, 0, os.SEEK_END)
        expect_errno(errno.ENOSPC, os.write, fd, b"z")
    finally:
        os.close(fd)
    assert os.path.getsize(m.dev("d0")) == size
    data = Path(device[0]).read_bytes()
    assert len(data) == size
    assert data[-512:] == b"y" * 512 and data[:-512] == device[1][:-512]


def test_image_size_is_fixed(m, device, storage_dir):
    size = len(device[1])
    snap = m.snapshot(storage_dir, "64M", "d0")
    image = m.image(snap, "d0")
    assert os.path.getsize(image) == size
    expect_errno(errno.EPERM, os.truncate, image, size - 4096)
    expect_errno(errno.EPERM, os.truncate, image, size + 4096)
    expect_errno(errno.EPERM, os.truncate, image, 0)
    fd = os.open(image, os.O_RDWR)
    try:
        expect_errno(errno.EPERM, os.ftruncate, fd, 1)
        expect_errno(errno.ENOSPC, os.pwrite, fd, b"x", size)
        expect_errno(errno.ENOSPC, os.pwrite, fd, b"x", size + MiB)
    finally:
        os.close(fd)
    assert os.path.getsize(image) == size
    assert Path(image).read_bytes() == device[1]


# ----- modes and owners --------------------------------------------------------------------

@pytest.mark.parametrize(("source_mode", "image_mode"), [(0o640, 0o640), (0o666, 0o664)])
def test_modes_and_owners_follow_source(mounter, device, storage_dir, source_mode, image_mode):
    path = device[0]
    os.chmod(path, source_mode)
    os.chown(path, 1234, 1234)
    m = mounter({"d0": path})
    st = os.stat(m.dev("d0"))
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == source_mode
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    snap = m.snapshot(storage_dir, "64M", "d0")
    st = os.stat(m.image(snap, "d0"))
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == image_mode
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    st = os.stat(m.p("control"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    for ro in ("status", f"snapshots/{snap}/info", "cbt/d0/info", "cbt/d0/map"):
        mode = stat.S_IMODE(os.stat(m.p(ro)).st_mode)
        assert mode & 0o222 == 0, (ro, oct(mode))


def test_attached_device_mode_follows_source(m, tmp_path):
    path = tmp_path / "new.img"
    make_device(path, MiB, seed=3)
    os.chmod(path, 0o604)
    os.chown(path, 4321, 99)
    m.ok(f"attach n1 {path}")
    st = os.stat(m.dev("n1"))
    assert stat.S_IMODE(st.st_mode) == 0o604
    assert (st.st_uid, st.st_gid) == (4321, 99)

