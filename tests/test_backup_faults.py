"""``snapfs backup`` when things go wrong (issue 13): a create killed with SIGKILL
leaves no point and nothing verify objects to, and the next create works; a flipped
byte in a chunk is named by verify and stops a restore with a clear error while other
points still restore; prune + gc keep what they must and free exactly what only the
pruned points used; two writers on one repository are refused."""

import contextlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
from backup_helpers import (
    CHUNK,
    backup,
    create,
    init,
    ok,
    restore_sha,
    scattered_writes,
    sha256_file,
)
from helpers import MiB, make_device, requires_fuse, snapfs_cli

from snapfs.backup.chunks import digest_of
from snapfs.backup.repo import DIGEST_SIZE, Repo

pytestmark = requires_fuse


def chunk_files(repo: str) -> list[str]:
    root = os.path.join(repo, "chunks")
    return [os.path.join(root, d, f) for d in os.listdir(root) for f in os.listdir(os.path.join(root, d))]


def index_digests(repo: str, point: str, name: str) -> set[bytes]:
    r = Repo(repo)
    digests = r.read_index(r.manifest(point), name, digest_of)
    return {digests[i:i + DIGEST_SIZE] for i in range(0, len(digests), DIGEST_SIZE)}


def start_create(m, repo: str, storage_dir: str, *extra: str) -> subprocess.Popen:
    """``backup create`` of d0 with one worker, running in the background."""
    return subprocess.Popen([*snapfs_cli(), "backup", "create", repo, "d0", "-m", m.path, "--storage",
                             storage_dir, "--workers", "1", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def killed_at_end(proc: subprocess.Popen):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_chunks(proc: subprocess.Popen, repo: str, count: int) -> None:
    """Until the running create has stored ``count`` chunks."""
    deadline = time.monotonic() + 60
    while len(chunk_files(repo)) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "create wrote no chunks within 60 s"
        time.sleep(0.002)


def test_sigkill_of_create_leaves_no_point_and_the_next_create_works(mounter, tmp_path, storage_dir):
    source = tmp_path / "big.img"
    make_device(source, 64 * MiB, seed=21)
    m = mounter({"d0": str(source)})
    repo = init(tmp_path / "repo")
    proc = start_create(m, repo, storage_dir)
    try:
        wait_for_chunks(proc, repo, 20)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert len(chunk_files(repo)) < 64 * MiB // CHUNK, "create finished before it was killed"
    assert ok("list", repo) == []
    assert os.listdir(os.path.join(repo, "points")) == []
    assert ok("verify", repo)["ok"]
    leftover = m.ok("snapshot_collect")["ids"]
    assert len(leftover) == 1, "the killed create's snapshot is still there"

    want = sha256_file(m.dev("d0"), m.path)
    done = backup("create", repo, "d0", "-m", m.path, "--storage", storage_dir, mount=m)
    assert done.returncode == 0, done.stderr
    assert f"destroyed snapshot {leftover[0]} left by an interrupted backup" in done.stdout
    assert m.ok("snapshot_collect")["ids"] == []
    [point] = ok("list", repo)
    assert restore_sha(repo, point["point"], "d0", tmp_path / "r.img") == want
    gc = ok("gc", repo)
    assert gc["chunks_removed"] == 0, "chunks of the killed run are reused, not orphaned"
    assert ok("verify", repo)["ok"]


def test_flipped_byte_is_named_by_verify_and_stops_restore(mounter, tmp_path, storage_dir):
    source = tmp_path / "d0.img"
    make_device(source, 16 * MiB, seed=22)
    m = mounter({"d0": str(source)})
    repo = init(tmp_path / "repo")
    p1 = create(m, repo, "d0", storage=storage_dir)["point"]
    want1 = sha256_file(str(tmp_path / "d0.img"))
    scattered_writes(m, "d0", seed=6, count=2, size=16 * MiB)
    p2 = create(m, repo, "d0", storage=storage_dir)["point"]
    only_p2 = sorted(index_digests(repo, p2, "d0") - index_digests(repo, p1, "d0"))
    victim = Repo(repo).chunk_path(only_p2[0])
    with open(victim, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))

    done = backup("verify", repo, "--json")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert not report["ok"] and report["broken"] == [{"point": p2, "device": "d0"}]
    [damaged] = report["damaged"]
    assert damaged["chunk"] == only_p2[0].hex() and "CRC" in damaged["error"]
    offsets = damaged["used_by"][0]["offsets"]
    text = backup("verify", repo)
    assert text.returncode == 3 and f"point {p2} device d0" in text.stdout and "BROKEN" in text.stdout
    assert ok("verify", repo, p1)["ok"], "the damage does not touch point 1"

    failed = backup("restore", repo, p2, "d0", str(tmp_path / "r2.img"))
    assert failed.returncode == 3
    assert f"point {p2}, device d0, offset {offsets[0]}" in failed.stderr, failed.stderr
    assert "removed the incomplete" in failed.stderr and not (tmp_path / "r2.img").exists()
    assert restore_sha(repo, p1, "d0", tmp_path / "r1.img") == want1


def test_prune_and_gc_free_exactly_the_pruned_points_chunks(mounter, tmp_path, storage_dir):
    source = tmp_path / "d0.img"
    make_device(source, 16 * MiB, seed=23)
    m = mounter({"d0": str(source)})
    repo = init(tmp_path / "repo")
    points, shas = [], {}
    for rnd in range(4):
        if rnd:
            scattered_writes(m, "d0", seed=40 + rnd, count=4, size=16 * MiB)
        shas_now = sha256_file(m.dev("d0"), m.path)
        point = create(m, repo, "d0", storage=storage_dir)["point"]
        points.append(point)
        shas[point] = shas_now
    kept, pruned = points[2:], points[:2]
    unique = set().union(*(index_digests(repo, p, "d0") for p in pruned))
    unique -= set().union(*(index_digests(repo, p, "d0") for p in kept))
    unique_bytes = sum(os.path.getsize(Repo(repo).chunk_path(d)) for d in unique if any(d))
    before = sum(os.path.getsize(f) for f in chunk_files(repo))

    dry = ok("prune", repo, "--keep-last", "2", "--dry-run")
    assert dry["removed"] == pruned and len(ok("list", repo)) == 4
    result = ok("prune", repo, "--keep-last", "2")
    assert result["removed"] == pruned and sorted(result["kept"]) == kept
    assert result["gc"]["bytes_freed"] == unique_bytes > 0
    after = sum(os.path.getsize(f) for f in chunk_files(repo))
    assert after == before - unique_bytes
    assert [p["point"] for p in ok("list", repo)] == kept
    assert sorted(os.listdir(os.path.join(repo, "indexes"))) == kept
    for point in kept:
        assert restore_sha(repo, point, "d0", tmp_path / "r.img") == shas[point]
    assert ok("verify", repo)["ok"]
    refused = backup("prune", repo)
    assert refused.returncode == 1 and "keep" in refused.stderr


def test_one_writer_at_a_time(tmp_path):
    repo = init(tmp_path / "repo")
    with Repo(repo).lock():
        done = backup("gc", repo)
        assert done.returncode == 1 and "in use by a create, prune or gc" in done.stderr
    assert ok("gc", repo)["chunks_removed"] == 0
    with Repo(repo).lock("readers.lock", shared=True):
        done = backup("gc", repo)
        assert done.returncode == 1 and "restore or verify" in done.stderr


@pytest.mark.parametrize("garbage", ["missing", "flipped"])
def test_damaged_index_breaks_its_point_only(mounter, tmp_path, storage_dir, garbage):
    source = tmp_path / "d0.img"
    make_device(source, 4 * MiB, seed=24)
    m = mounter({"d0": str(source)})
    repo = init(tmp_path / "repo")
    p1 = create(m, repo, "d0", storage=storage_dir)["point"]
    p2 = create(m, repo, "d0", storage=storage_dir)["point"]
    index = os.path.join(repo, Repo(repo).manifest(p2)["devices"]["d0"]["index"])
    if garbage == "missing":
        os.unlink(index)
    else:
        with open(index, "r+b") as f:
            f.seek(100)
            f.write(b"\xff")
    report = json.loads(backup("verify", repo, "--json").stdout)
    assert report["broken"] == [{"point": p2, "device": "d0"}]
    failed = backup("restore", repo, p2, "d0", str(tmp_path / "r.img"))
    assert failed.returncode == 3 and f"point {p2}, device d0" in failed.stderr
    gc = backup("gc", repo)
    assert gc.returncode == 3 and "nothing deleted" in gc.stderr
    assert restore_sha(repo, p1, "d0", tmp_path / "r1.img") == sha256_file(str(source))


def test_sigterm_of_create_destroys_the_snapshot_and_leaves_no_point(mounter, tmp_path, storage_dir):
    source = tmp_path / "big.img"
    make_device(source, 64 * MiB, seed=25)
    m = mounter({"d0": str(source)})
    repo = init(tmp_path / "repo")
    with killed_at_end(start_create(m, repo, storage_dir)) as proc:
        wait_for_chunks(proc, repo, 20)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert m.ok("snapshot_collect")["ids"] == [], "the snapshot must be destroyed"
    assert chunk_files(repo) == [] and "removed the" in err, err     # the run's chunks are gone
    assert ok("list", repo) == [] and not os.path.exists(os.path.join(repo, "lease.json"))
    assert ok("verify", repo)["ok"]


def test_full_repository_disk_fails_cleanly(mounter, tmp_path, storage_dir):
    source = tmp_path / "d0.img"
    make_device(source, 16 * MiB, seed=26)
    m = mounter({"d0": str(source)})
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(small)], check=True)
    try:
        repo = init(small / "repo")
        done = backup("create", repo, "d0", "-m", m.path, "--storage", storage_dir, mount=m)
        assert done.returncode == 1, done.stderr
        assert "No space left on device" in done.stderr and "Traceback" not in done.stderr
        assert f"in repository {repo}" in done.stderr and f"mounted at {small}" in done.stderr
        assert m.ok("snapshot_collect")["ids"] == []
        assert ok("list", repo) == []
        assert chunk_files(repo) == [], "the failed run removed the chunks it stored"
        assert ok("verify", repo)["ok"]
        assert ok("gc", repo)["chunks_removed"] == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_snapfs_daemon_killed_during_create(mounter, tmp_path, storage_dir):
    """The mount dies under a running create: one clear error (exit 1), no point, a
    verify that passes, and a create on the next mount works."""
    source = tmp_path / "big.img"
    make_device(source, 64 * MiB, seed=27)
    state = tmp_path / "state"
    m1 = mounter({"d0": str(source)}, state_dir=state)
    repo = init(tmp_path / "repo")
    with killed_at_end(start_create(m1, repo, storage_dir)) as proc:
        wait_for_chunks(proc, repo, 20)
        m1.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    # ECONNABORTED: an O_DIRECT read in flight when the connection died
    assert "Traceback" not in err and re.search(r"snapfs: (ENOTCONN|ECONNABORTED): reading ", err), err
    assert "could not destroy snapshot" in err, "the snapshot's fate is reported"
    assert ok("list", repo) == [] and ok("verify", repo)["ok"]

    m2 = mounter({"d0": str(source)}, state_dir=state)
    point = create(m2, repo, "d0", storage=storage_dir)
    assert point["devices"]["d0"]["mode"] == "full"
    assert restore_sha(repo, point["point"], "d0", tmp_path / "r.img") == sha256_file(str(source))


def test_an_overflowing_snapshot_storage_is_named(mounter, tmp_path, storage_dir):
    """The workload overwrites the whole device while a create reads it, with a storage
    limit of 8M: the storage overflows, the image becomes unusable, and the create
    fails saying that the snapshot's difference storage ran out of room (not just
    EIO), leaving no point and none of its chunks."""
    source = tmp_path / "big.img"
    make_device(source, 64 * MiB, seed=27)
    m = mounter({"d0": str(source)})
    repo = init(tmp_path / "repo")
    with killed_at_end(start_create(m, repo, storage_dir, "--storage-limit", "8M")) as proc:
        wait_for_chunks(proc, repo, 1)
        fd = os.open(m.dev("d0"), os.O_WRONLY)
        try:
            for offset in range(0, 64 * MiB, MiB):             # the original never fails
                assert os.pwrite(fd, os.urandom(MiB), offset) == MiB
        finally:
            os.close(fd)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "difference storage" in err and "ran out of room" in err and "--storage-limit" in err, err
    assert ok("list", repo) == [] and chunk_files(repo) == []
