"""Continuous data protection on real mounts (issue 22, docs/design.md §9): views of
instants between writes equal the device as it was then, byte for byte; marks under
concurrent writers and on a live ext4; the crash; overflow, retention and a pinned
view; ``backup create --at``."""

import hashlib
import os
import random
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import KiB, MiB, bounded, ext4_on_loop, make_device, read_all, requires_fuse, run, sparse, unhang
from workload import Writer, take_time_content

pytestmark = requires_fuse


def read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_all(fd)
    finally:
        os.close(fd)


def view(m, name: str, when) -> tuple[str, bytes]:
    """(view id, its whole content, read in 1 MiB requests: a view read of many
    pieces reads them in one thread call)."""
    when = when if isinstance(when, str) else f"{when / 1e9:.9f}"
    reply = m.ok(f"cdp_view {name} {when}")
    with open(m.image(reply["id"], name), "rb", buffering=0) as f:
        data = b"".join(iter(lambda: f.read(MiB), b""))
    return reply["id"], data


def journaled(mounter, tmp_path: Path, path: str, limit: str = "256M", **kw):
    """A mount of ``path`` as d0 with a journal of ``limit`` in tmp_path/journal."""
    journal = tmp_path / "journal"
    journal.mkdir()
    m = mounter({"d0": path}, **kw)
    m.ok(f"cdp_start d0 {journal} {limit}")
    return m, journal


