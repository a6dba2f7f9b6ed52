"""Protected sector ranges (docs/design.md §3 protect/unprotect, §4 Protected ranges):
the core (protect.Rules, AuditLog) alone, then on real mounts: deny with dd (direct
and buffered), deny all, audit lines naming the writer's pid and uid, rotation and
``snapfs watch --audit``, unprotect of part and all, persistence across a clean
stop, images unaffected, bad input."""

import errno
import json
import mmap
import os
import subprocess
import threading
import time

import pytest
from helpers import KiB, make_device, requires_fuse, snapfs, snapfs_cli

from snapfs.cbt import CBT
from snapfs.cbtstate import Restored, StateStore
from snapfs.errors import SnapfsError
from snapfs.params import Params, tracking_block_size
from snapfs.protect import AuditLog, Rules, Writer
from snapfs.source import Source

S = 512
NOBODY = 65534


# ----- the core ------------------------------------------------------------------------

def test_rules_bisect_deny_audit_and_remove():
    log = AuditLog(1 << 20)
    rules = Rules("d", 1000 * S, log)
    rules.add("deny", [(10 * S, 10 * S)])
    rules.add("audit", [(30 * S, 5 * S), (0, S)])
    assert rules.listing() == [("audit", 0, 1), ("deny", 10, 10), ("audit", 30, 5)]
    for offset, length in [(S, 9 * S), (20 * S, 10 * S), (35 * S, S), (999 * S, S)]:
        rules.admit(offset, length, Writer(1, 2))          # neighbours: nothing
    assert log.lines == 0
    for offset, length in [(10 * S, 1), (19 * S + 511, 1), (9 * S, 2 * S), (0, 1000 * S)]:
        with pytest.raises(SnapfsError) as info:
            rules.admit(offset, length, Writer(1, 2))
        assert info.value.errno == errno.EPERM and "10:10" in info.value.message
    rules.admit(34 * S + 100, 600, Writer(7, 8))           # sectors 34 and 35
    assert json.loads(log.current)["sector"] == 34 and json.loads(log.current)["count"] == 2
    assert (json.loads(log.current)["pid"], json.loads(log.current)["uid"]) == (7, 8)
    rules.remove([(12 * S, 2 * S), (31 * S, 10 * S)])       # splits and trims
    assert rules.listing() == [("audit", 0, 1), ("deny", 10, 2), ("deny", 14, 6), ("audit", 30, 1)]
    rules.admit(12 * S, 2 * S, Writer(1, 2))
    with pytest.raises(SnapfsError) as info:
        rules.remove([(500 * S, S)])
    assert info.value.errno == errno.ENOENT
    rules.remove(None)
    assert len(rules) == 0


def test_rules_refuse_overlaps_all_or_none():
    rules = Rules("d", 100 * S, AuditLog(4096))
    rules.add("deny", [(10 * S, 10 * S)])
    for ranges, code in [([(15 * S, 10 * S)], errno.EEXIST), ([(50 * S, S), (5 * S, 6 * S)], errno.EEXIST),
                         ([(50 * S, 2 * S), (51 * S, S)], errno.EINVAL)]:
        with pytest.raises(SnapfsError) as info:
            rules.add("audit", ranges)
        assert info.value.errno == code
    assert rules.listing() == [("deny", 10, 10)], "a refused add changes nothing"
    with pytest.raises(SnapfsError):
        rules.add("allow", [(50 * S, S)])


def test_audit_log_rotates_at_its_bound():
    log = AuditLog(4096)
    for i in range(200):
        log.append({"i": i, "pad": "x" * 80})
    assert log.generation > 1 and len(log.current) <= 4096 and len(log.previous) <= 4096
    kept = [json.loads(line)["i"] for line in (log.previous + log.current).splitlines()]
    assert kept == list(range(200 - len(kept), 200)), "the newest lines, in order, none torn"


