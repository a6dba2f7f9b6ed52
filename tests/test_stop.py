"""Operations (issue 19): a stop never cuts off a live filesystem, no reader of a
snapfs file outlives a signal, and `snapfs umount` refuses before it detaches
anything when another mount namespace holds the mount.

Whatever could block on a mount runs under ``bounded`` (its timeout aborts the FUSE
connection) or with a subprocess timeout; every process started here is killed at
the end of its test.
"""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    KiB,
    MiB,
    bounded,
    ext4_on_loop,
    is_mounted,
    requires_fuse,
    run,
    snapfs,
    snapfs_cli,
    sparse,
    state_files,
    unhang,
)

pytestmark = requires_fuse


def wait_for_log(m, text: str, seconds: float = 10) -> str:
    deadline = time.monotonic() + seconds
    while text not in (log := m.read_log()):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


def assert_stopped_cleanly(m, seconds: float = 15) -> None:
    assert bounded(m.proc.wait, seconds, unhang(m)) == 0, m.read_log()[-3000:]
    assert not is_mounted(m.path)
    assert len(state_files(m.state_dir)) == 1                     # CBT saved
    m.check_log()


# ----- 1. a stop waits for the files that are open ---------------------------------------------

def test_sigterm_serves_a_mounted_ext4_until_its_loop_device_is_detached(mounter, tmp_path):
    """SIGTERM with ext4 mounted on a loop device over a device file: the workload
    goes on writing and syncing without an I/O error, the log names the open file,
    its opener and the loop device once, new opens get ESHUTDOWN, commands still
    work; the daemon stops cleanly once the loop device lets go, and the filesystem
    is clean with every file in it."""
    image = sparse(tmp_path / "fs.img", 64 * MiB)
    m = mounter({"fs": image})
    fsmnt = tmp_path / "fsmnt"
    written: dict[str, bytes] = {}
    with ext4_on_loop(m.dev("fs"), fsmnt) as loop:
        m.proc.send_signal(signal.SIGTERM)
        wait_for_log(m, "stop requested while")
        deadline, count = time.monotonic() + 2, 0
        while time.monotonic() < deadline:                       # the workload goes on
            name, data = f"f{count % 40}", os.urandom(256 * KiB)   # 10 MiB at most
            count += 1
            with open(fsmnt / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            run("sync")
            written[name] = data
        assert m.proc.poll() is None
        log = m.read_log()
        assert log.count("stop requested while") == 1, log
        assert "devices/fs (opened by pid" in log and "losetup" in log, log
        assert f"{os.path.basename(loop)} has {m.dev('fs')}" in log, log
        with pytest.raises(OSError) as info:
            open(m.dev("fs"), "rb")                               # noqa: SIM115
        assert info.value.errno == errno.ESHUTDOWN
        assert m.ok("version")
        run("umount", str(fsmnt))
    assert_stopped_cleanly(m)
    assert "every device and image file is closed" in m.read_log()
    fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr        # no aborted journal, no errors
    for name in (min(written), max(written)):
        out = tmp_path / "out"
        run("debugfs", "-R", f"dump /{name} {out}", image)
        assert out.read_bytes() == written[name]


def test_a_second_sigint_soon_after_the_first_forces_the_stop(mounter, device):
    """Ctrl-C twice: the first waits for the open device file, the second (within the
    force window) stops at once; the holder's next read fails, CBT is saved."""
    m = mounter({"d0": device[0]})
    fd = os.open(m.dev("d0"), os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        m.proc.send_signal(signal.SIGINT)
        wait_for_log(m, "stop requested while")
        time.sleep(0.3)
        assert m.proc.poll() is None
        m.proc.send_signal(signal.SIGINT)
        assert_stopped_cleanly(m)
        assert "forcing the stop" in m.read_log()
        with pytest.raises(OSError):
            os.pread(fd, 4096, 4 * MiB)                           # not in the page cache
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_umount_refuses_with_files_open_and_force_stops(mounter, device):
    m = mounter({"d0": device[0]})
    fd = os.open(m.dev("d0"), os.O_RDONLY)
    try:
        result = snapfs("umount", m.path)
        assert result.returncode == 1 and "busy" in result.stderr and "--force" in result.stderr, result
        assert is_mounted(m.path) and os.pread(fd, 10, 0) and m.ok("version")
        result = bounded(lambda: snapfs("umount", "--force", m.path), 60, unhang(m))
        assert result.returncode == 0, result.stderr
        assert_stopped_cleanly(m)
        assert "stop command (force)" in m.read_log()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# ----- 2. no blocked reader outlives a signal --------------------------------------------------

WAITER = """
import sys
from snapfs.client import send
send(sys.argv[1], sys.argv[2])
"""

READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
while os.read(fd, 65536):
    pass
"""


def sigint_default() -> None:
    """In the child before exec: SIGINT's default action. A test run started in the
    background by a shell without job control (``cmd &`` in a script) ignores SIGINT,
    and children inherit the ignoring: SIGINT would then not end the readers."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_blocked_readers_die_within_a_second_of_a_signal(mounter, device, storage_dir, sig):
    """`snapfs watch`, cat and a Python reader blocked at the end of the events file,
    and a raw snapshot_waitevent of a minute: each is gone within a second of SIGINT
    or SIGKILL (the kernel holds a process in a FUSE request until it is answered)."""
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", "d0")
    events = m.p("snapshots", snap, "events")
    cmds = {"watch": [*snapfs_cli(), "watch", "-m", m.path, snap], "cat": ["cat", events],
            "python": [sys.executable, "-c", READER, events],
            "waitevent": [sys.executable, "-c", WAITER, m.path, f"snapshot_waitevent {snap} 60000"]}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    preexec_fn=sigint_default)
             for name, cmd in cmds.items()}
    try:
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs.values()), {n: p.poll() for n, p in procs.items()}
        for p in procs.values():
            p.send_signal(sig)
        t0 = time.monotonic()
        late = {}
        for name, p in procs.items():
            try:
                p.wait(timeout=max(0.05, t0 + 1.0 - time.monotonic()))
            except subprocess.TimeoutExpired:
                late[name] = round(time.monotonic() - t0, 2)
        assert not late, f"still running 1 s after {sig.name}: {late}"
    finally:
        for p in procs.values():
            p.kill()
        m.ok(f"snapshot_destroy {snap}")                # frees any reader still blocked
        for p in procs.values():
            p.wait(timeout=10)
    assert m.ok("version")


