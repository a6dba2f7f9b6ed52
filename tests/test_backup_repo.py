"""The backup repository format and the pure parts of the backup tool, without a
mount: chunk and index files round-trip and reject damage, zero chunks are never
stored, the CBT-to-chunk mapping, the planner's reasons, and prune's keep rules."""

import os
import time
from pathlib import Path

import pytest

from snapfs.backup.chunks import ChunkStore, digest_of
from snapfs.backup.create import changed_pieces, plan
from snapfs.backup.prune import select
from snapfs.backup.repo import ZERO, Damaged, Repo, decode_index, encode_index
from snapfs.errors import SnapfsError


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo.init(str(tmp_path / "repo"), chunk_size=64 << 10)


def test_init_refuses_bad_chunk_sizes_and_non_empty_dirs(tmp_path):
    for bad in (3 << 20, 32 << 10, 128 << 20):
        with pytest.raises(SnapfsError, match="power of two"):
            Repo.init(str(tmp_path / f"r{bad}"), chunk_size=bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SnapfsError, match="not empty"):
        Repo.init(str(tmp_path / "full"))
    with pytest.raises(SnapfsError, match="not a backup repository"):
        Repo(str(tmp_path / "full"))


def test_unknown_version_and_encryption_are_refused(repo):
    import json
    config = json.loads(Path(repo.p("config")).read_text())
    for change in ({"version": 2}, {"encryption": {"kdf": "argon2id"}}):
        with open(repo.p("config"), "w") as f:
            f.write(json.dumps(config | change))
        with pytest.raises(SnapfsError):
            Repo(repo.path)


def test_chunks_round_trip_and_damage_is_caught(repo):
    store = ChunkStore(repo)
    data = os.urandom(1000) * 60                       # compressible
    digest = digest_of(data)
    assert store.put(digest, data) > 0
    assert store.put(digest, data) == 0, "stored once"
    assert ChunkStore(repo).put(digest, data) == 0, "the repository has it"
    assert os.path.getsize(repo.chunk_path(digest)) < len(data)
    assert store.get(digest, len(data)) == data
    with pytest.raises(Damaged, match="expected"):
        store.get(digest, len(data) + 1)
    chunk = Path(repo.chunk_path(digest))
    raw = bytearray(chunk.read_bytes())
    raw[-3] ^= 0x40
    chunk.write_bytes(raw)
    with pytest.raises(Damaged, match="CRC"):
        store.get(digest)
    with pytest.raises(Damaged, match="missing"):
        store.get(digest_of(b"never stored"))
    assert store.get(ZERO, 10) == bytes(10)


@pytest.mark.parametrize("direct", [True, False])
def test_chunk_files_are_exact_with_and_without_o_direct(repo, direct):
    """Chunk files written with O_DIRECT (padded, then cut) or buffered (the fallback
    where the filesystem refuses O_DIRECT) hold exactly header + payload; the
    compressibility sample keeps random data raw and compresses the rest."""
    repo.direct_writes = direct
    store = ChunkStore(repo)
    for data in (os.urandom(65536), os.urandom(4000) * 16, bytes(60000) + b"x"):
        digest = digest_of(data)
        stored = store.put(digest, data)
        assert os.path.getsize(repo.chunk_path(digest)) == stored
        assert ChunkStore(repo).get(digest, len(data)) == data
        assert (stored == len(data) + 16) == (data[:4000] != data[4000:8000]), "random stays raw"
    assert not os.listdir(repo.p("tmp"))


def test_deferred_commits_are_whole_after_sync_and_their_errors_surface(repo):
    """create's store: chunk files are renamed into place by the committer thread; sync
    waits for them, and a commit that failed fails the sync (no manifest over it)."""
    store = ChunkStore(repo, deferred=True)
    chunks = [os.urandom(65536) for _ in range(40)]
    try:
        for data in chunks:
            store.put(digest_of(data), data)
        store.sync()
    finally:
        store.close()
    assert all(ChunkStore(repo).get(digest_of(d)) == d for d in chunks)
    assert not os.listdir(repo.p("tmp"))

    def broken(fd, tmp, final):
        os.close(fd)
        raise OSError(5, "Input/output error")
    repo.commit_chunk = broken
    store = ChunkStore(repo, deferred=True)
    try:
        store.put(digest_of(b"x" * 100), b"x" * 100)
        with pytest.raises(OSError, match="Input/output"):
            store.sync()
    finally:
        store.close()


