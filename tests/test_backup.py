"""``snapfs backup`` end to end, through real snapfs mounts and real data (issue 13):
full then CBT-incremental points of two devices, each restoring byte-identical to the
image of its time (also through the read-only backup mount), with only the changed
chunks read; a new CBT generation after a daemon crash; a CBT audit that catches a
write behind snapfs's back; restore to a block device and with --delta."""

import json
import os
import random
import subprocess

from backup_helpers import (
    CHUNK,
    BackupMount,
    backup,
    create,
    init,
    ok,
    pwrite,
    restore_sha,
    scattered_writes,
    sha256_file,
)
from helpers import MiB, abort_fuse, bounded, make_device, requires_fuse, run

pytestmark = requires_fuse

SIZE = 16 * MiB


def two_devices(tmp_path) -> dict[str, str]:
    """d0: random; d1: mostly zeros with a random middle (zero chunks are not stored)."""
    d0, d1 = tmp_path / "d0.img", tmp_path / "d1.img"
    make_device(d0, SIZE, seed=3)
    with open(d1, "wb") as f:
        f.truncate(SIZE)
        f.seek(4 * MiB)
        f.write(random.Random(4).randbytes(2 * MiB))
    return {"d0": str(d0), "d1": str(d1)}


def device_shas(m, names) -> dict[str, str]:
    return {n: sha256_file(m.dev(n), m.path) for n in names}


def test_rounds_of_incrementals_restore_exactly_and_read_only_changes(mounter, tmp_path, storage_dir):
    m = mounter(two_devices(tmp_path))
    repo = init(tmp_path / "repo")
    expected: dict[str, dict[str, str]] = {}

    first = create(m, repo, "d0", "d1", storage=storage_dir)
    assert {d["mode"] for d in first["devices"].values()} == {"full"}
    assert "first backup" in first["devices"]["d0"]["reason"]
    assert first["devices"]["d0"]["bytes_read"] == SIZE
    assert first["devices"]["d1"]["zero_chunks"] == (SIZE - 2 * MiB) // CHUNK
    assert first["devices"]["d1"]["chunks_new"] == 2 * MiB // CHUNK
    expected[first["point"]] = device_shas(m, ["d0", "d1"])

    for rnd in range(1, 4):
        touched = {n: scattered_writes(m, n, seed=10 * rnd + i, count=rnd * 3, size=SIZE)
                   for i, n in enumerate(["d0", "d1"])}
        shas = device_shas(m, ["d0", "d1"])          # the devices are quiet: this is the image
        point = create(m, repo, "d0", "d1", storage=storage_dir)
        for name in ("d0", "d1"):
            dev = point["devices"][name]
            assert dev["mode"] == "incremental" and dev["reason"] is None, dev
            assert dev["chunks_read"] == len(touched[name]), (rnd, name, dev)
            assert dev["bytes_read"] == len(touched[name]) * CHUNK
        assert point["stats"]["bytes_read"] == sum(len(t) for t in touched.values()) * CHUNK
        expected[point["point"]] = shas

    listing = ok("list", repo)
    assert [p["point"] for p in listing] == list(expected)
    for point, shas in expected.items():
        for name, digest in shas.items():
            assert restore_sha(repo, point, name, tmp_path / "r.img") == digest, (point, name)
    restored = os.stat(tmp_path / "r.img")
    assert restored.st_blocks * 512 < SIZE // 2, "zero chunks must be holes in a restored file"

    with BackupMount(repo, tmp_path / "bmnt") as bm:
        assert sorted(os.listdir(bm.path)) == sorted(expected)
        for point, shas in expected.items():
            assert sorted(os.listdir(bm.p(point))) == ["d0", "d1"]
            for name, digest in shas.items():
                assert sha256_file(bm.p(point, name), bm.path) == digest, (point, name)
    assert ok("verify", repo)["ok"]