INHERITS = """
import os, subprocess, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
child = subprocess.Popen(["cat"], stdin=fd, stdout=subprocess.DEVNULL)
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_reader_that_inherited_the_events_file_dies_within_a_second(mounter, device, storage_dir, sig):
    """cat reading an events file its parent opened (the parent is not signalled): the
    daemon finds it among the file's holders."""
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", "d0")
    parent = subprocess.Popen([sys.executable, "-c", INHERITS, m.p("snapshots", snap, "events")],
                              preexec_fn=sigint_default,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert parent.poll() is None
        t0 = time.monotonic()
        os.kill(child, sig)
        parent.wait(timeout=1.0)                  # it waits for cat, and then exits
        assert time.monotonic() - t0 < 1.0
    finally:
        parent.kill()
        m.ok(f"snapshot_destroy {snap}")          # frees a reader still blocked
        parent.wait(timeout=10)


# ----- 3. umount refuses before it detaches ----------------------------------------------------

def holder(path: str) -> subprocess.Popen:
    """A process in a new mount namespace whose private copy of the mount at ``path``
    an unmount here does not reach."""
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{proc.pid}/comm") as f:
            if f.read().strip() == "sleep":
                return proc
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_umount_refuses_at_once_while_another_namespace_holds_the_mount(mounter, device):
    m = mounter({"d0": device[0]})
    proc = holder(m.path)
    try:
        t0 = time.monotonic()
        result = snapfs("umount", m.path)
        took = time.monotonic() - t0
        assert result.returncode == 1, result
        assert f"pid {proc.pid} (sleep) at {m.path}" in result.stderr, result.stderr
        assert "Nothing was changed" in result.stderr
        assert took < 1.0, took
        assert is_mounted(m.path) and m.ok("version")
        with open(m.dev("d0"), "rb") as f:
            assert f.read(10)
        waiting = subprocess.Popen([*snapfs_cli(), "umount", "--wait", "10", m.path],
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert waiting.poll() is None
        proc.kill()
        proc.wait()
        assert waiting.wait(timeout=30) == 0, waiting.stderr.read()
        assert_stopped_cleanly(m)
    finally:
        proc.kill()
        proc.wait()


def test_umount_force_unmounts_here_and_the_daemon_keeps_serving_the_other(mounter, device):
    m = mounter({"d0": device[0]})
    proc = holder(m.path)
    try:
        result = snapfs("umount", "--force", m.path)
        assert result.returncode == 0 and f"keeps serving pid {proc.pid}" in result.stderr, result
        assert not is_mounted(m.path)
        time.sleep(0.5)
        assert m.proc.poll() is None
        proc.kill()                              # the last mount goes with its namespace
        proc.wait()
        assert bounded(m.proc.wait, 15, unhang(m)) == 0
        assert len(state_files(m.state_dir)) == 1
    finally:
        proc.kill()
        proc.wait()
