"""Real stacks: ext4 on a loop device over devices/NAME (freeze at take), and a loop
block device as a source."""

import hashlib
import os
import random
import subprocess
import threading
import time

from helpers import MiB, make_device, requires_fuse, run

pytestmark = requires_fuse



def md5(path) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def write_files(directory: str, prefix: str, count: int, seed: int) -> dict[str, str]:
    rnd = random.Random(seed)
    sums = {}
    for i in range(count):
        path = os.path.join(directory, f"{prefix}{i}")
        data = rnd.randbytes(rnd.randrange(1, 600_000))
        with open(path, "wb") as f:
            f.write(data)
        sums[f"{prefix}{i}"] = hashlib.md5(data).hexdigest()
    return sums


class FileWriter(threading.Thread):
    """Keeps rewriting 16 files in a directory until stopped (the running workload;
    bounded so it never fills the filesystem)."""

    def __init__(self, directory: str):
        super().__init__(daemon=True)
        self.directory, self.stopping, self.count, self.error = directory, threading.Event(), 0, None

    def run(self):
        try:
            while not self.stopping.is_set():
                write_files(self.directory, f"during{self.count % 16}_", 1, self.count)
                self.count += 1
        except BaseException as exc:
            self.error = exc

    def stop(self):
        self.stopping.set()
        self.join(60)
        assert not self.is_alive() and self.error is None, self.error


def test_ext4_on_loop_over_device_file(mounter, tmp_path, storage_dir):
    src = tmp_path / "fs.img"
    with open(src, "wb") as f:
        f.truncate(96 * MiB)
    m = mounter({"fs": str(src)})
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", m.dev("fs"))   # through snapfs
    fsmnt, imgmnt = tmp_path / "fsmnt", tmp_path / "imgmnt"
    fsmnt.mkdir()
    imgmnt.mkdir()
    loop = run("losetup", "--find", "--show", m.dev("fs"))
    mounted, writer = [], FileWriter(str(fsmnt))
    try:
        run("mount", loop, str(fsmnt))
        mounted.append(str(fsmnt))
        before = write_files(str(fsmnt), "before", 20, seed=1)
        writer.start()
        time.sleep(0.5)
        snap = m.ok(f"snapshot_create {storage_dir} 256M fs")["id"]
        reply = m.ok(f"snapshot_take {snap}")                  # with freeze
        assert reply["frozen"] == [str(fsmnt)], reply
        after = write_files(str(fsmnt), "after", 10, seed=2)
        writer.stop()
        assert writer.count > 0

        copy = tmp_path / "image.copy"
        run("cp", m.image(snap, "fs"), str(copy))
        fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        run("mount", "-o", "loop,ro", str(copy), str(imgmnt))
        mounted.append(str(imgmnt))
        names = set(os.listdir(imgmnt))
        for name, digest in before.items():
            assert md5(imgmnt / name) == digest, name
        assert not names & set(after), "files written after take are in the image"
        for name, digest in after.items():
            assert md5(fsmnt / name) == digest
    finally:
        writer.stopping.set()
        writer.join(60)
        for path in reversed(mounted):
            if subprocess.run(["umount", path], check=False).returncode:
                subprocess.run(["umount", "-l", path], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


def test_loop_block_device_as_source(mounter, tmp_path, storage_dir):
    backing = tmp_path / "backing.img"
    initial = make_device(backing, 16 * MiB, seed=11)
    loop = run("losetup", "--find", "--show", str(backing))
    try:
        m = mounter({"blk": loop})
        status = m.ok("status")
        assert status["devices"]["blk"]["kind"] == "bdev"
        assert os.path.getsize(m.dev("blk")) == len(initial)
        snap = m.snapshot(storage_dir, "64M", "blk")
        fd = os.open(m.dev("blk"), os.O_WRONLY)
        os.pwrite(fd, b"\xab" * 3 * MiB, 5 * MiB + 333)
        os.fsync(fd)
        os.close(fd)
        with open(m.image(snap, "blk"), "rb") as f:
            assert f.read() == initial
        with open(loop, "rb") as f:
            data = f.read()
        assert data[5 * MiB + 333 : 8 * MiB + 333] == b"\xab" * 3 * MiB
        m.ok(f"snapshot_destroy {snap}")
        m.stop()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_markdirtyblock_file_and_cbt_changes(mounter, tmp_path, storage_dir):
    """blksnap 3000-cbt, cycle 4: markdirtyblock --file marks exactly the blocks of a
    file in an ext4 stacked on the device; cbt-changes reports them."""
    import json
    import sys
    src = tmp_path / "fs.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(src))
    m = mounter({"fs": str(src)})
    fsmnt = tmp_path / "fsmnt"
    fsmnt.mkdir()
    loop = run("losetup", "--find", "--show", m.dev("fs"))
    cli = [sys.executable, "-m", "snapfs", "-m", m.path]
    try:
        run("mount", loop, str(fsmnt))
        (fsmnt / "f").write_bytes(os.urandom(3 * MiB + 5))
        run("sync")
        snap = m.snapshot(storage_dir, "64M", "fs", nofreeze=False)
        m.ok(f"snapshot_destroy {snap}")
        info = m.ok("cbtinfo fs")
        before = open(m.p("cbt", "fs", "map"), "rb").read()  # noqa: SIM115
        out = json.loads(run(*cli, "markdirtyblock", "--json", "--file", str(fsmnt / "f")))
        assert out["device"] == "fs" and out["ranges"] >= 1
        extents = json.loads(run(sys.executable, "-c", "import json,sys; from snapfs.fiemap import "
                                 "file_extents; print(json.dumps(file_extents(sys.argv[1])))",
                                 str(fsmnt / "f")))
        snap = m.snapshot(storage_dir, "64M", "fs", nofreeze=False)
        changes = json.loads(run(*cli, "cbt-changes", "--json", "fs", info["generation_id"],
                                 str(info["changes_number"])))
        assert not changes["full_backup"]
        bs = info["block_size"]
        marked = {i for off, n in changes["ranges"] for i in range(off // bs, (off + n) // bs)}
        expected = {i for phys, n in extents for i in range(phys // bs, (phys + n - 1) // bs + 1)}
        assert expected <= marked, "a block of the file is reported unchanged"
        after = open(m.p("cbt", "fs", "map"), "rb").read()  # noqa: SIM115
        assert {i for i in range(len(after)) if after[i] != before[i]} >= expected
        m.ok(f"snapshot_destroy {snap}")
    finally:
        subprocess.run(["umount", str(fsmnt)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