def sequential_writes(path: str, content: bytearray, count: int, seed: int):
    """``count`` writes of 512 B to 192 KiB at odd offsets, one at a time; yields
    (time before, time after, content after) per write."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            size = rnd.choice([512, 4096, 777, 65536 + 13, 192 * KiB])
            offset = rnd.randrange(0, len(content) - size)
            data = rnd.randbytes(size)
            before = time.time_ns()
            assert os.pwrite(fd, data, offset) == size
            after = time.time_ns()
            content[offset : offset + size] = data
            yield before, after, bytes(content)
            time.sleep(0.002)
    finally:
        os.close(fd)


def log_writes(path: str, content: bytearray, count: int):
    """A log writer: ``count`` appends of 8 KiB from an odd offset, with a rewrite of
    the previous block now and then; yields as ``sequential_writes``."""
    fd = os.open(path, os.O_WRONLY)
    rnd, pos = random.Random(8), 1_000_001
    try:
        for k in range(count):
            offset = pos - 8192 if k % 5 == 4 else pos
            data = rnd.randbytes(8192)
            before = time.time_ns()
            os.pwrite(fd, data, offset)
            after = time.time_ns()
            content[offset : offset + 8192] = data
            pos = max(pos, offset + 8192)
            yield before, after, bytes(content)
            time.sleep(0.001)
    finally:
        os.close(fd)


def test_views_between_the_writes_of_a_log_writer(mounter, tmp_path, device):
    """Its old data comes mostly from read-ahead windows (cdp.py J4)."""
    path, data = device
    m, _ = journaled(mounter, tmp_path, path)
    history = list(log_writes(m.dev("d0"), bytearray(data), 80))
    assert m.ok("cdp_info d0")["window_hits"] > 40
    for i in (3, 4, 5, 40, 78):
        view_id, got = view(m, "d0", (history[i][1] + history[i + 1][0]) // 2)
        assert got == history[i][2], f"view after log write {i} differs"
        m.ok(f"snapshot_destroy {view_id}")


def test_views_of_instants_between_writes_are_exact(mounter, tmp_path, device):
    path, data = device
    m, journal = journaled(mounter, tmp_path, path)
    assert m.ok("cdp_info d0")["oldest"] * 1e9 <= time.time_ns()
    history = list(sequential_writes(m.dev("d0"), bytearray(data), 60, seed=3))
    # the instant before the first write, between writes, and after the last
    checks = [(history[0][0] - 1, data)]
    for i in random.Random(5).sample(range(len(history) - 1), 8):
        checks.append(((history[i][1] + history[i + 1][0]) // 2, history[i][2]))
    checks.append((time.time_ns(), history[-1][2]))
    for when, expected in checks:
        view_id, got = view(m, "d0", when)
        assert got == expected, f"view at {when} differs"
        m.ok(f"snapshot_destroy {view_id}")
    info = m.ok("cdp_info d0")
    assert info["writes"] >= 60 and info["used"] > 0 and info["state"] == "running"
    # a view stays exact while later writes go on (their old data is journaled)
    view_id = m.ok(f"cdp_view d0 {history[30][1] / 1e9 + 0.0005:.9f}")["id"]
    list(sequential_writes(m.dev("d0"), bytearray(history[-1][2]), 10, seed=4))
    assert read_file(m.image(view_id, "d0")) == history[30][2]
    # writes to a view go to its scratch area only
    fd = os.open(m.image(view_id, "d0"), os.O_WRONLY)
    os.pwrite(fd, b"x" * 5000, 1234)
    os.close(fd)
    expect = bytearray(history[30][2])
    expect[1234:6234] = b"x" * 5000
    assert read_file(m.image(view_id, "d0")) == bytes(expect)
    assert m.err("cdp_view d0 1.5") == "ERANGE"
    assert m.err("cdp_view d0 nosuchmark") == "EINVAL"
    m.ok("cdp_stop d0")
    assert not os.path.exists(m.image(view_id, "d0"))
    assert m.err("cdp_info d0") == "ESRCH"
    assert sorted(os.listdir(journal)) == ["lock"]


def test_marks_under_concurrent_writers(mounter, tmp_path):
    size = 8 * MiB + 4096
    src = tmp_path / "d0.img"
    initial = make_device(src, size, seed=11)
    m, _ = journaled(mounter, tmp_path, str(src), "512M")
    bounds = [0, 2 * MiB + 777, 5 * MiB + 3, size]
    writers = [Writer(m.dev("d0"), bounds[i], bounds[i + 1], 40 + i, max_size=200_000) for i in range(3)]
    for w in writers:
        w.start()
    marks = []
    try:
        for k in range(5):
            time.sleep(0.15)
            t0 = time.monotonic()
            reply = m.ok(f"cdp_mark d0 m{k} nofreeze")
            marks.append((reply["label"], t0, time.monotonic()))
    finally:
        for w in writers:
            w.stop()
    assert all(len(w.log) > 10 for w in writers)
    assert set(m.ok("cdp_info d0")["marks"]) == {f"m{k}" for k in range(5)}
    for label, t0, t1 in marks:
        view_id, got = view(m, "d0", label)
        assert got == take_time_content(initial, got, writers, t0, t1), f"view at mark {label} differs"
        m.ok(f"snapshot_destroy {view_id}")
    assert m.err("cdp_mark d0 m0 nofreeze") == "EEXIST"
    assert m.err("cdp_mark d0 12.5 nofreeze") == "EINVAL"


def files_in(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("f")}


def test_mark_of_a_live_ext4_is_clean_with_exactly_its_files(mounter, tmp_path):
    src = sparse(tmp_path / "d0.img", 64 * MiB)
    journal = tmp_path / "journal"
    journal.mkdir()
    m = mounter({"d0": src})
    with ext4_on_loop(m.dev("d0"), tmp_path / "fs") as _loop:
        fs = tmp_path / "fs"
        m.ok(f"cdp_start d0 {journal} 512M")
        done: list[tuple[str, bytes, float, float]] = []
        stop = threading.Event()

        def writer():
            rnd, i = random.Random(9), 0
            while not stop.is_set() and i < 3000:      # at most ~30 MiB of 64
                name, data = f"f{i:05d}", rnd.randbytes(rnd.randrange(1, 20_000))
                t0 = time.monotonic()
                (fs / name).write_bytes(data)
                done.append((name, data, t0, time.monotonic()))
                i += 1
                time.sleep(0.001)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            time.sleep(0.5)
            t0 = time.monotonic()
            reply = bounded(lambda: m.ok("cdp_mark d0 before-migration"), 30, unhang(m, str(fs)))
            t1 = time.monotonic()
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
        assert reply["frozen"] == [str(fs)]
        view_id = m.ok("cdp_view d0 before-migration")["id"]
        image = m.image(view_id, "d0")
        fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True, timeout=60)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        surely = {n: d for n, d, a, b in done if b < t0}
        never = {n for n, d, a, b in done if a > t1}
        assert surely and never
        mnt = tmp_path / "view"
        mnt.mkdir()
        loop = run("losetup", "--find", "--show", "--read-only", image)
        try:
            run("mount", "-o", "ro,noload", loop, str(mnt))
            try:
                got = files_in(mnt)
            finally:
                run("umount", str(mnt))
        finally:
            run("losetup", "-d", loop)
        assert not never & set(got)
        assert all(got.get(n) == d for n, d in surely.items())
        assert set(got) - set(surely) <= {n for n, d, a, b in done}   # only files in flight at the mark
        m.ok(f"snapshot_destroy {view_id}")


def test_journal_survives_sigkill_and_a_changed_source_resets_it(mounter, tmp_path, device):
    path, data = device
    state = tmp_path / "state"
    m, _ = journaled(mounter, tmp_path, path, "256M 1h", state_dir=state)
    history = list(sequential_writes(m.dev("d0"), bytearray(data), 30, seed=21))
    m.ok("cdp_mark d0 last nofreeze")
    count = m.ok("cdp_info d0")["writes"]
    assert count >= 30
    m.kill()
    m2 = mounter({"d0": path}, state_dir=state)
    info = m2.ok("cdp_info d0")
    assert info["writes"] == count and info["history_reset"] is None and "last" in info["marks"]
    for i in (0, 9, 29):
        nxt = history[i + 1][0] if i < 29 else history[i][1] + 10**6
        view_id, got = view(m2, "d0", (history[i][1] + nxt) // 2)
        assert got == history[i][2], f"view after write {i} differs after the crash"
        m2.ok(f"snapshot_destroy {view_id}")
    assert view(m2, "d0", "last")[1] == history[-1][2]
    # written after the restart, then a clean stop and a third mount: still one history
    later = list(sequential_writes(m2.dev("d0"), bytearray(history[-1][2]), 5, seed=22))
    count = m2.ok("cdp_info d0")["writes"]
    m2.stop()
    m3 = mounter({"d0": path}, state_dir=state)
    assert m3.ok("cdp_info d0")["writes"] == count
    assert view(m3, "d0", (history[5][1] + history[6][0]) // 2)[1] == history[5][2]
    m3.kill()
    # the source changed behind snapfs where the journal's last write went: history ends
    last = later[-1][2]
    with open(path, "r+b") as f:
        f.write(bytes(255 - b for b in last[: 1 << 20]))
    m4 = mounter({"d0": path}, state_dir=state)
    info = m4.ok("cdp_info d0")
    assert info["history_reset"] and "changed behind snapfs" in info["history_reset"]["reason"]
    assert info["writes"] == 0 and info["state"] == "running"
    assert m4.err(f"cdp_view d0 {history[5][1] / 1e9:.9f}") == "ERANGE"
    m4.ok("cdp_stop d0")


def test_overflow_drops_the_oldest_history_and_a_view_keeps_what_it_needs(mounter, tmp_path, device):
    path, data = device
    m, _ = journaled(mounter, tmp_path, path, "8M")        # segments of 1 MiB
    content = bytearray(data)
    fd = os.open(m.dev("d0"), os.O_WRONLY)
    rnd = random.Random(31)

    def write_mib(count: int) -> None:
        for _ in range(count * 4):
            off = rnd.randrange(0, len(content) - 256 * KiB)
            block = rnd.randbytes(256 * KiB)
            os.pwrite(fd, block, off)
            content[off : off + len(block)] = block

    try:
        write_mib(2)
        first = time.time_ns()
        write_mib(3)
        pinned_at, pinned = time.time_ns(), bytes(content)
        view_id = m.ok(f"cdp_view d0 {pinned_at / 1e9:.9f}")["id"]
        write_mib(6)               # 11 MiB journaled in all: the history before the view goes
        info = m.ok("cdp_info d0")
        assert info["used"] <= 8 * MiB and info["oldest"] * 1e9 > first
        assert info["oldest"] * 1e9 <= pinned_at and info["state"] == "running"
        assert m.err(f"cdp_view d0 {first / 1e9:.9f}") == "ERANGE"
        assert read_file(m.image(view_id, "d0")) == pinned
        events = m.p("snapshots", view_id, "events")
        write_mib(8)               # now the view would lose history it needs: the journal stops
        info = m.ok("cdp_info d0")
        assert info["state"] == "stopped" and "view" in info["stopped"]["reason"]
        fd_events = os.open(events, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert b'"cdp_stopped"' in os.read(fd_events, 65536)
        finally:
            os.close(fd_events)
        with pytest.raises(OSError):
            read_file(m.image(view_id, "d0"))
    finally:
        os.close(fd)
    with open(m.dev("d0"), "rb") as f:          # the device never suffered
        assert f.read() == bytes(content)
    m.ok("cdp_stop d0")


def test_retain_and_a_full_storage_stop_the_journal_never_the_device(mounter, tmp_path, device):
    path, data = device
    small = tmp_path / "small"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(small))
    try:
        retained = tmp_path / "retained"
        retained.mkdir()
        m = mounter({"d0": path})
        m.ok(f"cdp_start d0 {small} 64M")
        m.ok(f"attach d1 {make_copy(tmp_path, data)}")
        m.ok(f"cdp_start d1 {retained} 4M 1h")
        for name in ("d0", "d1"):
            payload = random.Random(7).randbytes(6 * MiB)
            with open(m.dev(name), "r+b") as f:
                f.write(payload)
            with open(m.dev(name), "rb") as f:
                assert f.read(len(payload)) == payload
            info = m.ok(f"cdp_info {name}")
            assert info["state"] == "stopped", info
        assert "RETAIN" in m.ok("cdp_info d1")["stopped"]["reason"]
        assert m.err("cdp_view d0 " + str(time.time())) == "EIO"
        m.ok("cdp_stop d0")
        m.ok("cdp_stop d1")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def make_copy(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "d1.img"
    path.write_bytes(data)
    return str(path)


def test_backup_create_at_a_mark_and_a_time_restores_exactly(mounter, tmp_path, device):
    from backup_helpers import create, init, ok, restore_sha
    path, data = device
    m, _ = journaled(mounter, tmp_path, path)
    history = list(sequential_writes(m.dev("d0"), bytearray(data), 12, seed=51))
    m.ok("cdp_mark d0 nightly nofreeze")
    at_mark = history[-1][2]
    list(sequential_writes(m.dev("d0"), bytearray(at_mark), 12, seed=52))
    repo = init(tmp_path / "repo")
    point = create(m, repo, "d0", extra=("--at", "nightly"))
    assert point["at"]["mark"] == "nightly" and point["consistency"] == "mark nightly"
    assert point["devices"]["d0"]["mode"] == "full" and "--at" in point["devices"]["d0"]["reason"]
    between = (history[5][1] + history[6][0]) // 2       # writes are >= 2 ms apart: microseconds do
    iso = datetime.fromtimestamp(between // 1000 / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    second = create(m, repo, "d0", extra=("--at", iso))
    assert second["at"]["mark"] is None and abs(second["unix_time"] - between / 1e9) < 1e-5
    assert restore_sha(repo, point["point"], "d0", tmp_path / "r.img") == hashlib.sha256(at_mark).hexdigest()
    assert restore_sha(repo, second["point"], "d0", tmp_path / "r2.img") == \
        hashlib.sha256(history[5][2]).hexdigest()
    assert not [s for s in os.listdir(m.p("snapshots"))], "the views were destroyed"
    assert ok("verify", repo)["ok"]
    # a later plain backup does not take the past instant for its CBT parent
    third = create(m, repo, "d0", storage=str(tmp_path))
    assert "first backup" in third["devices"]["d0"]["reason"]
