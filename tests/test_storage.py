"""Difference storage and events against a real mount (docs/design.md section 4
"Difference storage", "Events", "The original never fails because of the snapshot";
blksnap notes 2.5-2.6 and the 2000-stretch / 2100-overflow tests).

Growth arithmetic with the test options (``--chunk-minimum 64K
--diff-storage-minimum 8M``): a new storage gets its first 8 MiB portion at create;
every time free space falls to 4 MiB it grows by 8 MiB up to LIMIT; at LIMIT with
4 MiB left one ``no_space`` event; the chunk that finds no slot corrupts its image
(``corrupted``, errno 28). So with LIMIT 32M: no_space after 28 MiB of copied chunks,
overflow after 32 MiB; with LIMIT 8M: no_space after 4 MiB, overflow after 8 MiB.

Storage placed on a dedicated small tmpfs (mounted by the test, unmounted in
``finally``) makes the space it takes measurable exactly with statvfs.
"""

import contextlib
import errno
import json
import os
import random
import select
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import KiB, MiB, make_device, requires_fuse, snapfs_cli
from workload import Writer, final_content

pytestmark = requires_fuse

CHUNK = 64 * KiB


# ----- helpers -------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A private tmpfs of ``size`` at ``path``; always unmounted (lazily if the daemon
    still holds a file on it because the test failed before destroy)."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield str(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def write_chunks(path: str, model: bytearray, offset: int, total: int, seed: int,
                 step: int = 1 * MiB) -> None:
    """Write ``total`` fresh random bytes from ``offset`` in ``step`` writes; every
    write must succeed in full. Updates ``model``."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        pos = offset
        while pos < offset + total:
            data = rnd.randbytes(min(step, offset + total - pos))
            assert os.pwrite(fd, data, pos) == len(data), pos
            model[pos : pos + len(data)] = data
            pos += len(data)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_events(m, snap: str) -> list[dict]:
    """Every event queued so far, read from snapshots/ID/events without blocking."""
    fd = os.open(m.p("snapshots", snap, "events"), os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            assert chunk, "EOF on the events of a live snapshot"
            data += chunk
    finally:
        os.close(fd)
    return [json.loads(line) for line in data.splitlines()]


def info(m, snap: str) -> dict:
    return json.loads(read_file(m.p("snapshots", snap, "info")))


def status(m) -> dict:
    return json.loads(read_file(m.p("status")))


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_eio(path: str, offset: int = 0, size: int = 4096) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.pread(fd, size, offset)
        assert exc.value.errno == errno.EIO, exc.value
    finally:
        os.close(fd)


def assert_overflow_events(events: list[dict], device: str, limit: int) -> None:
    """Exactly ``no_space`` then ``corrupted(28)`` for ``device``, times in order."""
    assert [e["event"] for e in events] == ["no_space", "corrupted"], events
    no_space, corrupted = events
    assert no_space["requested_bytes"] == limit, no_space
    assert corrupted["device"] == device and corrupted["error_code"] == errno.ENOSPC, corrupted
    now = time.time_ns()
    assert now - 120 * 10**9 < no_space["time"] <= corrupted["time"] <= now, events


def overflow_mount(mounter, tmp_path, size: int = 16 * MiB, seed: int = 5):
    """One device ``d`` of ``size`` bytes; returns (mount, initial content)."""
    src = tmp_path / "d.img"
    initial = make_device(src, size, seed=seed)
    return mounter({"d": str(src)}), initial


def trigger_overflow(m, model: bytearray, limit: int = 8 * MiB, seed: int = 11) -> None:
    """Copy more distinct chunks than a LIMIT-``limit`` storage holds."""
    write_chunks(m.dev("d"), model, 0, limit + 2 * CHUNK, seed)


# ----- 1. growth, limit, overflow (blksnap 2000-stretch, strengthened) -------------------------

@pytest.mark.parametrize("kind", ["tmpfile", "named"])
def test_stretch_growth_no_space_overflow(mounter, tmp_path, kind):
    limit = 32 * MiB
    size = 80 * MiB
    src = tmp_path / "d.img"
    initial = make_device(src, size, seed=21)
    model = bytearray(initial)
    m = mounter({"d": str(src)})          # --diff-storage-minimum 8M (conftest default)
    with tmpfs(tmp_path / "store", "128M") as store:
        free0 = free_bytes(store)
        target = store if kind == "tmpfile" else os.path.join(store, "diff.bin")
        snap = m.snapshot(target, "32M", "d")
        st = status(m)["snapshots"][snap]
        if kind == "tmpfile":
            assert st["storage"] == f"tmpfile in {store}"
            assert os.listdir(store) == []
        else:
            assert st["storage"] == f"{target} (unlinked)"
            assert os.listdir(store) == []                    # unlinked at once
        assert st["size"] == 8 * MiB and st["used"] == 0 and st["limit"] == limit
        assert free0 - free_bytes(store) == 8 * MiB          # the first portion, reserved

        # 12 MiB of distinct chunks: growth, image intact
        write_chunks(m.dev("d"), model, 0, 12 * MiB, seed=1)
        grown = wait_for(lambda: info(m, snap)["size"] > 8 * MiB and info(m, snap),
                         what="storage growth")
        assert grown["used"] == 12 * MiB and grown["state"] == "taken"
        assert grown["devices"]["d"]["chunks_copied"] == 12 * MiB // CHUNK
        assert grown["size"] <= limit
        assert read_file(m.image(snap, "d")) == initial
        assert read_events(m, snap) == []
        assert m.ok("snapshot_info d")["error_code"] == 0

        # 64 MiB more: no_space at 28 MiB, overflow at 32 MiB; the device never fails
        write_chunks(m.dev("d"), model, 12 * MiB, 64 * MiB, seed=2)
        assert read_file(m.dev("d")) == bytes(model)
        assert src.read_bytes() == bytes(model)
        assert_overflow_events(read_events(m, snap), "d", limit)
        assert_eio(m.image(snap, "d"))
        assert_eio(m.image(snap, "d"), offset=40 * MiB)      # a chunk never copied: EIO too
        assert m.ok("snapshot_info d")["error_code"] == -errno.ENOSPC
        final = info(m, snap)
        assert final["state"] == "corrupted" and final["overflow"] is True
        assert final["devices"]["d"]["error_code"] == -errno.ENOSPC
        assert final["devices"]["d"]["state"] == "corrupted"
        assert final["used"] == limit
        assert final["size"] <= limit and final["requested"] <= limit
        assert free0 - free_bytes(store) <= limit, "storage grew beyond LIMIT"
        m.ok(f"snapshot_destroy {snap}")
        assert os.listdir(store) == []
        assert free_bytes(store) == free0, (free0, free_bytes(store))
    assert read_file(m.dev("d")) == bytes(model)


# ----- 2. storage on a full filesystem ---------------------------------------------------------

def test_storage_filesystem_full(mounter, tmp_path):
    """A 4 MiB tmpfs holds the storage, LIMIT 64M: growth to 6 MiB fails (logged), the
    next slot past 4 MiB cannot be written (ENOSPC of the filesystem) -> the image is
    corrupted with errno 28, no no_space (the limit was never reached), and the
    original's writes all succeed."""
    src = tmp_path / "d.img"
    initial = make_device(src, 16 * MiB, seed=31)
    model = bytearray(initial)
    m = mounter({"d": str(src)}, options=["--chunk-minimum", "64K", "--diff-storage-minimum", "2M"])
    with tmpfs(tmp_path / "store", "4M") as store:
        snap = m.snapshot(store, "64M", "d")
        assert info(m, snap)["size"] == 2 * MiB
        write_chunks(m.dev("d"), model, 0, 12 * MiB, seed=3, step=256 * KiB)
        assert read_file(m.dev("d")) == bytes(model)
        events = read_events(m, snap)
        assert [e["event"] for e in events] == ["corrupted"], events
        assert events[0]["device"] == "d" and events[0]["error_code"] == errno.ENOSPC
        assert m.ok("snapshot_info d")["error_code"] == -errno.ENOSPC
        assert_eio(m.image(snap, "d"))
        i = info(m, snap)
        assert i["state"] == "corrupted" and i["limit"] == 64 * MiB
        assert i["devices"]["d"]["chunks_copied"] * CHUNK <= 4 * MiB
        res = subprocess.run([*snapfs_cli(), "status", "-m", m.path], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert "corrupted" in res.stdout and "error -28" in res.stdout, res.stdout
        m.ok(f"snapshot_destroy {snap}")
        assert free_bytes(store) == 4 * MiB
    assert read_file(m.dev("d")) == bytes(model)
    assert "growing storage" in m.read_log()                      # the fallocate failure


# ----- 4. events ----------------------------------------------------------------------------------

class Reader(threading.Thread):
    """Reads an events file with blocking reads until EOF; records every chunk."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.fd = os.open(path, os.O_RDONLY)
        self.chunks: list[bytes] = []
        self.eof = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            while chunk := os.read(self.fd, 65536):
                self.chunks.append(chunk)
            self.eof.set()
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(self.fd)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in b"".join(self.chunks).splitlines()]


def test_events_blocking_readers_nonblock_and_eof(mounter, tmp_path, storage_dir):
    m, initial = overflow_mount(mounter, tmp_path)
    model = bytearray(initial)
    snap = m.snapshot(storage_dir, "8M", "d")
    path = m.p("snapshots", snap, "events")

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)      # nothing queued: EAGAIN
    with pytest.raises(BlockingIOError):
        os.read(fd, 4096)
    readers = [Reader(path), Reader(path)]
    for r in readers:
        r.start()
    time.sleep(0.3)
    assert all(r.is_alive() and not r.chunks for r in readers), "a reader did not block"

    trigger_overflow(m, model)
    for r in readers:
        wait_for(lambda r=r: len(r.events()) == 2, what="both events at a blocked reader")
    for r in readers:                                     # each reader sees every event
        assert_overflow_events(r.events(), "d", 8 * MiB)
        assert r.is_alive() and r.error is None          # blocked again at the end
    assert readers[0].events() == readers[1].events() == read_events(m, snap)

    data = os.read(fd, 65536)                            # the non-blocking handle too
    assert [json.loads(x)["event"] for x in data.splitlines()] == ["no_space", "corrupted"]
    with pytest.raises(BlockingIOError):                  # and at the end: EAGAIN again
        os.read(fd, 4096)

    late = Reader(path)                                   # opened after the events
    late.start()
    wait_for(lambda: len(late.events()) == 2, what="late reader")

    m.ok(f"snapshot_destroy {snap}")
    for r in [*readers, late]:                            # destroy releases blocked readers
        assert r.eof.wait(10), "a blocked events reader was not released by destroy"
        r.join(5)
        assert r.error is None, r.error
        assert len(r.events()) == 2
    assert os.read(fd, 65536) == b""                      # EOF, even with O_NONBLOCK
    os.close(fd)
    assert not os.path.exists(path)
    assert read_file(m.dev("d")) == bytes(model)


def test_events_poll(mounter, tmp_path, storage_dir):
    """poll() through FUSE (observed to work: the kernel forwards POLL with a notify
    handle, snapfs answers 0 and notifies when an event is posted): no POLLIN while
    nothing is unread, POLLIN when an event arrives (a poller blocked in another
    thread is woken), none again after reading to the end, POLLIN after destroy (EOF
    is readable)."""
    m, initial = overflow_mount(mounter, tmp_path)
    model = bytearray(initial)
    snap = m.snapshot(storage_dir, "8M", "d")
    fd = os.open(m.p("snapshots", snap, "events"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(0) == []
        assert p.poll(200) == []

        woken: list = []
        poller = threading.Thread(target=lambda: woken.append((p.poll(15_000), time.monotonic())),
                                  daemon=True)
        poller.start()
        time.sleep(0.2)
        assert poller.is_alive()
        t0 = time.monotonic()
        write_chunks(m.dev("d"), model, 0, 4 * MiB + CHUNK, seed=7)   # -> no_space only
        poller.join(15)
        assert not poller.is_alive()
        (ready, when), = woken
        assert ready == [(fd, select.POLLIN)], ready
        assert when - t0 < 10

        data = os.read(fd, 65536)
        assert [json.loads(x)["event"] for x in data.splitlines()] == ["no_space"]
        assert p.poll(100) == []                          # read to the end: nothing ready

        write_chunks(m.dev("d"), model, 4 * MiB + CHUNK, 4 * MiB, seed=8)   # -> corrupted
        assert p.poll(10_000) == [(fd, select.POLLIN)]
        assert json.loads(os.read(fd, 65536))["event"] == "corrupted"
        assert p.poll(100) == []

        m.ok(f"snapshot_destroy {snap}")
        assert p.poll(10_000) == [(fd, select.POLLIN)]    # EOF is readable
        assert os.read(fd, 65536) == b""
    finally:
        os.close(fd)


def test_waitevent_times_out_then_pops_in_order(mounter, tmp_path, storage_dir):
    m, initial = overflow_mount(mounter, tmp_path)
    model = bytearray(initial)
    snap = m.snapshot(storage_dir, "8M", "d")
    t0 = time.monotonic()
    assert m.err(f"snapshot_waitevent {snap} 100") == "ETIMEDOUT"
    took = time.monotonic() - t0
    assert 0.09 < took < 5, took

    # a waiter blocked before the event is woken by it
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(m.ctl(f"snapshot_waitevent {snap} 20000")))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    trigger_overflow(m, model)
    waiter.join(20)
    assert not waiter.is_alive()
    assert got["ok"] and got["event"]["event"] == "no_space", got

    second = m.ok(f"snapshot_waitevent {snap} 100")["event"]
    assert second["event"] == "corrupted" and second["device"] == "d"
    assert second["error_code"] == errno.ENOSPC
    assert got["event"]["time"] <= second["time"]
    assert m.err(f"snapshot_waitevent {snap} 100") == "ETIMEDOUT"
    # popping does not consume the events file
    assert [e["event"] for e in read_events(m, snap)] == ["no_space", "corrupted"]
    m.ok(f"snapshot_destroy {snap}")
    assert m.err(f"snapshot_waitevent {snap} 100") == "ESRCH"


# ----- 5. snapfs watch ----------------------------------------------------------------------------

def test_watch_prints_events_and_exits_after_destroy(mounter, tmp_path, storage_dir):
    m, initial = overflow_mount(mounter, tmp_path)
    model = bytearray(initial)
    snap = m.snapshot(storage_dir, "8M", "d")
    proc = subprocess.Popen([*snapfs_cli(), "watch", "-m", m.path, snap], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()
        trigger_overflow(m, model)
        wait_for(lambda: len(lines) >= 2, what="watch output")
        assert proc.poll() is None                        # still following
        m.ok(f"snapshot_destroy {snap}")
        assert proc.wait(10) == 0, proc.stderr.read()
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(lines) == 3, lines
    no_space, corrupted, end = (line.rstrip("\n") for line in lines)
    for line in (no_space, corrupted):
        assert not line.startswith("{"), line             # readable, not JSON
    assert "no_space" in no_space and "8.0M" in no_space
    assert "corrupted" in corrupted and " d " in corrupted and "ENOSPC" in corrupted
    assert end == f"snapshot {snap} destroyed"


# ----- 6. overflow under concurrent writers on two devices --------------------------------------

def test_overflow_under_concurrent_writers(mounter, tmp_path, storage_dir):
    """Two devices of one snapshot, two writers each. ``a`` writes all over 32 MiB
    (more than the 16M limit: it must overflow); ``b``'s writers stay in its first
    2 MiB (their chunks are copied early; it may stay intact). Each device must end
    either intact or corrupted, consistently everywhere."""
    size_a, size_b = 32 * MiB, 8 * MiB
    init = {"a": make_device(tmp_path / "a.img", size_a, 41),
            "b": make_device(tmp_path / "b.img", size_b, 42)}
    m = mounter({"a": str(tmp_path / "a.img"), "b": str(tmp_path / "b.img")})
    snap = m.snapshot(storage_dir, "16M", "a", "b")
    writers = {"a": [Writer(m.dev("a"), 0, size_a // 2, 1), Writer(m.dev("a"), size_a // 2, size_a, 2)],
               "b": [Writer(m.dev("b"), 0, MiB, 3), Writer(m.dev("b"), MiB, 2 * MiB, 4)]}
    everyone = writers["a"] + writers["b"]
    for w in everyone:
        w.start()
    try:
        wait_for(lambda: any(e["event"] == "corrupted" for e in read_events(m, snap)),
                 timeout=30, what="overflow")
        time.sleep(0.3)                                   # keep hammering past the overflow
    finally:
        for w in everyone:
            w.stop()                                      # no hang, every write returned in full
    for name in ("a", "b"):
        assert read_file(m.dev(name)) == final_content(init[name], writers[name]), name

    events = read_events(m, snap)
    assert events[0]["event"] == "no_space", events
    corrupted = {e["device"]: e for e in events if e["event"] == "corrupted"}
    assert len(corrupted) == len(events) - 1, events      # at most one per device
    assert "a" in corrupted
    st = status(m)["snapshots"][snap]
    assert st["used"] <= st["limit"] == 16 * MiB
    for name in ("a", "b"):
        code = m.ok(f"snapshot_info {name}")["error_code"]
        dev = st["devices"][name]
        assert dev["error_code"] == code
        if code == 0:
            assert name not in corrupted
            assert dev["state"] == "taken"
            assert read_file(m.image(snap, name)) == init[name], f"{name}: image not take-time"
        else:
            assert code == -errno.ENOSPC, (name, code)
            assert corrupted[name]["error_code"] == errno.ENOSPC
            assert dev["state"] == "corrupted"
            assert_eio(m.image(snap, name))
    assert st["state"] == "corrupted"
    m.ok(f"snapshot_destroy {snap}")
    assert os.listdir(storage_dir) == []


# ----- 7. status ----------------------------------------------------------------------------------

def test_status_reports_storage_and_counters(mounter, tmp_path, storage_dir):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    init_a = make_device(a, 4 * MiB, 51)
    make_device(b, 2 * MiB + 4096, 52)
    m = mounter({"a": str(a), "bee": str(b)})
    named = str(tmp_path / "diff.bin")
    snap = m.snapshot(named, "64M", "a", "bee")

    fd = os.open(m.dev("a"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 1000, 10)                    # chunk 0
        os.pwrite(fd, b"y" * 5000, CHUNK - 1000)          # chunks 0 and 1
        os.pwrite(fd, b"z" * 100, 3 * CHUNK)              # chunk 3
    finally:
        os.close(fd)
    fd = os.open(m.image(snap, "bee"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"i" * 10, 5 * CHUNK)               # an image write: copy into storage
    finally:
        os.close(fd)

    st = status(m)
    assert st["snapshots"] == m.ok("status")["snapshots"]
    s = st["snapshots"][snap]
    assert s["storage"] == f"{named} (unlinked)"
    assert s["size"] == 8 * MiB and s["limit"] == 64 * MiB
    assert s["used"] == 4 * CHUNK and s["state"] == "taken"
    da, db = s["devices"]["a"], s["devices"]["bee"]
    fields = ("chunks_copied", "image_write_copies", "state", "error_code")
    assert [da[f] for f in fields] == [3, 0, "taken", 0], da
    assert [db[f] for f in fields] == [1, 1, "taken", 0], db
    assert da["chunk_size"] == db["chunk_size"] == CHUNK
    assert info(m, snap) == s                              # the info file says the same

    dev_a, dev_b = st["devices"]["a"], st["devices"]["bee"]
    assert dev_a["bytes_written"] == 6100 and dev_a["cow_copies"] == 3
    assert dev_b["bytes_written"] == 0 and dev_b["cow_copies"] == 0
    assert dev_a["snapshot"] == dev_b["snapshot"] == snap
    for d, size in ((dev_a, 4 * MiB), (dev_b, 2 * MiB + 4096)):
        cbt = d["cbt"]
        assert cbt["device_capacity"] == size and cbt["block_size"] == 64 * KiB
        assert cbt["block_count"] == -(-size // (64 * KiB))
        assert cbt["changes_number"] == 1 and cbt["active"] == 2 and cbt["generation_id"]
    assert dev_b["cbt"]["generation_id"] != dev_a["cbt"]["generation_id"]

    res = subprocess.run([*snapfs_cli(), "status", "-m", m.path], capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "a " in out and "bee " in out and snap in out and named in out, out
    assert "copied 3" in out and "copied 1" in out, out
    assert init_a[:10] == read_file(m.image(snap, "a"))[:10]
    m.ok(f"snapshot_destroy {snap}")
    assert not os.path.exists(named)
    assert status(m)["snapshots"] == {}