def test_delta_restore_and_block_device_target(mounter, tmp_path, storage_dir):
    m = mounter(two_devices(tmp_path))
    repo = init(tmp_path / "repo")
    p1 = create(m, repo, "d0", storage=storage_dir)["point"]
    touched = scattered_writes(m, "d0", seed=5, count=4, size=SIZE)
    want = sha256_file(m.dev("d0"), m.path)
    p2 = create(m, repo, "d0", storage=storage_dir)["point"]

    target = tmp_path / "t.img"
    ok("restore", repo, p1, "d0", str(target))
    refused = backup("restore", repo, p2, "d0", str(target))
    assert refused.returncode == 1 and "exists" in refused.stderr
    result = ok("restore", repo, p2, "d0", str(target), "--delta")
    assert result["bytes_written"] == len(touched) * CHUNK
    assert sha256_file(str(target)) == want

    daemon_mnt = tmp_path / "dmnt"
    daemon_mnt.mkdir()
    ok("mount", repo, str(daemon_mnt), "--daemon", "--log-file", str(tmp_path / "bm.log"))
    try:
        assert sha256_file(str(daemon_mnt / p2 / "d0"), str(daemon_mnt)) == want
    finally:
        subprocess.run(["fusermount3", "-u", str(daemon_mnt)], check=False)

    backing = tmp_path / "bdev.img"
    make_device(backing, SIZE + MiB, seed=99)
    loop = run("losetup", "--find", "--show", str(backing))
    try:
        ok("restore", repo, p2, "d0", loop)
        with open(loop, "rb") as f:
            data = f.read(SIZE)
        import hashlib
        assert hashlib.sha256(data).hexdigest() == want
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_daemon_crash_means_full_read_and_still_exact(mounter, tmp_path, storage_dir):
    sources = two_devices(tmp_path)
    state = tmp_path / "state"
    m1 = mounter(sources, state_dir=state)
    repo = init(tmp_path / "repo")
    create(m1, repo, "d0", storage=storage_dir)
    scattered_writes(m1, "d0", seed=1, count=2, size=SIZE)
    assert create(m1, repo, "d0", storage=storage_dir)["devices"]["d0"]["mode"] == "incremental"
    scattered_writes(m1, "d0", seed=2, count=3, size=SIZE)
    m1.kill()                                          # SIGKILL: the CBT is not saved

    m2 = mounter(sources, state_dir=state)
    scattered_writes(m2, "d0", seed=3, count=3, size=SIZE)
    want = sha256_file(m2.dev("d0"), m2.path)
    point = create(m2, repo, "d0", storage=storage_dir)
    dev = point["devices"]["d0"]
    assert dev["mode"] == "full" and "CBT generation changed" in dev["reason"], dev
    assert dev["bytes_read"] == SIZE and dev["chunks_new"] > 0
    assert restore_sha(repo, point["point"], "d0", tmp_path / "r.img") == want
    # and the next one is incremental again, in the new generation
    scattered_writes(m2, "d0", seed=4, count=1, size=SIZE)
    assert create(m2, repo, "d0", storage=storage_dir)["devices"]["d0"]["mode"] == "incremental"

    # the tables say the same (text output, POINT as a prefix and as 'latest')
    listing = backup("list", repo).stdout.splitlines()
    assert listing[0].split()[:3] == ["POINT", "TIME", "DEVICES"] and len(listing) == 5
    assert [line.split()[-2] for line in listing[1:]] == ["full", "incremental", "full", "incremental"]
    info = backup("info", repo, point["point"])
    assert info.returncode == 0 and "WHY FULL" in info.stdout and "CBT generation changed" in info.stdout
    assert "incremental" in backup("info", repo, "latest").stdout
    assert backup("info", repo, "2099").returncode == 1
    ambiguous = backup("info", repo, "2")
    assert ambiguous.returncode == 1 and "names 4 points" in ambiguous.stderr


