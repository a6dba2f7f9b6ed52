"""Changed-block tracking through a real mount (docs/design.md sections 2-4).

The map a backup tool reads is ``cbt/NAME/map`` (the read map) and the numbers are in
``cbt/NAME/info``. The contract checked here: the read map only changes at a take
(or by "set both" marks); after a take, block i changed since the previous take iff
``map[i] > previous changes_number``; a written block is never reported unchanged;
wrap-around and unclean stops start a new generation; clean stops keep everything.
"""

import json
import os
import random
import subprocess
import threading
import time

import pytest
from helpers import KiB, MiB, make_device, requires_fuse, state_files

from snapfs.client import Connection

pytestmark = requires_fuse

BS = 64 * KiB                    # default tracking block size for small devices
OPTIONS = ["--chunk-minimum", "64K", "--diff-storage-minimum", "8M"]


# ----- helpers ----------------------------------------------------------------------

class Control(Connection):
    """A client connection (one handle, fast) with backup-cycle shortcuts."""

    def __init__(self, m):
        super().__init__(m.path)

    def run(self, line: str) -> dict:
        return self.command(line)

    def take(self, storage: str, *names: str) -> str:
        """snapshot_create + snapshot_take nofreeze; returns the id (still taken)."""
        snap = self.run(f"snapshot_create {storage} 64M {' '.join(names)}")["id"]
        self.run(f"snapshot_take {snap} nofreeze")
        return snap

    def cycle(self, storage: str, *names: str) -> None:
        """A whole backup cycle: create, take, destroy."""
        self.run(f"snapshot_destroy {self.take(storage, *names)}")


def info(m, name: str = "d0") -> dict:
    """cbt/NAME/info, checked against the cbtinfo command."""
    with open(m.p("cbt", name, "info"), "rb") as f:
        data = json.loads(f.read())
    reply = m.ok(f"cbtinfo {name}")
    assert {k: reply[k] for k in data} == data
    return data


def cbt_map(m, name: str = "d0") -> bytes:
    with open(m.p("cbt", name, "map"), "rb") as f:
        return f.read()