def test_index_round_trip_and_damage(repo):
    digests = os.urandom(32) * 3 + ZERO
    raw = encode_index(3 * 65536 + 1, 65536, digests, digest_of)
    assert decode_index(raw, digest_of) == (3 * 65536 + 1, 65536, digests)
    for cut in (raw[:-1], raw[:10], raw[:70] + b"x" + raw[71:]):
        with pytest.raises(Damaged):
            decode_index(cut, digest_of)
    with pytest.raises(ValueError):
        encode_index(5 * 65536, 65536, digests, digest_of)


def test_changed_pieces_are_cbt_blocks_cut_at_chunk_borders():
    cbt = bytes([0, 3, 0, 0, 2, 5, 0, 1])         # blocks of 64K, device 8 blocks - 1000 bytes
    size, k = 8 * 65536 - 1000, 65536
    assert sorted(changed_pieces(cbt, 2, k, size, k)) == [1, 5]
    assert sorted(changed_pieces(cbt, 1, k, size, k)) == [1, 4, 5]
    assert changed_pieces(cbt, 1, k, size, 4 * k) == {0: [(k, k)], 1: [(0, 2 * k)]}
    assert changed_pieces(cbt, 0, k, size, 4 * k)[1] == [(0, 2 * k), (3 * k, k - 1000)], "cut at the end"
    assert changed_pieces(cbt, 2, 3 * k, size, 2 * k) == {1: [(k, k)], 2: [(0, 2 * k)]}, "unaligned"
    assert sorted(changed_pieces(cbt, 0, 2 * k, 16 * k, k)) == [2, 3, 8, 9, 10, 11, 14, 15]
    assert changed_pieces(cbt, 5, k, size, k) == {}


def test_plan_says_why_it_reads_everything():
    info = {"device_capacity": 1 << 20, "generation_id": "g1", "changes_number": 4, "block_size": 65536}
    parent = {"point": "P", "devices": {"d": {"size": 1 << 20, "cbt": {"generation_id": "g1",
                                                                        "changes_number": 2}}}}
    cbt = bytes([3] + [0] * 15)
    assert plan(None, "d", info, cbt, 65536, False)[0].startswith("first backup")
    assert "requested" in plan(parent, "d", info, cbt, 65536, True)[0]
    assert "generation changed" in plan(parent, "d", info | {"generation_id": "g2"}, cbt, 65536, False)[0]
    assert "size changed" in plan(parent, "d", info | {"device_capacity": 2 << 20}, cbt, 65536, False)[0]
    assert "did not advance" in plan(parent, "d", info | {"changes_number": 2}, cbt, 65536, False)[0]
    assert plan(parent, "d", info, cbt, 65536, False) == (None, {0: [(0, 65536)]})


def _at(text: str) -> dict:
    return {"point": text.replace(" ", "T"), "unix_time": time.mktime(time.strptime(text, "%Y-%m-%d %H:%M"))}


def test_keep_rules():
    points = [_at(t) for t in ("2026-01-01 10:00", "2026-01-01 12:00", "2026-01-02 09:00",
                               "2026-01-09 09:00", "2026-02-01 08:00", "2026-02-01 09:00")]
    ids = [p["point"] for p in points]
    assert sorted(select(points, {"last": 2})) == ids[4:]
    assert set(select(points, {"daily": 3})) == {ids[5], ids[3], ids[2]}
    assert set(select(points, {"monthly": 2})) == {ids[5], ids[3]}
    assert set(select(points, {"weekly": 10})) == {ids[5], ids[3], ids[2]}
    both = select(points, {"last": 1, "monthly": 1})
    assert both == {ids[5]: ["last", "monthly"]}
    assert select(points, {}) == {}


def test_restore_leaves_zero_pieces_of_a_chunk_as_holes(tmp_path):
    """A point written through the format API (one 256 KiB chunk: 64 KiB of data, then
    zeros; then an all-zero chunk): the restored file is exact and holds one piece."""
    from snapfs.backup.output import Output
    from snapfs.backup.restore import restore

    repo = Repo.init(str(tmp_path / "repo"), chunk_size=256 << 10)
    data = os.urandom(64 << 10) + bytes(192 << 10)
    digest = digest_of(data)
    ChunkStore(repo).put(digest, data)
    size = 2 * len(data)
    index_digest = repo.write_index("20260101T000000Z", "d", size, digest + ZERO, digest_of)
    repo.write_manifest({"point": "20260101T000000Z", "unix_time": 0.0, "chunk_size": repo.chunk_size,
                         "devices": {"d": {"size": size, "index": repo.index_rel("20260101T000000Z", "d"),
                                           "index_digest": index_digest}}})
    target = tmp_path / "out.img"
    result = restore(repo, "latest", "d", str(target), Output(json_mode=True))
    assert target.read_bytes() == data + bytes(len(data))
    assert result["bytes_written"] == 64 << 10
    assert os.stat(target).st_blocks * 512 <= 128 << 10