def test_state_keeps_rules_apart_from_the_cbt(tmp_path):
    """Saved rules come back when the CBT is not trusted (the source changed); rules
    that do not fit the source are dropped and the CBT is kept; old files have none."""
    path = tmp_path / "s.img"
    make_device(path, 64 * KiB, seed=5)
    store = StateStore(str(tmp_path / "state"), Params())

    def saved(rules, touch=False) -> Restored:
        src = Source.open(str(path))
        try:
            store.save(src, CBT(src.size, tracking_block_size(src.size, Params())), rules)
        finally:
            src.close()
        if touch:
            os.utime(path, ns=(1, 1))
        src = Source.open(str(path))
        try:
            return store.restore(src)
        finally:
            src.close()

    rules = [("deny", 0, 8), ("audit", 8, 8)]
    assert saved(rules, touch=True) == (None, rules)
    restored = saved([("deny", 120, 9)])
    assert restored.cbt is not None and restored.rules == []
    restored = saved([])
    assert restored.cbt is not None and restored.rules == []
    (state_file,) = (tmp_path / "state" / "cbt").iterdir()
    assert "protect" not in json.loads(state_file.read_bytes().split(b"\n", 1)[0])


# ----- real mounts ---------------------------------------------------------------------

def dd(dev: str, sector: int, count: int = 1, direct: bool = True, user: int | None = None):
    """dd of ``count`` sectors of 0xEE... at ``sector``; the CompletedProcess."""
    flags = ["oflag=direct"] if direct else []
    cmd = ["dd", "if=/dev/zero", f"of={dev}", "bs=512", f"seek={sector}", f"count={count}",
           "conv=notrunc", "status=none", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


def sector_of(path: str, sector: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * S)
        return f.read(S)


def audit_lines(m, name: str = "audit") -> list[dict]:
    with open(m.p(name), "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


@pytest.fixture
def m(mounter, tmp_path):
    """d0: a 1 MiB random device, writable by everyone (the uid test writes as 65534);
    MOUNT/audit rotates at 4 KiB."""
    path = tmp_path / "d0.img"
    make_device(path, 1 << 20, seed=3)
    os.chmod(path, 0o666)
    return mounter({"d0": str(path)}, options=["--audit-file-size", "4K"])


def pwrite(dev: str, data: bytes, offset: int, direct: bool = False) -> int:
    """One pwrite to ``dev`` (O_DIRECT from a page-aligned buffer if ``direct``)."""
    fd = os.open(dev, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        return os.pwrite(fd, buf, offset)
    finally:
        os.close(fd)


@requires_fuse
def test_deny_direct_buffered_straddling_and_neighbours(m):
    src, dev = m.sources["d0"], m.dev("d0")
    before = [sector_of(src, s) for s in range(0, 20)]
    m.ok("protect d0 deny 10:6")                      # bytes 5120-8191: inside page 1
    for direct in (True, False):
        for sector in (10, 12, 15):
            result = dd(dev, sector, direct=direct)
            assert result.returncode != 0 and "Operation not permitted" in result.stderr, result
    for offset, length, direct in [(8 * S, 4 * S, False), (6 * S, 6 * S, True), (0, 20 * S, True)]:
        with pytest.raises(PermissionError):          # straddling: fails whole
            pwrite(dev, b"\x11" * length, offset, direct)
    assert [sector_of(src, s) for s in range(0, 20)] == before, "a denied write changed nothing"
    assert [sector_of(dev, s) for s in range(0, 20)] == before, "nor the page cache"
    # the kernel sends a buffered write in page pieces: the piece before the page with
    # the range lands, and the write returns short (README Limits)
    assert pwrite(dev, b"\x11" * 6 * S, 6 * S) == 2 * S
    for sector in (9, 16):
        assert dd(dev, sector, direct=False).returncode == 0
        assert dd(dev, sector).returncode == 0
        assert sector_of(src, sector) == bytes(S)
    status = m.ok("status")["devices"]["d0"]
    assert status["protected"] == [{"action": "deny", "sector": 10, "count": 6}]
    assert status["denied_writes"] >= 9
    assert "denied: write to d0 sectors" in m.read_log()
    # fallocate does not reach snapfs (pyfuse3 has none), truncate is EPERM on every device
    punch = ["fallocate", "-p", "-o", "4096", "-l", "4096", dev]
    assert subprocess.run(punch, capture_output=True, timeout=20).returncode
    with pytest.raises(PermissionError):
        os.truncate(dev, 4096)
    assert [sector_of(src, s) for s in range(10, 16)] == before[10:16]


@requires_fuse
def test_deny_all_unprotect_part_and_all(m):
    src, dev = m.sources["d0"], m.dev("d0")
    m.ok("protect d0 deny all")
    assert m.ok("status")["devices"]["d0"]["protected"] == [{"action": "deny", "sector": 0, "count": 2048}]
    for sector in (0, 1000, 2047):
        assert dd(dev, sector).returncode != 0
    assert sector_of(dev, 1000) == sector_of(src, 1000), "reads go on"
    reply = m.ok("unprotect d0 100:50 2000:48")
    assert reply["protected"] == [{"action": "deny", "sector": 0, "count": 100},
                                  {"action": "deny", "sector": 150, "count": 1850}]
    for sector, allowed in [(99, False), (100, True), (149, True), (150, False), (2000, True), (2047, True)]:
        assert (dd(dev, sector).returncode == 0) == allowed, sector
    assert m.err("unprotect d0 120:5") == "ENOENT"
    m.ok("unprotect d0")
    assert m.ok("status")["devices"]["d0"]["protected"] == []
    assert dd(dev, 0).returncode == 0 and sector_of(src, 0) == bytes(S)
    assert m.err("unprotect d0") == "ENOENT"


@requires_fuse
def test_audit_lines_name_the_writer_and_rotate(m):
    dev = m.dev("d0")
    m.ok("protect d0 audit 100:10")
    assert dd(dev, 99).returncode == 0 and dd(dev, 110).returncode == 0
    assert audit_lines(m) == [], "writes outside audit ranges are not logged"
    child = subprocess.Popen(["dd", "if=/dev/zero", f"of={dev}", "bs=1024", "seek=52", "count=1",
                              "conv=notrunc", "status=none", "oflag=direct"])
    assert child.wait(timeout=20) == 0
    (line,) = audit_lines(m)
    assert (line["device"], line["sector"], line["count"]) == ("d0", 104, 2)
    assert (line["pid"], line["uid"]) == (child.pid, 0)
    assert abs(line["time"] / 1e9 - time.time()) < 30
    # another uid: it reaches the mount through an inherited directory descriptor
    # (pytest's directories are 0700)
    dir_fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        script = ("import os; fd = os.open('devices/d0', os.O_WRONLY, dir_fd=int(os.environ['D']));"
                  "os.pwrite(fd, bytes(512), 101 * 512)")
        other = subprocess.Popen(["/usr/bin/python3", "-I", "-S", "-c", script], user=NOBODY, group=NOBODY,
                                 extra_groups=[], pass_fds=[dir_fd], cwd="/", env={"D": str(dir_fd)})
        assert other.wait(timeout=20) == 0
    finally:
        os.close(dir_fd)
    assert audit_lines(m)[-1] | {"time": 0} == {"time": 0, "device": "d0", "sector": 101, "count": 1,
                                                "pid": other.pid, "uid": NOBODY}
    assert os.stat(m.p("audit")).st_mode & 0o777 == 0o400
    # rotation at 4 KiB (about 37 lines), followed by snapfs watch --audit across it
    seen: list[dict] = []
    watch = subprocess.Popen([*snapfs_cli(), "watch", "--audit", "--json", "-m", m.path],
                             stdout=subprocess.PIPE, text=True)
    reader = threading.Thread(target=lambda: seen.extend(json.loads(line) for line in watch.stdout),
                              daemon=True)
    reader.start()
    try:
        fd = os.open(dev, os.O_WRONLY)
        try:
            for i in range(120):
                os.pwrite(fd, bytes(S), (100 + i % 10) * S)
                if i % 20 == 19:       # a follower polls every 0.25 s: give it a look
                    wait_for(lambda n=i: len(seen) >= n + 3, 60)   # a loaded CI machine: the CLI's start
        finally:
            os.close(fd)
        wait_for(lambda: len(seen) >= 122, 60)
        kept = audit_lines(m, "audit.1") + audit_lines(m)
        assert os.path.getsize(m.p("audit")) <= 4096 and os.path.getsize(m.p("audit.1")) <= 4096
        assert len(kept) < 122 and kept[-1]["sector"] == 109
        assert len(seen) == 122 and seen[-len(kept):] == kept, "watch saw every line across rotations"
    finally:
        watch.kill()
        watch.wait()


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@requires_fuse
def test_rules_persist_across_a_clean_stop(mounter, tmp_path):
    path = tmp_path / "p.img"
    make_device(path, 256 * KiB, seed=4)
    sd = tmp_path / "state"
    m1 = mounter({"d0": str(path)}, state_dir=sd)
    m1.ok("protect d0 deny 0:8")
    m1.ok("protect d0 audit 64:64")
    rules = m1.ok("status")["devices"]["d0"]["protected"]
    m1.stop()
    (state_file,) = (sd / "cbt").iterdir()
    header = json.loads(state_file.read_bytes().split(b"\n", 1)[0])
    assert header["version"] == 1 and header["protect"] == [["deny", 0, 8], ["audit", 64, 64]]
    m2 = mounter({"d0": str(path)}, state_dir=sd)
    assert m2.ok("status")["devices"]["d0"]["protected"] == rules
    assert dd(m2.dev("d0"), 3).returncode != 0
    assert dd(m2.dev("d0"), 70).returncode == 0 and audit_lines(m2)[0]["sector"] == 70
    m2.ok("unprotect d0")
    m2.stop()
    m3 = mounter({"d0": str(path)}, state_dir=sd)
    assert m3.ok("status")["devices"]["d0"]["protected"] == []


@requires_fuse
def test_images_unaffected_and_bad_input(m, storage_dir):
    src, dev = m.sources["d0"], m.dev("d0")
    m.ok("protect d0 deny all")
    snap = m.snapshot(storage_dir, "8M", "d0")
    image = m.image(snap, "d0")
    result = subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=4096", "count=4", "conv=notrunc",
                             "status=none", "oflag=direct"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert sector_of(image, 0) == bytes(S) and sector_of(src, 0) != bytes(S)
    assert dd(dev, 0).returncode != 0
    m.ok(f"snapshot_destroy {snap}")
    for line, code in [("protect d0 deny 0:1", "EEXIST"), ("protect d0 allow 0:1", "EINVAL"),
                       ("protect nope deny 0:1", "ENOENT"), ("protect d0 deny", "EINVAL"),
                       ("unprotect d0 x:y", "EINVAL"), ("unprotect d0 2048:1", "EINVAL")]:
        assert m.err(line) == code, line
    m.ok("unprotect d0")
    for line, code in [("protect d0 deny 0:0", "EINVAL"), ("protect d0 deny 2040:9", "EINVAL"),
                       ("protect d0 deny 5", "EINVAL"), ("protect d0 deny all 0:1", "EINVAL"),
                       ("protect d0 audit 0:10 5:10", "EINVAL"), ("protect d0 deny 1:" + "9" * 30, "EINVAL"),
                       ("unprotect d0 0:1", "ENOENT")]:
        assert m.err(line) == code, line
    assert m.ok("status")["devices"]["d0"]["protected"] == []
    assert snapfs("protect", "-m", m.path, "d0", "deny", "7:1").returncode == 0
    assert snapfs("unprotect", "-m", m.path, "d0", "7:1").returncode == 0
    assert "bad sector" in snapfs("protect", "-m", m.path, "d0", "deny", "x:1").stderr