def blocks_of(offset: int, length: int, bs: int = BS) -> set[int]:
    return set(range(offset // bs, -(-(offset + length) // bs))) if length > 0 else set()


def changed(map_: bytes, since: int) -> set[int]:
    return {i for i, v in enumerate(map_) if v > since}


def write_dev(m, offset: int, data: bytes, name: str = "d0") -> None:
    fd = os.open(m.dev(name), os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


@pytest.fixture
def big_device(tmp_path):
    """A 32 MiB device (512 tracking blocks of 64K)."""
    path = tmp_path / "big.img"
    return str(path), make_device(path, 32 * MiB, seed=7)


# ----- 1. the read map is frozen between takes -----------------------------------------

def test_read_map_frozen_between_takes(mounter, big_device, storage_dir):
    path, _ = big_device
    m = mounter({"d0": path})
    ctl = Control(m)
    try:
        i0 = info(m)
        assert i0["block_size"] == BS and i0["block_count"] == 512
        assert i0["device_capacity"] == 32 * MiB and i0["changes_number"] == 0
        assert cbt_map(m) == bytes(512)

        snap = ctl.take(storage_dir, "d0")
        i1 = info(m)
        assert i1["changes_number"] == 1 and i1["generation_id"] == i0["generation_id"]
        before = cbt_map(m)
        assert before == bytes(512), "nothing was written before the first take"

        offset, length = 3 * MiB + 1000, 10 * MiB
        write_dev(m, offset, os.urandom(length))
        assert cbt_map(m) == before, "the read map changed without a take"
        assert info(m) == i1

        ctl.run(f"snapshot_destroy {snap}")
        assert cbt_map(m) == before, "destroy must not publish the write map"
        snap = ctl.take(storage_dir, "d0")
        i2 = info(m)
        assert i2["changes_number"] == 2 and i2["generation_id"] == i0["generation_id"]
        after = cbt_map(m)
        written = blocks_of(offset, length)
        assert len(written) == 161
        assert {i for i in range(512) if after[i] != before[i]} == written
        assert all(after[i] == 2 for i in written)
        assert changed(after, 1) == written

        # a second round over another range: old numbers stay, new ones appear
        write_dev(m, 20 * MiB - 1, b"xy")           # straddles blocks 319/320
        write_dev(m, 0, b"z")
        assert cbt_map(m) == after
        ctl.run(f"snapshot_destroy {snap}")
        ctl.cycle(storage_dir, "d0")
        third = cbt_map(m)
        assert info(m)["changes_number"] == 3
        assert changed(third, 2) == {0, 319, 320}
        assert {i for i in range(512) if third[i] != after[i]} == {0, 319, 320}
    finally:
        ctl.close()


# ----- 2. model-based: random writes, several threads, takes --------------------------

TB16 = 16 * KiB


def _random_writes(rng: random.Random, lo: int, hi: int, count: int, bs: int) -> list[tuple[int, int]]:
    """(offset, length) pairs inside [lo, hi): aligned, unaligned, border-straddling."""
    out = []
    for _ in range(count):
        kind = rng.choice(("aligned", "unaligned", "straddle", "tiny", "end"))
        if kind == "aligned":
            first = rng.randrange(lo // bs, max(lo // bs + 1, hi // bs - 3))
            off, length = first * bs, rng.randint(1, 3) * bs
        elif kind == "unaligned":
            off, length = rng.randrange(lo, hi - 1), rng.randint(1, 3 * bs)
        elif kind == "straddle":
            border = rng.randrange(-(-(lo + 1) // bs), max(-(-(lo + 1) // bs) + 1, hi // bs)) * bs
            before, after = rng.randint(1, 4096), rng.randint(1, 4096)
            off, length = border - before, before + after
        elif kind == "tiny":
            off, length = rng.randrange(lo, hi - 1), 1
        else:
            length = rng.randint(1, 2 * bs)
            off = hi - length
        off = max(lo, off)
        length = min(length, hi - off)
        if length > 0:
            out.append((off, length))
    return out


def _run_writers(m, jobs: list[list[tuple[int, int]]]) -> None:
    errors: list[BaseException] = []

    def worker(items):
        try:
            fd = os.open(m.dev("d0"), os.O_WRONLY)
            try:
                for off, length in items:
                    assert os.pwrite(fd, os.urandom(length), off) == length
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(items,)) for items in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_model_random_writes_between_takes(mounter, device, storage_dir):
    path, content = device
    size = len(content)
    m = mounter({"d0": path}, options=[*OPTIONS, "--tracking-block-minimum", "16K"])
    i0 = info(m)
    bs, count, gen = i0["block_size"], i0["block_count"], i0["generation_id"]
    assert (bs, count) == (TB16, -(-size // TB16))
    rng = random.Random(1234)
    model = bytearray(count)          # expected read map after each take
    ever = set()
    ctl = Control(m)
    snap = None
    try:
        for period in range(1, 13):
            threads = rng.choice((1, 3, 4))
            if period == 5:
                jobs = []                                        # an empty period
            elif period % 2:                                     # disjoint regions
                step = size // threads
                jobs = [_random_writes(rng, k * step, size if k == threads - 1 else (k + 1) * step,
                                       rng.randint(5, 25), bs) for k in range(threads)]
            else:                                                # overlapping: whole device
                jobs = [_random_writes(rng, 0, size, rng.randint(5, 25), bs) for _ in range(threads)]
            wrote = set()
            for items in jobs:
                for off, length in items:
                    wrote |= blocks_of(off, length, bs)
            frozen = cbt_map(m)
            _run_writers(m, jobs)   # writes land while the previous snapshot is still taken (COW)
            assert cbt_map(m) == frozen, f"period {period}: read map moved before the take"

            if snap is not None:
                ctl.run(f"snapshot_destroy {snap}")
            snap = ctl.take(storage_dir, "d0")
            now = info(m)
            assert now["generation_id"] == gen and now["changes_number"] == period
            got = cbt_map(m)
            assert len(got) == count
            reported = changed(got, period - 1)
            missed = wrote - reported
            assert not missed, f"period {period}: written blocks reported unchanged: {sorted(missed)}"
            assert reported == wrote, f"period {period}: extra blocks {sorted(reported - wrote)}"
            for i in wrote:
                model[i] = period
            ever |= wrote
            assert got == bytes(model)
            assert all(got[i] == 0 for i in range(count) if i not in ever)
        assert 0 < len(ever) < count, "the test should leave some blocks unwritten"
    finally:
        ctl.close()


def test_no_write_missed_with_takes_during_writes(mounter, device, storage_dir):
    """Writers run without pause while takes happen. A write that finished before a
    take was requested must be in that take's map with a number at least that of the
    period it started in; blocks nobody wrote stay 0."""
    path, content = device
    size = len(content)
    m = mounter({"d0": path}, options=[*OPTIONS, "--tracking-block-minimum", "16K"])
    bs = info(m)["block_size"]
    log: list[tuple[float, float, int, int]] = []       # (start, end, offset, length)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    hot = (0, size // 2)                # writers stay in the first half: the rest must stay 0

    def writer(seed):
        rng = random.Random(seed)
        try:
            fd = os.open(m.dev("d0"), os.O_WRONLY)
            try:
                while not stop.is_set():
                    for off, length in _random_writes(rng, *hot, 10, bs):
                        data = os.urandom(length)
                        t0 = time.monotonic()
                        os.pwrite(fd, data, off)
                        t1 = time.monotonic()
                        with lock:
                            log.append((t0, t1, off, length))
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    ctl = Control(m)
    takes: list[tuple[float, float, bytes]] = []          # (sent, replied, map)
    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        snap = None
        for _ in range(10):
            time.sleep(0.03)
            if snap is not None:
                ctl.run(f"snapshot_destroy {snap}")
            sent = time.monotonic()
            snap = ctl.take(storage_dir, "d0")
            replied = time.monotonic()
            takes.append((sent, replied, cbt_map(m)))
    finally:
        stop.set()
        for t in threads:
            t.join()
        ctl.close()
    assert not errors, errors
    assert info(m)["changes_number"] == 10
    with lock:
        writes = list(log)
    assert len(writes) > 50
    cold = blocks_of(hot[1], size - hot[1], bs) - blocks_of(*hot, bs)
    for k, (sent, _, map_k) in enumerate(takes, start=1):
        assert max(map_k) <= k
        assert all(map_k[i] == 0 for i in cold)
        for start, end, off, length in writes:
            if end >= sent:
                continue
            # the number stamped is at least 1 + the takes completed before the write began
            floor = 1 + sum(1 for (_, replied, _) in takes if replied < start)
            low = min(map_k[i] for i in blocks_of(off, length, bs))
            assert low >= floor, (f"take {k}: write {off}+{length} (started after take {floor - 1}) "
                                  f"reported with number {low}")


# ----- 3. markdirtyblock and image writes mark both maps ------------------------------

def test_markdirtyblock_marks_exactly_the_requested_blocks(mounter, device, storage_dir):
    path, content = device
    m = mounter({"d0": path})
    count = info(m)["block_count"]
    assert count == 129                         # 128 full blocks + one of 4608 bytes
    ctl = Control(m)
    try:
        write_dev(m, 10 * BS, b"a")
        ctl.cycle(storage_dir, "d0")            # 1: block 10
        write_dev(m, 20 * BS, b"b")
        ctl.cycle(storage_dir, "d0")            # 2: block 20
        base = cbt_map(m)
        assert base[10] == 1 and base[20] == 2 and changed(base, 0) == {10, 20}

        # sectors: 128 per block. 0:1 -> block 0; 127:2 -> blocks 0,1; 1280:1 -> block 10
        # (already 1, becomes 2); 640:256 -> blocks 5,6; last sector -> block 128
        last = len(content) // 512 - 1
        reply = m.ok(f"markdirtyblock d0 0:1 127:2 1280:1 640:256 {last}:1")
        assert reply["ranges"] == 5
        marked = {0, 1, 10, 5, 6, 128}
        now = cbt_map(m)
        assert {i for i in range(count) if now[i] != base[i]} == marked
        assert all(now[i] == 2 for i in marked), "read map gets the previous number"
        assert now[20] == 2
        assert info(m)["changes_number"] == 2

        ctl.cycle(storage_dir, "d0")            # 3
        after = cbt_map(m)
        assert changed(after, 2) == marked, "the next take reports them too"
        assert all(after[i] == 3 for i in marked)
        assert {i for i in range(count) if after[i] != now[i]} == marked

        # the content of the device is untouched by markdirtyblock
        with open(m.dev("d0"), "rb") as f:
            data = f.read()
        assert data[: 10 * BS] == content[: 10 * BS]

        assert m.err(f"markdirtyblock d0 {last}:2") == "EINVAL"
        assert m.err(f"markdirtyblock d0 {last + 1}:1") == "EINVAL"
        assert m.err("markdirtyblock d0 5:0") == "EINVAL"
        assert m.err("markdirtyblock d0 five") == "EINVAL"
        assert m.err("markdirtyblock nosuch 0:1") == "ENOENT"
        assert cbt_map(m) == after, "a failed markdirtyblock marks nothing"
    finally:
        ctl.close()


def test_markdirtyblock_before_first_take(mounter, device, storage_dir):
    path, _ = device
    m = mounter({"d0": path})
    m.ok("markdirtyblock d0 256:1")             # block 2
    assert cbt_map(m) == bytes(129)             # previous number 0: nothing to show yet
    ctl = Control(m)
    try:
        ctl.cycle(storage_dir, "d0")
    finally:
        ctl.close()
    assert changed(cbt_map(m), 0) == {2}


def test_image_writes_mark_both_maps(mounter, device, storage_dir):
    path, content = device
    m = mounter({"d0": path})
    ctl = Control(m)
    try:
        ctl.cycle(storage_dir, "d0")            # 1
        write_dev(m, 30 * BS, b"w")             # in period 2
        snap = ctl.take(storage_dir, "d0")      # 2
        base = cbt_map(m)
        assert changed(base, 0) == {30} and base[30] == 2

        fd = os.open(m.image(snap, "d0"), os.O_WRONLY)
        try:
            os.pwrite(fd, b"i" * (BS + 2), 4 * BS - 1)          # blocks 3, 4, 5
            os.pwrite(fd, b"j", len(content) - 1)               # block 128
        finally:
            os.close(fd)
        marked = {3, 4, 5, 128}
        now = cbt_map(m)
        assert {i for i in range(129) if now[i] != base[i]} == marked
        assert all(now[i] == 2 for i in marked), "image write: read map gets the taken number"
        with open(path, "rb") as f:
            assert f.read() == content[: 30 * BS] + b"w" + content[30 * BS + 1 :], \
                "an image write reached the source"

        ctl.run(f"snapshot_destroy {snap}")
        ctl.cycle(storage_dir, "d0")            # 3
        after = cbt_map(m)
        assert changed(after, 2) == marked, "image writes are reported at the next take too"
        assert after[30] == 2
    finally:
        ctl.close()


# ----- 4. wrap-around ---------------------------------------------------------------

def test_wrap_around_after_255_takes(mounter, storage_dir, tmp_path):
    path = tmp_path / "small.img"
    make_device(path, 8 * BS, seed=3)
    m = mounter({"d0": str(path)})
    gen = info(m)["generation_id"]
    ctl = Control(m)
    try:
        write_dev(m, 0, b"0")                   # stamped 1
        for n in range(1, 254):                 # takes 1..253
            ctl.cycle(storage_dir, "d0")
            if n in (1, 100, 253):
                i = info(m)
                assert (i["generation_id"], i["changes_number"]) == (gen, n)
        write_dev(m, 1 * BS, b"1")              # stamped 254
        ctl.cycle(storage_dir, "d0")            # take 254
        i = info(m)
        assert (i["generation_id"], i["changes_number"]) == (gen, 254)
        assert list(cbt_map(m)) == [1, 254, 0, 0, 0, 0, 0, 0]
        write_dev(m, 2 * BS, b"2")              # stamped 255
        ctl.cycle(storage_dir, "d0")            # take 255: active was 255 -> wrap
        i = info(m)
        assert i["generation_id"] != gen, "no new generation after 255 takes"
        assert i["changes_number"] == 0
        # cbt.py: the wrap take still publishes a copy of the (old) write map
        assert list(cbt_map(m)) == [1, 254, 255, 0, 0, 0, 0, 0]
        new_gen = i["generation_id"]

        write_dev(m, 3 * BS, b"3")
        ctl.cycle(storage_dir, "d0")            # take 256: first numbered take of the new generation
        i = info(m)
        assert (i["generation_id"], i["changes_number"]) == (new_gen, 1)
        assert list(cbt_map(m)) == [0, 0, 0, 1, 0, 0, 0, 0], "write map was not zeroed at wrap"
        write_dev(m, 4 * BS, b"4")
        ctl.cycle(storage_dir, "d0")            # take 257
        i = info(m)
        assert (i["generation_id"], i["changes_number"]) == (new_gen, 2)
        assert list(cbt_map(m)) == [0, 0, 0, 1, 2, 0, 0, 0]
    finally:
        ctl.close()


# ----- 5. persistence -----------------------------------------------------------------

def _populate(m, storage_dir) -> None:
    """Two takes with writes, then writes in the open period (write map only)."""
    ctl = Control(m)
    try:
        write_dev(m, 5 * BS, b"a" * 10)
        ctl.cycle(storage_dir, "d0")
        write_dev(m, 7 * BS - 1, b"bb")
        ctl.cycle(storage_dir, "d0")
        write_dev(m, 100 * BS, b"c")            # not yet published
    finally:
        ctl.close()


def _cycle(m, storage_dir, name: str = "d0") -> None:
    ctl = Control(m)
    try:
        ctl.cycle(storage_dir, name)
    finally:
        ctl.close()


def test_clean_remount_keeps_cbt(mounter, device, storage_dir, tmp_path):
    path, _ = device
    sd = tmp_path / "state"
    m1 = mounter({"d0": path}, state_dir=sd)
    _populate(m1, storage_dir)
    i1, map1 = info(m1), cbt_map(m1)
    assert i1["changes_number"] == 2 and changed(map1, 0) == {5, 6, 7}
    m1.stop()
    assert len(state_files(sd)) == 1

    m2 = mounter({"d0": path}, state_dir=sd)
    assert info(m2) == i1
    assert cbt_map(m2) == map1
    assert state_files(sd) == [], "a running mount must consume its state (clean-stop rule)"
    _cycle(m2, storage_dir)
    i2 = info(m2)
    assert (i2["generation_id"], i2["changes_number"]) == (i1["generation_id"], 3)
    assert changed(cbt_map(m2), 2) == {100}, "the write map of the open period was lost"

    # and once more: a clean stop right after a remount keeps it as well
    m2.stop()
    m3 = mounter({"d0": path}, state_dir=sd)
    assert info(m3) == i2


def test_sigkill_means_new_generation(mounter, device, storage_dir, tmp_path):
    path, _ = device
    sd = tmp_path / "state"
    m1 = mounter({"d0": path}, state_dir=sd)
    _populate(m1, storage_dir)
    m1.stop()
    m2 = mounter({"d0": path}, state_dir=sd)
    gen = info(m2)["generation_id"]
    write_dev(m2, 50 * BS, b"lost?")
    m2.kill()
    m3 = mounter({"d0": path}, state_dir=sd)
    i3 = info(m3)
    assert i3["generation_id"] != gen
    assert i3["changes_number"] == 0
    assert cbt_map(m3) == bytes(i3["block_count"])


def _touch_mtime(path: str) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _change_byte(path: str) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(12345)
        old = f.read(1)
        f.seek(12345)
        f.write(bytes([old[0] ^ 0xFF]))
    # the kernel moves mtime on a write; make sure even a coarse clock shows it
    if os.stat(path).st_mtime_ns == st.st_mtime_ns:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def _replace_inode(path: str) -> None:
    tmp = path + ".new"
    subprocess.run(["cp", "-p", path, tmp], check=True)
    os.rename(tmp, path)


@pytest.mark.parametrize("change", [_touch_mtime, _change_byte, _replace_inode],
                         ids=["utime", "byte", "inode"])
def test_source_changed_while_unmounted_means_new_generation(mounter, device, storage_dir,
                                                             tmp_path, change):
    path, _ = device
    sd = tmp_path / "state"
    m1 = mounter({"d0": path}, state_dir=sd)
    _populate(m1, storage_dir)
    gen = info(m1)["generation_id"]
    m1.stop()
    change(path)
    m2 = mounter({"d0": path}, state_dir=sd)
    i2 = info(m2)
    assert i2["generation_id"] != gen and i2["changes_number"] == 0
    assert cbt_map(m2) == bytes(i2["block_count"])
    assert state_files(sd) == []
    _cycle(m2, storage_dir)


GARBAGE = {
    "random": bytes(random.Random(5).randbytes(5000)),
    "empty": b"",
    "truncated": None,            # the real file cut in half
    "json-list": b"[]\n",
    "json-null": b"null\n",
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_state_file_means_new_generation(mounter, device, storage_dir, tmp_path, kind):
    path, _ = device
    sd = tmp_path / "state"
    m1 = mounter({"d0": path}, state_dir=sd)
    _populate(m1, storage_dir)
    gen = info(m1)["generation_id"]
    m1.stop()
    [state] = state_files(sd)
    data = GARBAGE[kind]
    if data is None:
        data = state.read_bytes()[: state.stat().st_size // 2]
    state.write_bytes(data)
    m2 = mounter({"d0": path}, state_dir=sd)       # must mount, not fail on the state file
    i2 = info(m2)
    assert i2["generation_id"] != gen and i2["changes_number"] == 0
    assert cbt_map(m2) == bytes(i2["block_count"])
    write_dev(m2, 3 * BS, b"x")
    _cycle(m2, storage_dir)
    assert changed(cbt_map(m2), 0) == {3}
    assert "ignoring CBT state" in m2.read_log()


def _change_d1(m, how: str) -> None:
    """A change of d1 that the CBT must report: a device write (it also moves the
    source's mtime) or a markdirtyblock (the source file stays as it is)."""
    if how == "write":
        write_dev(m, 3 * BS, b"must not be lost", name="d1")
    else:
        m.ok("markdirtyblock d1 384:1")           # block 3


def _attached_from_saved_state(mounter, device, tmp_path):
    """Mount d0 and d1, stop cleanly (both CBTs saved), mount d0 alone and attach d1 at
    run time; d1's CBT must be the saved one. Returns (mount, d0 path, d1 path, state
    dir, d1's generation)."""
    path, _ = device
    other = tmp_path / "other.img"
    make_device(other, 2 * MiB, seed=9)
    sd = tmp_path / "state"
    m1 = mounter({"d0": path, "d1": str(other)}, state_dir=sd)
    gen = info(m1, "d1")["generation_id"]
    m1.stop()
    assert len(state_files(sd)) == 2

    m2 = mounter({"d0": path}, state_dir=sd)
    m2.ok(f"attach d1 {other}")
    assert info(m2, "d1")["generation_id"] == gen, "attach restores a cleanly saved CBT"
    return m2, path, other, sd, gen


@pytest.mark.parametrize("how", ["write", "markdirtyblock"])
def test_state_of_a_device_attached_at_run_time_is_consumed(mounter, device, storage_dir,
                                                            tmp_path, how):
    """The clean-stop rule must hold for ``attach`` too: a state file restored by a
    run-time attach must not survive a crash of that mount."""
    m2, path, other, sd, gen = _attached_from_saved_state(mounter, device, tmp_path)
    _change_d1(m2, how)
    m2.kill()                  # a crash: nothing may restore the CBT from before the change

    m3 = mounter({"d0": path, "d1": str(other)}, state_dir=sd)
    i3 = info(m3, "d1")
    restored_stale = i3["generation_id"] == gen
    _cycle(m3, storage_dir, "d1")
    reported = 3 in changed(cbt_map(m3, "d1"), i3["changes_number"])
    assert not restored_stale or reported, (
        "crash after a run-time attach restored the pre-crash CBT file: block 3 changed "
        "but is reported unchanged in the same generation")
    assert not restored_stale, "unclean stop must start a new generation"


@pytest.mark.parametrize("how", ["write", "markdirtyblock"])
def test_detach_forgets_cbt_history(mounter, device, storage_dir, tmp_path, how):
    """docs/design.md: detach removes the device, CBT history gone: attaching it again must
    start a new generation, even when its CBT was restored from state at attach."""
    m2, _, other, _, gen = _attached_from_saved_state(mounter, device, tmp_path)
    _change_d1(m2, how)
    m2.ok("detach d1")
    m2.ok(f"attach d1 {other}")
    i = info(m2, "d1")
    assert i["generation_id"] != gen, "re-attach after detach restored the old generation"
    assert i["changes_number"] == 0


# ----- 6. the map file ------------------------------------------------------------------

def test_map_file_readable_with_dd_at_any_offset(mounter, device, storage_dir):
    path, _ = device
    m = mounter({"d0": path})
    ctl = Control(m)
    try:
        for blocks in [(0, 1, 2), (2, 3, 60), (61, 64, 127), (128, 5, 90)]:
            for b in blocks:
                write_dev(m, b * BS + 7, b"q")
            ctl.cycle(storage_dir, "d0")
    finally:
        ctl.close()
    mp = m.p("cbt", "d0", "map")
    full = cbt_map(m)
    count = info(m)["block_count"]
    assert os.path.getsize(mp) == count == len(full) == 129
    assert full[:4] == bytes([1, 1, 2, 2]) and full[128] == 4 and full[90] == 4

    def dd(*args: str) -> bytes:
        return subprocess.run(["dd", f"if={mp}", "status=none", *args],
                              check=True, capture_output=True).stdout

    for skip, cnt in [(0, 1), (1, 3), (59, 7), (64, 1), (127, 2), (128, 1), (100, 50), (129, 4)]:
        assert dd("bs=1", f"skip={skip}", f"count={cnt}") == full[skip:skip + cnt], (skip, cnt)
    assert dd("bs=7", "skip=3", "count=5") == full[21:56]
    assert dd("bs=1M") == full
    assert dd("bs=4096", "iflag=direct") == full
    with open(mp, "rb") as f:
        f.seek(100)
        assert f.read(10) == full[100:110]
        assert f.read() == full[110:]
        assert f.read() == b""
    fd = os.open(mp, os.O_RDONLY)
    try:
        assert os.pread(fd, 3, 127) == full[127:]
        assert os.pread(fd, 10, 500) == b""
    finally:
        os.close(fd)
