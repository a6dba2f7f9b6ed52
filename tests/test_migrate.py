"""Live migration on real mounts (issue 23): under a writer then the pivot, cancel, a
crash mid-copy and after the pivot, a loop device source to a file and back, ext4
over the device the whole time, a failing target, snapshots refused."""

import hashlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

from helpers import MiB, bounded, make_device, requires_fuse, run, snapfs, unhang

pytestmark = requires_fuse
SIZE = 24 * MiB + 4096 + 512          # a short last piece


def wait_state(m, name: str, states: tuple[str, ...], seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        info = m.ok(f"migrate_info {name}")
        if info["state"] in states:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


class Writer:
    """Random writes (512 B to 64 KiB) through the device file in a thread, applied to
    a model of the content once each returned."""

    def __init__(self, path: str, model: bytearray, seed: int = 7, low: int = 0):
        self.path, self.model, self.rng, self.low = path, model, random.Random(seed), low
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self.stop.is_set():
                self.write(fd)
        finally:
            os.close(fd)

    def write(self, fd: int) -> None:
        length = self.rng.randrange(1, 129) * 512
        offset = self.rng.randrange(self.low // 512, (len(self.model) - length) // 512) * 512
        data = self.rng.randbytes(length)
        assert os.pwrite(fd, data, offset) == length
        self.model[offset:offset + length] = data
        self.count += 1

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def digest(path: str, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_migration_under_a_writer_then_pivot(mounter, tmp_path):
    src = tmp_path / "src.img"
    model = bytearray(make_device(src, SIZE, seed=3))
    with open(src, "r+b") as f:                       # a hole the target keeps
        f.seek(4 * MiB)
        f.write(bytes(8 * MiB))
    model[4 * MiB:12 * MiB] = bytes(8 * MiB)
    subprocess.run(["fallocate", "-p", "-o", str(4 * MiB), "-l", str(8 * MiB), str(src)], check=True)
    m = mounter({"d": str(src)})
    target = tmp_path / "target.img"

    def migrate():
        with Writer(m.dev("d"), model, low=12 * MiB) as writer:   # not into the hole
            started = m.ok(f"migrate_start d {target} 16")
            assert started["total"] == SIZE
            assert m.err("migrate_complete d") == "EAGAIN"
            info = wait_state(m, "d", ("ready",))
            assert info["copied"] == SIZE and info["dirty"] == 0
            time.sleep(0.2)                               # mirrored writes after ready
            m.ok("migrate_complete d")
            time.sleep(0.2)                               # writes after the pivot
        return writer.count
    assert bounded(migrate, 60, unhang(m)) > 50
    sync(m.dev("d"))
    assert digest(str(target), SIZE) == hashlib.sha256(model).hexdigest()
    assert os.stat(target).st_blocks * 512 < SIZE - 6 * MiB          # the hole stayed one
    status = m.ok("status")
    assert status["devices"]["d"]["path"] == str(target)
    info = m.ok("migrate_info d")
    assert info["state"] == "completed" and 0 <= info["write_block_ms"] < 5000, info
    before = digest(str(src), SIZE)
    with open(m.dev("d"), "r+b") as f:                 # later writes reach only the target
        f.seek(MiB)
        f.write(b"after" * 1000)
        f.flush()
        os.fsync(f.fileno())
    assert digest(str(src), SIZE) == before
    assert b"after" * 1000 in Path(target).read_bytes()[MiB:MiB + 5000]
    import fcntl
    with open(src, "rb") as f:                         # the old source's lock is released
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cancel_and_refusals(mounter, tmp_path, storage_dir):
    src = tmp_path / "src.img"
    data = make_device(src, SIZE, seed=4)
    m = mounter({"d": str(src)})
    target = tmp_path / "target.img"
    snap = m.snapshot(storage_dir + "/s", "64M", "d")
    assert m.err(f"migrate_start d {target}") == "EBUSY"        # a snapshot in progress
    assert not target.exists()
    m.ok(f"snapshot_destroy {snap}")
    assert m.err(f"migrate_start d {src}") == "EEXIST"          # its own source: a file
    assert m.err(f"migrate_start d {m.p('devices', 'x')}") in ("EINVAL", "ENOENT")
    m.ok(f"migrate_start d {target} 2")
    assert m.err(f"migrate_start d {tmp_path / 'other'}") == "EBUSY"
    assert m.err(f"snapshot_create {storage_dir}/t 64M d") == "EBUSY"
    assert m.err("detach d") == "EBUSY"
    t0 = time.monotonic()
    m.ok("migrate_cancel d")
    assert time.monotonic() - t0 < 1
    assert not target.exists()
    assert m.ok("migrate_info d")["state"] == "cancelled"
    assert digest(m.dev("d"), SIZE) == hashlib.sha256(data).hexdigest()
    m.ok(f"migrate_start d {target}")                            # again, to the end
    wait_state(m, "d", ("ready",))
    m.ok("migrate_complete d")
    assert digest(m.dev("d"), SIZE) == hashlib.sha256(data).hexdigest()


def test_crash_mid_copy_then_after_pivot(mounter, tmp_path):
    src = tmp_path / "src.img"
    model = bytearray(make_device(src, SIZE, seed=5))
    state = tmp_path / "state"
    m = mounter({"d": str(src)}, state_dir=state)
    target = tmp_path / "target.img"
    with Writer(m.dev("d"), model, seed=9):
        m.ok(f"migrate_start d {target} 4")
        time.sleep(0.5)
        assert m.ok("migrate_info d")["state"] == "running"
    m.kill()                                         # mid-copy: the source is complete
    target.unlink()                                  # the leftover of the crashed copy
    m2 = mounter({"d": str(src)}, state_dir=state)
    assert digest(m2.dev("d"), SIZE) == hashlib.sha256(model).hexdigest()
    with Writer(m2.dev("d"), model, seed=10):
        m2.ok(f"migrate_start d {target}")           # started again
        wait_state(m2, "d", ("ready",))
        m2.ok("migrate_complete d")
    sync(m2.dev("d"))
    m2.kill()                                        # a crash after the pivot
    (tmp_path / "m9").mkdir()
    failed = snapfs("mount", "--state-dir", str(state), str(tmp_path / "m9"), f"d={src}")
    assert failed.returncode != 0
    assert str(target) in failed.stderr and "migrated" in failed.stderr, failed.stderr
    m3 = mounter({"d": str(target)}, state_dir=state)
    assert digest(m3.dev("d"), SIZE) == hashlib.sha256(model).hexdigest()


def test_loop_device_to_file_and_back_with_the_cli(mounter, tmp_path):
    backing = tmp_path / "backing.img"
    data = make_device(backing, 16 * MiB, seed=6)
    loop = run("losetup", "--find", "--show", str(backing))
    try:
        m = mounter({"d": loop})
        target = tmp_path / "file.img"
        done = snapfs("-m", m.path, "migrate", "d", str(target))
        assert done.returncode == 0, done.stderr
        assert "completed" in done.stdout
        assert m.ok("status")["devices"]["d"]["path"] == str(target)
        with open(m.dev("d"), "r+b") as f:
            f.write(b"moved on")
        sync(m.dev("d"))
        expected = hashlib.sha256(b"moved on" + data[8:]).hexdigest()
        assert digest(str(target), len(data)) == expected
        back = snapfs("-m", m.path, "--json", "migrate", "d", loop)   # the loop is free again
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout)["state"] == "completed"
        assert digest(loop, len(data)) == expected
        assert m.ok("status")["devices"]["d"]["path"] == loop
        failed = snapfs("-m", m.path, "migrate", "d", str(tmp_path / "no" / "such"))
        assert failed.returncode != 0 and "no/such" in failed.stderr
        m.stop()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_ext4_over_the_device_the_whole_time(mounter, tmp_path):
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    m = mounter({"fs": str(src)})
    target = tmp_path / "target.img"
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    loop = run("losetup", "--find", "--show", m.dev("fs"))
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
        run("mount", loop, str(mnt))

        def work():
            m.ok(f"migrate_start fs {target} 32")
            for i in range(40):
                (mnt / f"f{i}").write_bytes(os.urandom(256 * 1024))
                if i % 10 == 0:
                    os.sync()
            wait_state(m, "fs", ("ready",))
            (mnt / "late").write_bytes(b"x" * 100_000)
            m.ok("migrate_complete fs")
            (mnt / "after").write_bytes(b"y" * 100_000)
            os.sync()
        bounded(work, 60, unhang(m))
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.iterdir() if p.is_file()}
        run("umount", str(mnt))
        sync(m.dev("fs"))
        fsck = subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True, text=True, timeout=60)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        run("mount", "-o", "ro", loop, str(mnt))
        again = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.iterdir() if p.is_file()}
        assert again == files and "after" in again
        run("umount", str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)


def test_a_failing_target_leaves_the_device_on_its_source(mounter, tmp_path):
    src = tmp_path / "src.img"
    data = make_device(src, SIZE, seed=8)
    small = tmp_path / "small"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small))
    try:
        m = mounter({"d": str(src)})
        with Writer(m.dev("d"), bytearray(data), seed=11) as writer:
            m.ok(f"migrate_start d {small}/target.img")
            info = wait_state(m, "d", ("failed",))
        assert info["errno"] == "ENOSPC", info
        assert not (small / "target.img").exists()
        sync(m.dev("d"))
        assert digest(m.dev("d"), SIZE) == hashlib.sha256(writer.model).hexdigest()
        assert digest(str(src), SIZE) == hashlib.sha256(writer.model).hexdigest()
        failed = snapfs("-m", m.path, "migrate", "d", f"{small}/again.img")
        assert failed.returncode != 0 and ("ENOSPC" in failed.stderr or "space" in failed.stderr)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
