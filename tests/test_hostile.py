"""Hostile input and hangs: storage or sources the data path would wait on itself
through, clean stops with blocked readers, bounded and validated control input, and
the smaller holes (relative paths, bad state dirs, odd sizes, cached image pages).

Whatever could hang the mount runs under ``bounded``: on a timeout it aborts the FUSE
connection and thaws, so a regression fails the test instead of hanging CI.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    MiB,
    bounded,
    ext4_on_loop,
    is_mounted,
    make_device,
    requires_fuse,
    run,
    snapfs,
    sparse,
    unhang,
)

from snapfs import control
from snapfs.errors import SnapfsError
from snapfs.params import Params
from snapfs.registry import Registry
from snapfs.source import Source

pytestmark = requires_fuse



# ----- 1. nothing the data path could wait on itself through ---------------------------------

def test_storage_on_a_filesystem_stacked_on_a_member_is_refused(mounter, tmp_path):
    """The reported deadlock: storage on the ext4 that sits, through a loop device, on
    the device being snapshotted. Refused at create (EINVAL naming the loop device and
    the device file); if a regression lets it through, the take that would deadlock
    runs bounded and the FUSE connection is aborted."""
    m = mounter({"fs": sparse(tmp_path / "fs.img", 64 * MiB)})
    fsmnt = tmp_path / "fsmnt"
    with ext4_on_loop(m.dev("fs"), fsmnt) as loop:
        (fsmnt / "store").mkdir()
        for store in (fsmnt / "store", fsmnt / "store" / "diff.bin"):
            def attempt(store=store):
                reply = m.ctl(f"snapshot_create {store} 64M fs")
                if reply["ok"]:
                    m.ctl(f"snapshot_take {reply['id']}")
                return reply
            reply = bounded(attempt, 20, unhang(m, str(fsmnt)))
            assert reply["errno"] == "EINVAL", reply
            name = os.path.basename(loop)
            assert name in reply["error"] and m.dev("fs") in reply["error"], reply
        assert m.ok("snapshot_collect")["ids"] == []


def test_sources_the_data_path_would_wait_on_are_refused(mounter, tmp_path):
    """A file in a filesystem stacked on a device of this mount, and a loop device over
    a device file, as sources: every write would come back into this mount."""
    m = mounter({"fs": sparse(tmp_path / "fs.img", 64 * MiB)})
    fsmnt = tmp_path / "fsmnt"
    with ext4_on_loop(m.dev("fs"), fsmnt) as loop:
        inner = sparse(fsmnt / "inner.img", MiB)
        def attach(name, path):
            reply = m.ctl(f"attach {name} {path}")
            if reply["ok"]:          # a regression: never let its stop fsync into itself
                m.ctl(f"detach {name}")
            return reply
        for path in (inner, loop):
            reply = bounded(lambda path=path: attach("x", path), 20, unhang(m))
            assert reply["errno"] == "EINVAL" and "in this snapfs mount" in reply["error"], reply
        bare = run("losetup", "--find", "--show", m.dev("fs"))   # not mounted: not EBUSY either
        try:
            reply = bounded(lambda: attach("y", bare), 20, unhang(m))
            assert reply["errno"] == "EINVAL" and os.path.basename(bare) in reply["error"], reply
        finally:
            run("losetup", "-d", bare)
    assert sorted(m.ok("status")["devices"]) == ["fs"]


def test_a_source_under_a_live_storage_is_refused_at_attach(mounter, tmp_path, device):
    """Storage on ext4 over a loop over a plain file is fine, but that file may then
    not become a device: the storage's writes would change a source behind its
    tracker."""
    host = sparse(tmp_path / "host.img", 32 * MiB)
    m = mounter({"d0": device[0]})
    hostmnt = tmp_path / "hostmnt"
    with ext4_on_loop(host, hostmnt) as loop:
        store = hostmnt / "store"
        store.mkdir()
        snap = m.ok(f"snapshot_create {store} 16M d0")["id"]
        reply = m.ctl(f"attach h {host}")
        assert reply["errno"] == "EINVAL" and os.path.basename(loop) in reply["error"], reply
        assert snap in reply["error"], reply
        m.ok(f"snapshot_destroy {snap}")


async def test_storage_is_checked_again_at_add_and_take(tmp_path, device):
    """In-process: a device that is registered without the attach check (as at mount
    build) and lies under a snapshot's storage makes snapshot_add and snapshot_take
    refuse, naming the loop device and the device."""
    host = sparse(tmp_path / "host.img", 32 * MiB)
    reg = Registry(Params(chunk_minimum=64 * 1024, diff_storage_minimum=8 * MiB))
    reg.add_device("d0", Source.open(device[0]))
    reg.add_device("d1", Source.open(sparse(tmp_path / "d1.img", MiB)))
    hostmnt = tmp_path / "hostmnt"
    with ext4_on_loop(host, hostmnt) as loop:
        (hostmnt / "store").mkdir()
        full = (await control.execute(reg, f"snapshot_create {hostmnt}/store 16M d0"))["id"]
        empty = (await control.execute(reg, f"snapshot_create {hostmnt}/store 16M"))["id"]
        reg.add_device("h", Source.open(host))
        for line in (f"snapshot_take {full} nofreeze", f"snapshot_add {empty} d1"):
            with pytest.raises(SnapfsError) as info:
                await control.execute(reg, line)
            assert info.value.errno == errno.EINVAL, line
            assert os.path.basename(loop) in info.value.message and "device h" in info.value.message
        await reg.stop()
        reg.close_sources()


def test_storage_on_a_snapfs_mount_or_a_pseudo_filesystem_is_refused(mounter, tmp_path, device):
    m = mounter({"d0": device[0]})
    other = mounter({"x": sparse(tmp_path / "x.img", MiB)})
    for store in (other.path, other.p("devices"), other.dev("x"), "/proc/self/mem", "/sys/kernel"):
        reply = m.ctl(f"snapshot_create {store} 16M d0")
        assert reply["errno"] == "EINVAL", (store, reply)
    assert m.ok("snapshot_collect")["ids"] == []


def test_storage_over_a_loop_over_a_block_device_source_is_refused(mounter, tmp_path):
    """A loop device's backing file may be a block device node: the guard follows the
    node's device number (LOOP_GET_STATUS64's lo_rdevice) to the source."""
    under = run("losetup", "--find", "--show", sparse(tmp_path / "under.img", 64 * MiB))
    try:
        m = mounter({"b": under})                          # a block-device source
        mnt = tmp_path / "overmnt"
        with ext4_on_loop(under, mnt) as loop:              # ext4 on a loop over /dev/loopN
            (mnt / "store").mkdir()
            reply = m.ctl(f"snapshot_create {mnt / 'store'} 16M b")
            assert reply["errno"] == "EINVAL" and os.path.basename(loop) in reply["error"], reply
            assert "source of device b" in reply["error"], reply
        m.ok("detach b")
    finally:
        subprocess.run(["losetup", "-d", under], capture_output=True)


def test_a_file_source_is_locked_against_a_second_user(mounter, tmp_path, device, storage_dir):
    """One daemon per source file (a flock for the source's life), and no source that
    is a live snapshot's storage file, or lies under a live snapshot's storage."""
    m = mounter({"d0": device[0]})
    mnt = tmp_path / "second"
    mnt.mkdir()
    result = snapfs("mount", "--state-dir", str(tmp_path / "st2"), str(mnt), f"d0={device[0]}")
    assert result.returncode == 1 and f"the snapfs mounted at {m.path}" in result.stderr, result.stderr
    assert not is_mounted(str(mnt))
    store = tmp_path / "store.bin"
    store.write_bytes(bytes(16 * MiB))
    snap = m.snapshot(str(store), "16M", "d0")
    assert m.err(f"attach s {store}") == "EBUSY"
    host = sparse(tmp_path / "host.img", 32 * MiB)
    hostmnt = tmp_path / "hostmnt"
    with ext4_on_loop(host, hostmnt):
        (hostmnt / "store").mkdir()
        m.ok(f"snapshot_destroy {snap}")
        snap = m.snapshot(str(hostmnt / "store"), "16M", "d0")        # taken: storage on host.img
        reply = m.ctl(f"attach h {host}")
        assert reply["errno"] == "EINVAL" and "under the storage of snapshot" in reply["error"], reply
        m.ok(f"snapshot_destroy {snap}")


# ----- 2. a clean stop ends, whatever readers are blocked ------------------------------------

WAITER = """
import errno, json, sys
from snapfs.client import send
try:
    print(send(sys.argv[1], sys.argv[2])["errno"], flush=True)
except OSError as exc:      # the mount went away before the reply was read
    print(errno.errorcode[exc.errno], flush=True)
"""


def blocked_readers(m, snap: str, waiter: bool = True) -> list[subprocess.Popen]:
    """A reader blocked at the end of the events file, and (``waiter``) a
    snapshot_waitevent of a minute, both really blocked before this returns."""
    procs = [subprocess.Popen(["cat", m.p("snapshots", snap, "events")], stdout=subprocess.PIPE)]
    if waiter:
        line = f"snapshot_waitevent {snap} 60000"
        procs.append(subprocess.Popen([sys.executable, "-c", WAITER, m.path, line],
                                      stdout=subprocess.PIPE, text=True))
    time.sleep(0.5)
    assert all(p.poll() is None for p in procs)
    return procs


def finish(procs: list[subprocess.Popen], seconds: float = 10) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=seconds)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
            pytest.fail(f"{p.args[:2]} stayed blocked")
    return outs


def test_sigterm_with_blocked_readers_stops_cleanly_and_saves_cbt(mounter, device, storage_dir):
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", "d0")
    procs = blocked_readers(m, snap)
    try:
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        rc = bounded(lambda: m.proc.wait(), 15, unhang(m))
        took = time.monotonic() - t0
        events, waited = finish(procs)
    finally:
        for p in procs:
            p.kill()
    assert rc == 0, m.read_log()[-3000:]
    assert events == b""                                        # EOF
    assert waited.strip() == "ESRCH", waited                    # ended by the stop, reply read
    assert took < 2.5 and "still blocked" not in m.read_log(), took
    assert not is_mounted(m.path)
    assert len(list(Path(m.state_dir, "cbt").glob("*.cbt"))) == 1   # CBT saved
    m.check_log()


def test_a_forced_stop_during_a_take_with_freeze_stops_and_thaws(mounter, tmp_path, storage_dir):
    """A forced stop (two SIGTERMs: ext4 holds the device file open, so one would
    wait for it: test_stop.py) waits for a take in progress while the loop still
    serves its freeze (which flushes through this mount); the take then fails, the
    filesystem is thawed, the daemon exits 0."""
    m = mounter({"fs": sparse(tmp_path / "fs.img", 256 * MiB)})
    fsmnt = tmp_path / "fsmnt"
    with ext4_on_loop(m.dev("fs"), fsmnt):
        snap = m.ok(f"snapshot_create {storage_dir} 256M fs")["id"]
        with open(fsmnt / "dirty", "wb") as f:             # a slow freeze: 96 MiB to flush
            f.write(os.urandom(96 * MiB))
        replies: list[dict] = []
        taker = threading.Thread(target=lambda: replies.append(m.ctl(f"snapshot_take {snap}")))
        taker.start()
        time.sleep(0.05)
        m.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)                                    # trio folds signals not yet read
        m.proc.send_signal(signal.SIGTERM)
        rc = bounded(lambda: m.proc.wait(), 30, unhang(m, str(fsmnt)))
        taker.join(10)
        assert rc == 0, m.read_log()[-3000:]
        assert replies and replies[0].get("errno") in (None, "ESRCH", "ESHUTDOWN"), replies
        assert "still blocked" not in m.read_log()
        thawed = subprocess.run(["fsfreeze", "-u", str(fsmnt)], capture_output=True, text=True, timeout=10)
        assert thawed.returncode != 0 and "Invalid argument" in thawed.stderr, thawed   # not frozen


def test_destroy_ends_blocked_readers(mounter, device, storage_dir):
    """Blocked event readers get EOF at destroy. (A pending snapshot_waitevent holds
    the control file, so a destroy can only follow it; the stop test covers it.)"""
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", "d0")
    procs = blocked_readers(m, snap, waiter=False)
    procs += blocked_readers(m, snap, waiter=False)
    try:
        bounded(lambda: m.ok(f"snapshot_destroy {snap}"), 15, unhang(m))
        outs = finish(procs)
    finally:
        for p in procs:
            p.kill()
    assert outs == [b"", b""]
    assert m.ok("version")


def test_umount_with_a_blocked_reader_answers_at_once(mounter, device, storage_dir):
    """``snapfs umount`` refuses a mount with open files (a running backup must not be
    cut off): with a blocked events reader it says so at once and nothing changes."""
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", "d0")
    procs = blocked_readers(m, snap, waiter=False)
    try:
        result = bounded(lambda: snapfs("umount", m.path), 20, unhang(m))
        assert result.returncode == 1 and "busy" in result.stderr, result
        assert m.ok("snapshot_collect")["ids"] == [snap]
        m.ok(f"snapshot_destroy {snap}")
        finish(procs)
    finally:
        for p in procs:
            p.kill()


# ----- 3. bounded control input ----------------------------------------------------------

def write_control(m, data: bytes) -> tuple[int | None, dict, float]:
    fd = os.open(m.p("control"), os.O_RDWR)
    t0 = time.perf_counter()
    try:
        try:
            os.write(fd, data)
            code = None
        except OSError as exc:
            code = exc.errno
        took = time.perf_counter() - t0
        reply = b""
        while chunk := os.read(fd, 65536):
            reply += chunk
    finally:
        os.close(fd)
    return code, json.loads(reply), took


def test_long_lines_get_e2big_at_once_and_stall_no_device(mounter, device, tmp_path):
    """A 1 MiB single-token line (it took 15 s and stalled every device): E2BIG at once,
    and reads of another device keep flowing meanwhile."""
    m = mounter({"d0": device[0], "d1": sparse(tmp_path / "d1.img", MiB)})
    stop, worst, reads = threading.Event(), [0.0], [0]

    def reader():
        fd = os.open(m.dev("d1"), os.O_RDONLY | os.O_DIRECT)
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                os.preadv(fd, [memoryview(buf)], (reads[0] % 256) * 4096)
                worst[0] = max(worst[0], time.perf_counter() - t0)
                reads[0] += 1
        finally:
            os.close(fd)

    import mmap
    buf = mmap.mmap(-1, 4096)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for data in (b"x" * MiB, b"attach " + b"n" * MiB + b" /x\n", b"markdirtyblock d0 " + b"0:1 " * 3000):
            for _ in range(5):
                code, reply, took = write_control(m, data)
                assert code == errno.E2BIG and reply["errno"] == "E2BIG", reply
                assert took < 1.0, took
        longest = "markdirtyblock d0 " + " ".join(f"{i}:1" for i in range(1300))
        assert len(longest) <= 8192
        code, reply, took = write_control(m, longest.encode())
        assert code is None and reply["ranges"] == 1300 and took < 1.0
    finally:
        stop.set()
        thread.join(10)
    assert reads[0] > 10 and worst[0] < 0.5, (reads[0], worst[0])


# ----- 4. every argument validated -------------------------------------------------------

BAD_NUMBERS = [
    "snapshot_waitevent {snap} \u00b2", "snapshot_waitevent {snap} " + "9" * 400,
    "snapshot_waitevent {snap} " + "9" * 5000, "snapshot_waitevent {snap} \u0663",
    "snapshot_waitevent {snap} -1", "snapshot_waitevent {snap} 60001",
    "markdirtyblock d0 0:" + "9" * 5000, "markdirtyblock d0 \u0663:1", "markdirtyblock d0 1:\u00b2",
    "markdirtyblock d0 " + "9" * 30 + ":1", "markdirtyblock d0 1:-1",
    "snapshot_create {store} " + "9" * 5000 + " d0", "snapshot_create {store} 99999999999999999999T d0",
    "snapshot_create {store} \u0663M d0", "snapshot_create {store} 8388608T d0",
]


@pytest.mark.parametrize("line", BAD_NUMBERS)
def test_bad_numbers_are_einval_with_a_reply(mounter, device, storage_dir, line):
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", take=False)
    assert m.err(line.format(snap=snap, store=storage_dir)) == "EINVAL"
    assert m.ok("cbtinfo d0")


# ----- 6. the smaller holes --------------------------------------------------------------

def test_relative_paths_are_refused_and_the_cli_sends_absolute_ones(mounter, device, tmp_path):
    m = mounter({"d0": device[0]})
    (tmp_path / "store").mkdir()
    make_device(tmp_path / "rel.img", MiB)
    assert m.err("snapshot_create store 16M d0") == "EINVAL"
    assert m.err("attach r rel.img") == "EINVAL"
    result = snapfs("-m", m.path, "snapshot_create", "store", "16M", "d0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    snap = result.stdout.strip().split("=")[1]
    assert m.ok("status")["snapshots"][snap]["storage"] == f"tmpfile in {tmp_path / 'store'}"
    result = snapfs("-m", m.path, "attach", "r", "rel.img", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert m.ok("status")["devices"]["r"]["path"] == str(tmp_path / "rel.img")
    m.ok(f"snapshot_destroy {snap}")


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_state_dir_that_is_a_file_is_refused_in_one_line(tmp_path, daemon):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    state = tmp_path / "state"
    state.write_text("not a directory")
    make_device(tmp_path / "d.img", MiB)
    args = ["mount", *(["--daemon"] if daemon else []), "--state-dir", str(state), str(mnt),
            f"d={tmp_path / 'd.img'}"]
    result = bounded(lambda: snapfs(*args), 30, lambda: subprocess.run(["umount", "-l", str(mnt)]))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "not a directory" in lines[0], result.stderr
    assert not is_mounted(str(mnt))


def test_sources_that_are_not_whole_sectors_are_refused(mounter, device, tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = snapfs("mount", "--state-dir", str(tmp_path / "st"), str(mnt), f"o={odd}")
    assert result.returncode == 1 and "not a multiple of 512" in result.stderr, result.stderr
    assert not is_mounted(str(mnt))
    m = mounter({"d0": device[0]})
    assert m.err(f"attach o {odd}") == "EINVAL"


def test_destroy_drops_cached_image_pages(mounter, device, storage_dir):
    """An image handle read before destroy must not keep returning the image's cached
    pages after it: destroy invalidates them."""
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", "d0")
    fd = os.open(m.image(snap, "d0"), os.O_RDONLY)
    try:
        assert os.pread(fd, 65536, 0) == device[1][:65536]     # now in the page cache
        m.ok(f"snapshot_destroy {snap}")
        with pytest.raises(OSError) as info:
            os.pread(fd, 65536, 0)
        assert info.value.errno in (errno.EIO, errno.ENOENT)
    finally:
        os.close(fd)


def test_take_reports_a_stacked_filesystem_it_cannot_freeze(mounter, tmp_path, storage_dir):
    """ext4 on a loop over a device file, mounted in another mount namespace: snapfs
    cannot see (or freeze) it, and the take says so instead of a silent empty list."""
    m = mounter({"fs": sparse(tmp_path / "fs.img", 64 * MiB)})
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", m.dev("fs"))
    loop = run("losetup", "--find", "--show", m.dev("fs"))
    inside = tmp_path / "ns-mnt"
    inside.mkdir()
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"mount {loop} {inside} && echo ready && exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        snap = m.ok(f"snapshot_create {storage_dir} 64M fs")["id"]
        reply = bounded(lambda: m.ok(f"snapshot_take {snap}"), 30, unhang(m))
        assert reply["frozen"] == [] and reply["not_frozen"] == [os.path.basename(loop)], reply
        assert "not freezing" in m.read_log()
        m.ok(f"snapshot_destroy {snap}")
    finally:
        holder.kill()
        holder.wait()
        for _ in range(50):                                  # the namespace's mount goes away
            if subprocess.run(["losetup", "-d", loop], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
