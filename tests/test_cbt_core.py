"""Unit tests of the CBT core (snapfs/cbt.py) and its persistence (snapfs/cbtstate.py).

No FUSE: these build CBT objects directly and use a real temporary file as the
Source. The semantics under test are docs/design.md section 4 "Tracking (CBT)" and the
module docstrings of cbt.py (wrap-around) and cbtstate.py (format, clean-stop rule).
"""

import json
import logging
import os
import shutil
import sys

import pytest
from helpers import state_files

from snapfs.cbt import CBT, MAX_NUMBER
from snapfs.cbtstate import StateStore
from snapfs.params import GiB, KiB, MiB, Params, TiB, tracking_block_size
from snapfs.source import Source

BS = 64 * KiB


# ----- tracking block size ------------------------------------------------------------

@pytest.mark.parametrize(("capacity", "expected"), [
    (1, 64 * KiB),
    (512, 64 * KiB),
    (8 * MiB + 4608, 64 * KiB),
    (128 * GiB, 64 * KiB),                 # exactly 2**21 blocks of 64K: no doubling
    (128 * GiB + 1, 128 * KiB),            # one more block than the maximum count
    (256 * GiB, 128 * KiB),
    (1 * TiB, 512 * KiB),
    (6 * TiB, 4 * MiB),
    (128 * TiB, 64 * MiB),                 # 2**21 blocks of 64M
    (1024 * TiB, 64 * MiB),                # capped: the count now exceeds the maximum
])
def test_tracking_block_size_defaults(capacity, expected):
    size = tracking_block_size(capacity, Params())
    assert size == expected
    if size < 64 * MiB:
        assert -(-capacity // size) <= Params().tracking_block_maximum_count


def test_tracking_block_size_cap_lets_count_exceed_maximum():
    size = tracking_block_size(1024 * TiB, Params())
    assert size == 64 * MiB
    assert -(-1024 * TiB // size) == 16 * 2**20 > Params().tracking_block_maximum_count


def test_tracking_block_size_follows_tunables():
    p = Params(tracking_block_minimum=4 * KiB, tracking_block_maximum_count=16)
    assert tracking_block_size(64 * KiB, p) == 4 * KiB       # 16 blocks: fits
    assert tracking_block_size(64 * KiB + 1, p) == 8 * KiB   # 17 blocks: double
    assert tracking_block_size(1 * GiB, p) == 64 * MiB       # 2**30/16 = 64M: cap reached exactly
    assert tracking_block_size(2 * GiB, p) == 64 * MiB       # capped


# ----- mark / mark_both ---------------------------------------------------------------

def make_cbt(blocks: float = 10, bs: int = BS) -> CBT:
    return CBT(int(blocks * bs), bs)


def test_new_cbt_is_empty_and_numbered_from_one():
    c = make_cbt(10.5)
    assert c.block_count == 11                     # the short last block counts
    assert c.write_map == bytes(11) and c.read_map == bytes(11)
    assert (c.active, c.changes_number) == (1, 0)
    info = c.info()
    assert info == {"block_size": BS, "device_capacity": int(10.5 * BS), "block_count": 11,
                    "generation_id": c.generation_id, "changes_number": 0}
    assert make_cbt().generation_id != c.generation_id


@pytest.mark.parametrize(("offset", "length", "blocks"), [
    (0, 1, {0}),
    (BS - 1, 1, {0}),
    (BS - 1, 2, {0, 1}),                       # straddles one border
    (BS, BS, {1}),                             # exactly one block
    (BS + 1, BS, {1, 2}),                      # unaligned, one block long: two blocks
    (3 * BS - 512, 3 * BS + 1024, {2, 3, 4, 5, 6}),
    (0, 0, set()),                             # empty write marks nothing
    (9 * BS, 100 * BS, {9, 10}),               # clipped at the end of the device
    (int(10.5 * BS) - 1, 1, {10}),             # last byte of the short last block
    (int(10.5 * BS), 10, set()),               # at the end: nothing
    (20 * BS, 10, set()),                      # past the end: nothing
])
def test_mark_sets_exactly_the_covered_blocks(offset, length, blocks):
    c = make_cbt(10.5)
    c.mark(offset, length)
    assert {i for i, v in enumerate(c.write_map) if v} == blocks
    assert all(c.write_map[i] == 1 for i in blocks)
    assert c.read_map == bytes(c.block_count), "a write must not touch the read map"


def test_mark_stamps_the_active_number_and_values_only_grow():
    c = make_cbt()
    c.mark(0, BS)
    c.switch()                       # changes_number 1, active 2
    c.mark(BS, BS)
    assert list(c.write_map[:3]) == [1, 2, 0]
    c.mark(0, 2 * BS)
    assert list(c.write_map[:3]) == [2, 2, 0]
    assert max(c.write_map) <= c.active
    assert list(c.read_map[:3]) == [1, 0, 0], "read map is frozen between takes"


def test_mark_both_sets_write_map_active_and_read_map_previous():
    c = make_cbt()
    c.mark(0, BS)
    c.switch()
    c.switch()                       # changes_number 2, active 3; read_map[0] == 1
    assert list(c.read_map[:4]) == [1, 0, 0, 0]
    c.mark_both(BS - 512, 512 + BS + 1)   # blocks 0, 1, 2
    assert list(c.write_map[:4]) == [3, 3, 3, 0]
    assert list(c.read_map[:4]) == [2, 2, 2, 0]
    c.switch()
    assert c.changes_number == 3
    assert list(c.read_map[:4]) == [3, 3, 3, 0]


def test_mark_both_never_lowers_the_read_map():
    c = make_cbt()
    c.switch()                       # 1
    c.mark(0, BS)
    c.switch()                       # 2: read_map[0] == 2
    c.mark(0, BS)                    # write map 3
    assert c.read_map[0] == 2
    c.mark_both(0, BS)
    assert c.read_map[0] == 2 and c.write_map[0] == 3


def test_mark_both_before_the_first_take_reports_in_the_first_map():
    c = make_cbt()
    c.mark_both(5 * BS, 1)
    assert c.read_map == bytes(c.block_count)    # previous number is 0: nothing to raise
    c.switch()
    assert c.read_map[5] == 1 and sum(c.read_map) == 1


# ----- switch and wrap-around ---------------------------------------------------------

def test_switch_numbers():
    c = make_cbt()
    gen = c.generation_id
    for n in range(1, 200):
        c.switch()
        assert (c.changes_number, c.active) == (n, n + 1)
        assert c.generation_id == gen


def test_switch_copies_the_write_map():
    c = make_cbt()
    c.mark(2 * BS, 1)
    c.switch()
    c.mark(4 * BS, 1)
    before = bytes(c.write_map)
    c.switch()
    assert c.read_map == before
    assert list(c.read_map[:6]) == [0, 0, 1, 0, 2, 0]


def test_wrap_around_after_255_takes():
    """cbt.py docstring: when active is 255 at take, the read map still gets a copy of
    the write map, then a new generation starts (write map zeroed, changes_number 0,
    active 1)."""
    c = make_cbt()
    gen = c.generation_id
    c.mark(0, 1)                           # stamped 1
    for n in range(1, 255):                # takes 1..254
        c.switch()
        assert c.changes_number == n and c.generation_id == gen
        c.mark(BS, 1)                      # block 1 rewritten in every period
    assert (c.changes_number, c.active) == (254, 255)
    c.mark(2 * BS, 1)                      # stamped 255
    write_before = bytes(c.write_map)
    assert list(write_before[:4]) == [1, 255, 255, 0]
    c.switch()                             # take 255: wrap
    assert c.generation_id != gen
    assert (c.changes_number, c.active) == (0, 1)
    assert c.read_map == write_before, "the wrap take still publishes the old write map"
    assert c.write_map == bytes(c.block_count)
    assert c.info()["changes_number"] == 0
    # A tool holding the old generation must do a full backup:
    assert c.changed_ranges(gen, 254) is None
    # the next take reports exactly what was written since the wrap
    c.mark(3 * BS, 1)
    c.switch()
    assert (c.changes_number, c.active) == (1, 2)
    assert list(c.read_map[:5]) == [0, 0, 0, 1, 0]
    assert list(c.changed_ranges(c.generation_id, 0)) == [(3 * BS, BS)]
    assert MAX_NUMBER == 255


def test_mark_both_right_after_wrap_is_reported_at_next_take():
    c = make_cbt()
    for _ in range(255):
        c.switch()
    assert c.changes_number == 0
    c.mark_both(7 * BS, 1)
    c.switch()
    assert c.read_map[7] == 1


def test_new_generation_zeroes_both_maps():
    c = make_cbt()
    c.mark(0, 10 * BS)
    c.switch()
    gen = c.generation_id
    c.new_generation()
    assert c.generation_id != gen
    assert c.read_map == bytes(c.block_count) == c.write_map
    assert (c.changes_number, c.active) == (0, 1)


# ----- changed_ranges ---------------------------------------------------------------

def test_changed_ranges_merges_runs_and_clips_the_last_block():
    c = make_cbt(10.5)
    c.mark(0, 2 * BS)              # blocks 0-1: 1
    c.switch()
    c.mark(BS, 2 * BS)             # blocks 1-2: 2
    c.mark(5 * BS, 1)              # block 5: 2
    c.mark(9 * BS, BS)             # block 9: 2
    c.mark(10 * BS, 1)             # block 10 (short): 2
    c.switch()
    gen = c.generation_id
    assert list(c.read_map) == [1, 2, 2, 0, 0, 2, 0, 0, 0, 2, 2]
    assert list(c.changed_ranges(gen, 0)) == [(0, 3 * BS), (5 * BS, BS), (9 * BS, int(1.5 * BS))]
    assert list(c.changed_ranges(gen, 1)) == [(BS, 2 * BS), (5 * BS, BS), (9 * BS, int(1.5 * BS))]
    assert list(c.changed_ranges(gen, 2)) == []
    assert c.changed_ranges("another-generation", 0) is None


def test_changed_ranges_single_block_device():
    c = CBT(1000, BS)
    assert c.block_count == 1
    c.mark(999, 1)
    c.switch()
    assert list(c.changed_ranges(c.generation_id, 0)) == [(0, 1000)]


# ----- memory -----------------------------------------------------------------------

def test_memory_of_a_1tib_device_is_two_bytes_per_block():
    bs = tracking_block_size(1 * TiB, Params())
    c = CBT(1 * TiB, bs)
    assert bs == 512 * KiB and c.block_count == 2 * 2**20
    assert c.memory_bytes() == 2 * c.block_count == 4 * MiB
    held = sys.getsizeof(c.write_map) + sys.getsizeof(c.read_map)
    assert 2 * c.block_count <= held <= 2 * c.block_count + 4096
    # a switch copies in place: no new map objects, no growth
    ids = (id(c.write_map), id(c.read_map))
    c.mark(0, 1 * TiB)
    c.switch()
    assert (id(c.write_map), id(c.read_map)) == ids
    assert sys.getsizeof(c.write_map) + sys.getsizeof(c.read_map) == held


def test_memory_of_a_128gib_device():
    c = CBT(128 * GiB, tracking_block_size(128 * GiB, Params()))
    assert c.memory_bytes() == 4 * MiB


# ----- persistence --------------------------------------------------------------------

@pytest.fixture
def source_file(tmp_path):
    """A real 1 MiB + 512 source file (17 blocks of 64K, the last one short)."""
    path = tmp_path / "src.img"
    path.write_bytes(os.urandom(1 * MiB + 512))
    return path


@pytest.fixture
def opened(source_file):
    sources = []

    def open_source() -> Source:
        """As a new daemon would: the one before released the file (and its lock)."""
        st = os.stat(source_file)
        for old in [o for o in sources if (o.st.st_dev, o.st.st_ino) == (st.st_dev, st.st_ino)]:
            old.close()
            sources.remove(old)
        s = Source.open(str(source_file))
        sources.append(s)
        return s

    yield open_source
    for s in sources:
        s.close()


def populated_cbt(source: Source) -> CBT:
    c = CBT(source.size, tracking_block_size(source.size, Params()))
    c.mark(0, 1)
    c.switch()
    c.mark(3 * BS, 2 * BS)
    c.switch()
    c.mark(16 * BS, 1)             # the short last block, in the open period
    c.mark_both(8 * BS, 1)
    return c


def test_save_load_round_trip(tmp_path, opened):
    store = StateStore(str(tmp_path / "state"), Params())
    src = opened()
    c = populated_cbt(src)
    store.save(src, c)
    assert [f.name for f in state_files(tmp_path / "state")] == [os.path.basename(store.path_for(src))]
    assert not list((tmp_path / "state" / "cbt").glob("*.tmp"))

    loaded = StateStore(str(tmp_path / "state"), Params()).load(opened())
    assert loaded is not None
    assert loaded.generation_id == c.generation_id
    assert (loaded.changes_number, loaded.active) == (c.changes_number, c.active) == (2, 3)
    assert loaded.write_map == c.write_map and loaded.read_map == c.read_map
    assert (loaded.block_size, loaded.capacity, loaded.block_count) == (BS, src.size, 17)
    # it goes on where it stopped
    loaded.switch()
    assert loaded.changes_number == 3 and loaded.read_map[16] == 3 and loaded.read_map[8] == 3


def test_round_trip_after_wrap(tmp_path, opened):
    store = StateStore(str(tmp_path / "state"), Params())
    src = opened()
    c = populated_cbt(src)
    for _ in range(253):
        c.switch()
    assert c.changes_number == 0      # wrapped
    store.save(src, c)
    loaded = store.load(opened())
    assert loaded is not None
    assert (loaded.generation_id, loaded.changes_number, loaded.active) == (c.generation_id, 0, 1)
    assert loaded.read_map == c.read_map


def test_no_state_file_means_none(tmp_path, opened, caplog):
    store = StateStore(str(tmp_path / "state"), Params())
    with caplog.at_level(logging.INFO, logger="snapfs.cbtstate"):
        assert store.load(opened()) is None
    store.consume()                   # nothing loaded: nothing to remove, no error


def _save(tmp_path, src) -> tuple[StateStore, str]:
    store = StateStore(str(tmp_path / "state"), Params())
    store.save(src, populated_cbt(src))
    return store, store.path_for(src)


def _expect_ignored(store: StateStore, src: Source, caplog) -> None:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="snapfs.cbtstate"):
        assert store.load(src) is None
    assert any(r.levelno == logging.WARNING for r in caplog.records), caplog.text


def test_mtime_change_means_new_generation(tmp_path, opened, source_file, caplog):
    src = opened()
    store, _ = _save(tmp_path, src)
    st = os.stat(source_file)
    os.utime(source_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    _expect_ignored(store, opened(), caplog)


def test_content_change_means_new_generation(tmp_path, opened, source_file, caplog):
    src = opened()
    store, _ = _save(tmp_path, src)
    st = os.stat(source_file)
    with open(source_file, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff")
    os.utime(source_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # even if the clock is coarse
    _expect_ignored(store, opened(), caplog)


def test_size_change_means_new_generation(tmp_path, opened, source_file, caplog):
    src = opened()
    store, _ = _save(tmp_path, src)
    st = os.stat(source_file)
    with open(source_file, "ab") as f:
        f.write(b"\0" * 512)
    os.utime(source_file, ns=(st.st_atime_ns, st.st_mtime_ns))   # same mtime: size alone decides
    _expect_ignored(store, opened(), caplog)


def test_inode_change_means_new_generation(tmp_path, opened, source_file, caplog):
    src = opened()                   # stays open: keeps the old inode (and its number) alive
    store, _ = _save(tmp_path, src)
    # same path, size, content and mtime, but another inode (a restored copy)
    copy = source_file.with_suffix(".copy")
    shutil.copy2(source_file, copy)
    os.rename(copy, source_file)
    st_old, st_new = os.fstat(src.fd), os.stat(source_file)
    assert st_new.st_ino != st_old.st_ino
    assert (st_new.st_mtime_ns, st_new.st_size) == (st_old.st_mtime_ns, st_old.st_size)
    _expect_ignored(store, opened(), caplog)


def test_unchanged_source_reopened_is_trusted(tmp_path, opened):
    src = opened()
    store, _ = _save(tmp_path, src)
    assert store.load(opened()) is not None


def test_block_size_change_means_new_generation(tmp_path, opened, caplog):
    src = opened()
    _, _ = _save(tmp_path, src)
    other = StateStore(str(tmp_path / "state"), Params(tracking_block_minimum=128 * KiB))
    _expect_ignored(other, opened(), caplog)


def _header_and_maps(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    end = data.index(b"\n")
    return json.loads(data[:end]), data[end + 1:]


def _valid_header(tmp_path, src) -> tuple[StateStore, str, dict, bytes]:
    store, path = _save(tmp_path, src)
    header, maps = _header_and_maps(path)
    return store, path, header, maps


GARBAGE = {
    "empty": b"",
    "random": bytes(range(256)) * 40,
    "no newline": b'{"format": "snapfs-cbt"',
    "not json": b"hello world\n" + bytes(34),
    "bad utf-8": b"\xff\xfe\n" + bytes(34),
    "json null": b"null\n" + bytes(34),
    "json list": b"[1, 2, 3]\n" + bytes(34),
    "json string": b'"snapfs-cbt"\n' + bytes(34),
    "json number": b"42\n" + bytes(34),
    "deeply nested json": b"[" * 100_000 + b"\n",
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_state_file_is_ignored_with_a_warning(tmp_path, opened, caplog, name):
    src = opened()
    store, path = _save(tmp_path, src)
    with open(path, "wb") as f:
        f.write(GARBAGE[name])
    _expect_ignored(store, src, caplog)


def _mutations(header: dict, maps: bytes) -> dict[str, bytes]:
    def enc(h: dict, m: bytes = maps) -> bytes:
        return json.dumps(h).encode() + b"\n" + m

    out = {
        "truncated maps": enc(header, maps[:-1]),
        "maps cut in half": enc(header, maps[: len(maps) // 2]),
        "header only": enc(header, b""),
        "extra byte": enc(header, maps + b"\0"),
        "flipped map byte": enc(header, maps[:5] + bytes([maps[5] ^ 1]) + maps[6:]),
        "truncated header": enc(header)[:40],
    }
    for key, value in [
        ("format", "other"), ("version", 2), ("sha256", "0" * 64), ("sha256", None),
        ("block_size", 128 * KiB), ("block_size", "x"), ("block_count", 16),
        ("block_count", None), ("active", 0), ("active", 256), ("changes_number", 3),
        ("changes_number", -1), ("changes_number", "many"), ("source", None), ("source", 5),
        ("source", "path"), ("source", []),
    ]:
        out[f"{key}={value!r}"] = enc(header | {key: value})
    for key in ("format", "source", "block_size", "block_count", "generation_id",
                "changes_number", "active", "sha256"):
        out[f"without {key}"] = enc({k: v for k, v in header.items() if k != key})
    return out


def test_every_damaged_state_file_is_ignored_without_exception(tmp_path, opened, caplog):
    """Each damage in turn: load returns None, logs a warning, never raises."""
    src = opened()
    store, path, header, maps = _valid_header(tmp_path, src)
    failures = []
    for what, data in _mutations(header, maps).items():
        with open(path, "wb") as f:
            f.write(data)
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="snapfs.cbtstate"):
                result = store.load(src)
        except Exception as exc:   # the bug this test exists to catch
            failures.append(f"{what}: raised {type(exc).__name__}: {exc}")
            continue
        if result is not None:
            failures.append(f"{what}: was trusted")
        elif not any(r.levelno == logging.WARNING for r in caplog.records):
            failures.append(f"{what}: no warning")
    assert not failures, "\n".join(failures)


def test_unreadable_state_path_is_ignored(tmp_path, opened, caplog):
    src = opened()
    store, path = _save(tmp_path, src)
    os.unlink(path)
    os.mkdir(path)                   # a directory where the file should be
    _expect_ignored(store, src, caplog)


def test_consume_removes_loaded_files_only(tmp_path, source_file):
    other_file = tmp_path / "other.img"
    other_file.write_bytes(bytes(256 * KiB))
    a, b = Source.open(str(source_file)), Source.open(str(other_file))
    try:
        store = StateStore(str(tmp_path / "state"), Params())
        store.save(a, populated_cbt(a))
        store.save(b, populated_cbt(b))
        assert len([f.name for f in state_files(tmp_path / "state")]) == 2

        runner = StateStore(str(tmp_path / "state"), Params())
        assert runner.load(a) is not None
        assert len([f.name for f in state_files(tmp_path / "state")]) == 2, "loading alone keeps the file"
        runner.consume()
        assert [f.name for f in state_files(tmp_path / "state")] == [os.path.basename(store.path_for(b))]
        assert runner.load(a) is None, "after consume a crash leaves nothing to trust"
        runner.consume()
    finally:
        a.close()
        b.close()


def test_consume_removes_ignored_files_too(tmp_path, opened):
    src = opened()
    store, path = _save(tmp_path, src)
    with open(path, "wb") as f:
        f.write(b"garbage")
    assert store.load(src) is None
    store.consume()
    assert not os.path.exists(path)


def test_save_overwrites_atomically(tmp_path, opened):
    src = opened()
    store = StateStore(str(tmp_path / "state"), Params())
    c = populated_cbt(src)
    store.save(src, c)
    c.switch()
    store.save(src, c)
    assert len([f.name for f in state_files(tmp_path / "state")]) == 1
    loaded = store.load(opened())
    assert loaded is not None and loaded.changes_number == 3
    assert oct(os.stat(tmp_path / "state" / "cbt").st_mode & 0o777) == oct(0o700)


def test_state_file_key_is_per_real_path(tmp_path, source_file):
    link = tmp_path / "link.img"
    os.symlink(source_file, link)
    a = Source.open(str(source_file))
    store = StateStore(str(tmp_path / "state"), Params())
    try:
        store.save(a, populated_cbt(a))
    finally:
        a.close()                       # one user at a time (the source's lock)
    b = Source.open(str(link))
    try:
        assert store.path_for(a) == store.path_for(b)
        assert store.load(b) is not None
    finally:
        b.close()
