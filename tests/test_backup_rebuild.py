"""Incrementals that read only what CBT says changed (issue 21), through real snapfs
mounts: with chunks larger than the CBT block, a chunk that CBT marks in part is
rebuilt from the parent point's chunk in the repository plus the changed blocks read
from the snapshot image. Scattered unaligned rewrites across chunk borders, over
rounds (rebuilt chunks are the parents of the next rebuilds): every point restores
byte for byte, the image is read for exactly the changed CBT blocks, and a damaged
parent chunk means a whole read of that chunk, said, never a wrong point."""

import random
from pathlib import Path

from backup_helpers import backup, create, init, ok, pwrite, restore_sha, sha256_file
from helpers import KiB, MiB, bounded, requires_fuse

from snapfs.backup.chunks import digest_of
from snapfs.backup.repo import DIGEST_SIZE, Repo

pytestmark = requires_fuse

CHUNK = 1 * MiB                      # the repository's chunks: 16 CBT blocks
BLOCK = 64 * KiB                     # the CBT block of these small devices
SIZE = 12 * MiB + 68 * KiB + 512     # the last chunk is short, and so is the last CBT block


def make_mixed(path: Path, seed: int) -> None:
    """Random, then zeros (a hole: zero parent chunks), then random to the end."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(5 * MiB))
        f.seek(8 * MiB)
        f.write(rng.randbytes(SIZE - 8 * MiB))


def rewrite_across_borders(m, name: str, rng: random.Random, count: int) -> set[int]:
    """``count`` writes of 1 byte to 100 KiB at unaligned offsets, half of them
    straddling a chunk border; the CBT blocks they touch."""
    blocks: set[int] = set()
    for i in range(count):
        length = rng.randint(1, 100 * KiB)
        if i % 2:
            border = rng.randrange(1, SIZE // CHUNK + 1) * CHUNK
            offset = max(0, min(border - rng.randint(1, length), SIZE - length))
        else:
            offset = rng.randrange(0, SIZE - length)
        bounded(lambda o=offset, n=length: pwrite(m.dev(name), o, rng.randbytes(n)), 30, m.abort_connection)
        blocks.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
    return blocks


def block_bytes(blocks: set[int]) -> int:
    return sum(min(BLOCK, SIZE - b * BLOCK) for b in blocks)


def test_rebuilt_chunks_restore_exactly_and_read_only_changed_blocks(mounter, tmp_path, storage_dir):
    make_mixed(tmp_path / "d0.img", seed=21)
    m = mounter({"d0": str(tmp_path / "d0.img")})
    repo = init(tmp_path / "repo", chunk=CHUNK)
    first = create(m, repo, "d0", storage=storage_dir)
    assert first["devices"]["d0"]["bytes_read"] == SIZE and first["devices"]["d0"]["repo_bytes_read"] == 0
    expected = {first["point"]: sha256_file(m.dev("d0"), m.path)}
    rng = random.Random(7)
    for rnd in range(1, 4):
        blocks = rewrite_across_borders(m, "d0", rng, count=4 * rnd)
        want = sha256_file(m.dev("d0"), m.path)         # the device is quiet: this is the image
        dev = create(m, repo, "d0", storage=storage_dir)["devices"]["d0"]
        chunks = {b * BLOCK // CHUNK for b in blocks}
        assert dev["mode"] == "incremental" and dev["chunks_read"] == len(chunks), (rnd, dev)
        assert dev["bytes_read"] == block_bytes(blocks), "the image is read for the changed blocks only"
        assert dev["chunks_rebuilt"] >= 1 and dev["repo_bytes_read"] > 0, dev
        assert dev["parents_unreadable"] == 0
        assert set(dev["seconds"]) == {"image", "repository", "hash", "store"}
        assert dev["seconds"]["repository"] > 0 and dev["seconds"]["image"] > 0
        expected[ok("list", repo)[-1]["point"]] = want
    listing = ok("list", repo)
    assert [p["point"] for p in listing] == list(expected)
    assert listing[-1]["devices"]["d0"]["repo_bytes_read"] == listing[-1]["stats"]["repo_bytes_read"] > 0
    info = backup("info", repo, "latest").stdout
    assert "REPO READ" in info and "worker seconds: image" in info, info
    for point, want in expected.items():
        assert restore_sha(repo, point, "d0", tmp_path / "r.img") == want, point
    assert ok("verify", repo)["ok"]


def test_a_damaged_parent_chunk_is_read_whole_from_the_device(mounter, tmp_path, storage_dir):
    make_mixed(tmp_path / "d0.img", seed=22)
    m = mounter({"d0": str(tmp_path / "d0.img")})
    repo = init(tmp_path / "repo", chunk=CHUNK)
    first = create(m, repo, "d0", storage=storage_dir)["point"]
    r = Repo(repo)
    parent = r.read_index(r.manifest(first), "d0", digest_of)[DIGEST_SIZE:2 * DIGEST_SIZE]
    chunk = Path(r.chunk_path(parent))               # chunk 1 of the first point: one byte flipped
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 1
    chunk.write_bytes(raw)
    pwrite(m.dev("d0"), CHUNK + 1000, b"changed")
    want = sha256_file(m.dev("d0"), m.path)
    done = backup("create", repo, "d0", "-m", m.path, "--storage", storage_dir, "--json", mount=m)
    assert done.returncode == 0, done.stderr
    assert "did not pass their checks" in done.stderr
    dev = ok("info", repo, "latest")["devices"]["d0"]
    assert dev["parents_unreadable"] == 1 and dev["chunks_rebuilt"] == 0 and dev["bytes_read"] == CHUNK
    assert restore_sha(repo, "latest", "d0", tmp_path / "r.img") == want
    assert backup("verify", repo, first).returncode == 3, "the parent stays damaged, and verify says so"


def test_points_made_before_rebuilt_chunks_still_read(mounter, tmp_path, storage_dir):
    """A manifest without the fields issue 21 added (as older snapfs wrote them) lists,
    shows, restores, and is the parent of a rebuilding incremental."""
    import json
    make_mixed(tmp_path / "d0.img", seed=23)
    m = mounter({"d0": str(tmp_path / "d0.img")})
    repo = init(tmp_path / "repo", chunk=CHUNK)
    first = create(m, repo, "d0", storage=storage_dir)
    want = sha256_file(m.dev("d0"), m.path)
    path = Path(repo, "points", f"{first['point']}.json")
    old = json.loads(path.read_text())
    for key in ("repo_bytes_read", "chunks_rebuilt", "parents_unreadable", "seconds"):
        old["devices"]["d0"].pop(key)
    old["stats"].pop("repo_bytes_read")
    path.write_text(json.dumps(old))
    assert ok("list", repo)[0]["devices"]["d0"]["repo_bytes_read"] == 0
    for args in (("list", repo), ("info", repo, first["point"])):
        done = backup(*args)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    pwrite(m.dev("d0"), CHUNK + 5000, b"after the old point")
    dev = create(m, repo, "d0", storage=storage_dir)["devices"]["d0"]
    assert dev["mode"] == "incremental" and dev["chunks_rebuilt"] == 1 and dev["bytes_read"] == BLOCK
    assert restore_sha(repo, first["point"], "d0", tmp_path / "r.img") == want