def test_cbt_audit_catches_a_write_behind_snapfs(mounter, tmp_path, storage_dir):
    sources = two_devices(tmp_path)
    m = mounter(sources)
    repo = init(tmp_path / "repo")
    create(m, repo, "d0", "d1", storage=storage_dir)
    scattered_writes(m, "d1", seed=8, count=2, size=SIZE)
    lie_at = 9 * MiB + 12345
    pwrite(sources["d0"], lie_at, b"written behind snapfs's back")   # the CBT cannot see this
    want = {n: sha256_file(m.dev(n), m.path) for n in ("d0", "d1")}

    done = backup("create", repo, "d0", "d1", "-m", m.path, "--storage", storage_dir,
                  "--cbt-audit", "100000", "--json", mount=m)
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert "CBT AUDIT FAILED: d0" in done.stderr
    manifest = json.loads(done.stdout)
    d0, d1 = manifest["devices"]["d0"], manifest["devices"]["d1"]
    assert d0["audit"]["mismatches"] == [lie_at // CHUNK * CHUNK]
    assert d0["mode"] == "full" and "CBT audit" in d0["reason"] and d0["chunks_read"] == SIZE // CHUNK
    assert d1["mode"] == "incremental" and d1["audit"]["mismatches"] == []
    for name, digest in want.items():
        assert restore_sha(repo, manifest["point"], name, tmp_path / "r.img") == digest


def _umount_all(mounted: list[str], loops: list[str]) -> None:
    for path in reversed(mounted):
        if subprocess.run(["umount", path], check=False).returncode:
            subprocess.run(["umount", "-l", path], check=False)
    for loop in loops:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_live_ext4_backup_restores_clean_and_mounts_from_the_repository(mounter, tmp_path, storage_dir):
    """ext4 on a loop device over a device file, a writer running during the backup:
    the restored image passes e2fsck -fn and holds the files of backup time; an older
    point, loop-mounted read-only straight from the backup mount, holds its files."""
    from test_stacked import FileWriter, md5, write_files

    src = tmp_path / "fs.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    m = mounter({"fs": str(src)})
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", m.dev("fs"))
    repo = init(tmp_path / "repo")
    fsmnt, check, older = tmp_path / "fsmnt", tmp_path / "check", tmp_path / "older"
    for d in (fsmnt, check, older):
        d.mkdir()
    mounted, loops = [], [run("losetup", "--find", "--show", m.dev("fs"))]
    writer = FileWriter(str(fsmnt))
    try:
        run("mount", loops[0], str(fsmnt))
        mounted.append(str(fsmnt))
        before = write_files(str(fsmnt), "before", 12, seed=1)
        writer.start()
        p1 = create(m, repo, "fs", storage=storage_dir)
        assert p1["consistency"] == "frozen" and p1["frozen"] == [str(fsmnt)], p1
        after = write_files(str(fsmnt), "after", 5, seed=2)
        writer.stop()
        p2 = create(m, repo, "fs", storage=storage_dir)
        assert p2["devices"]["fs"]["mode"] == "incremental"
        assert p2["devices"]["fs"]["bytes_read"] < 64 * MiB

        image = tmp_path / "restored.img"
        ok("restore", repo, p1["point"], "fs", str(image))
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        run("mount", "-o", "loop,ro", str(image), str(check))
        mounted.append(str(check))
        for name, digest in before.items():
            assert md5(check / name) == digest, name
        assert not set(os.listdir(check)) & set(after), "files written after the backup are in it"

        with BackupMount(repo, tmp_path / "bmnt") as bm:
            loops.append(run("losetup", "-r", "--find", "--show", bm.p(p2["point"], "fs")))
            run("mount", "-o", "ro", loops[-1], str(older))
            mounted.append(str(older))
            for name, digest in {**before, **after}.items():
                assert bounded(lambda n=name: md5(older / n), 60, lambda: abort_fuse(bm.path)) == digest
            _umount_all([mounted.pop()], [loops.pop()])
    finally:
        writer.stopping.set()
        writer.join(60)
        _umount_all(mounted, loops)


def test_create_reads_at_the_rate_limit_and_at_idle_priority(mounter, tmp_path, storage_dir):
    """``--rate-limit 16`` on a 16 MiB device: the image is read in no less than about
    a second (less the burst allowance), at the idle I/O class by default, and the
    point restores exactly."""
    import time

    from snapfs.backup.pace import BURST

    m = mounter(two_devices(tmp_path))
    repo = init(tmp_path / "repo")
    t0 = time.monotonic()
    point = create(m, repo, "d0", extra=("--rate-limit", "16"), storage=storage_dir)
    assert time.monotonic() - t0 >= SIZE / (16 * MiB) - BURST
    assert restore_sha(repo, point["point"], "d0", tmp_path / "r0") == sha256_file(m.dev("d0"), m.path)
    bad = backup("create", "--io-priority", "urgent", repo, "d0", "-m", m.path, mount=m)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
