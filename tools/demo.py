#!/usr/bin/env python3
"""make demo: a backup of a live ext4 filesystem through snapfs, end to end.

Creates a disk image with ext4 in a scratch directory, mounts snapfs over it,
loop-mounts the ext4 through devices/, writes files, takes a snapshot while a writer
keeps going, copies the snapshot image with cp, checks the copy with e2fsck -fn and by
comparing the files that existed at take time, destroys the snapshot. Then the same
with `snapfs backup`: a full and an incremental backup into a repository, the list,
a file copied out of the older point through the read-only backup mount, a restore
that e2fsck accepts, verify and prune. Unmounts everything and cleans up even when a
step fails.
"""

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

SNAPFS = [sys.executable, "-m", "snapfs"]
MiB = 1024 * 1024


def sh(*cmd: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def fuse_unmount(path: str) -> None:
    """fusermount3 -u, retried while a loop device that was just detached lets go."""
    for _ in range(50):
        if subprocess.run(["fusermount3", "-u", path], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    sh("fusermount3", "-u", path)


def say(text: str) -> None:
    print(f"  {text}", flush=True)


def write_files(directory: str, prefix: str, count: int, seed: int) -> dict[str, str]:
    rnd = random.Random(seed)
    sums = {}
    for i in range(count):
        data = rnd.randbytes(rnd.randrange(4096, 1 * MiB))
        with open(os.path.join(directory, f"{prefix}{i}"), "wb") as f:
            f.write(data)
        sums[f"{prefix}{i}"] = hashlib.md5(data).hexdigest()
    return sums


class Workload(threading.Thread):
    """The 'database' that never stops: rewrites files while the backup runs."""

    def __init__(self, directory: str, pause: float = 0.0):
        super().__init__(daemon=True)
        self.directory, self.stop, self.writes, self.pause = directory, threading.Event(), 0, pause

    def run(self) -> None:
        while not self.stop.wait(self.pause):
            write_files(self.directory, f"live{self.writes % 8}_", 1, self.writes)
            self.writes += 1


def demo(scratch: str, cleanup: list) -> None:
    disk, mnt, fs = (os.path.join(scratch, p) for p in ("disk.img", "snapfs", "fs"))
    store, backup, check = (os.path.join(scratch, p) for p in ("store", "backup.img", "check"))
    for d in (mnt, fs, store, check):
        os.mkdir(d)
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
    sh("mkfs.ext4", "-q", "-E", "nodiscard", disk)
    say(f"created a 256 MiB ext4 disk image: {disk}")

    sh(*SNAPFS, "mount", "--daemon", "--state-dir", os.path.join(scratch, "state"), mnt, f"disk={disk}")
    cleanup.append(lambda: sh(*SNAPFS, "umount", mnt))
    say(f"snapfs mount {mnt} disk={disk}")
    loop = sh("losetup", "--find", "--show", f"{mnt}/devices/disk")
    cleanup.append(lambda: sh("losetup", "-d", loop))
    sh("mount", loop, fs)
    cleanup.append(lambda: sh("umount", fs))
    say(f"ext4 mounted on {fs} through {loop} -> {mnt}/devices/disk")

    before = write_files(fs, "file", 40, seed=1)
    say(f"wrote {len(before)} files ({sum(os.path.getsize(os.path.join(fs, n)) for n in before) // MiB} MiB)")
    workload = Workload(fs)
    workload.start()
    cleanup.append(lambda: (workload.stop.set(), workload.join()))
    time.sleep(0.5)

    snap = sh(*SNAPFS, "snapshot_create", "-m", mnt, store, "1G", "disk").split("=", 1)[1]
    cleanup.append(lambda: sh(*SNAPFS, "snapshot_destroy", "-m", mnt, snap))
    took = dict(line.split("=", 1) for line in sh(*SNAPFS, "snapshot_take", "-m", mnt, snap).splitlines())
    say(f"snapshot {snap} taken while a writer ran (froze {took.get('frozen', '?')}, "
        f"writes held {took['write_block_ms']} ms)")

    t0 = time.monotonic()
    sh("cp", f"{mnt}/snapshots/{snap}/disk", backup)
    seconds = time.monotonic() - t0
    after = write_files(fs, "after", 5, seed=2)
    workload.stop.set()
    workload.join()
    say(f"cp of the image: {os.path.getsize(backup) // MiB} MiB in {seconds:.1f} s "
        f"({os.path.getsize(backup) / MiB / seconds:.0f} MiB/s); the writer made {workload.writes} "
        f"writes meanwhile")

    verify(backup, check, before, after, cleanup)
    sh(*SNAPFS, "snapshot_destroy", "-m", mnt, snap)
    say("snapshot destroyed: its storage is freed, tracking goes on")
    backup_demo(scratch, mnt, fs, cleanup)


def backup_demo(scratch: str, mnt: str, fs: str, cleanup: list) -> None:
    """snapfs backup: full, then incremental, of the live filesystem; list; a file out of
    the older point through the read-only backup mount; restore + e2fsck; verify; prune."""
    import json
    print("snapfs backup:", flush=True)
    repo, bmnt, old, restored = (os.path.join(scratch, p) for p in ("repo", "bmnt", "old", "restored.img"))
    for d in (bmnt, old):
        os.mkdir(d)
    backup = [*SNAPFS, "backup"]
    sh(*backup, "init", repo)
    workload = Workload(fs, pause=0.1)                       # a calmer writer this time
    workload.start()
    cleanup.append(lambda: (workload.stop.set(), workload.join()))
    first = json.loads(sh(*backup, "create", "--json", "-m", mnt, "--storage", scratch, repo, "disk"))
    d = first["devices"]["disk"]
    say(f"backup create (full, {first['consistency']}, writer running): read {d['bytes_read'] // MiB} MiB, "
        f"stored {d['bytes_new'] // MiB} MiB, {d['zero_chunks']} zero chunks not stored "
        f"({first['stats']['duration']:.1f} s): {d['reason']}")
    workload.stop.set()
    workload.join()
    old_files = {n: hashlib.md5(open(os.path.join(fs, n), "rb").read()).hexdigest()  # noqa: SIM115
                 for n in sorted(os.listdir(fs)) if n.startswith("file")}
    write_files(fs, "file", 3, seed=3)                        # rewrite three files
    second = json.loads(sh(*backup, "create", "--json", "-m", mnt, "--storage", scratch, repo, "disk"))
    d = second["devices"]["disk"]
    say(f"backup create (incremental): read {d['bytes_read'] / MiB:.0f} MiB of {d['size'] // MiB} MiB "
        f"(only the chunks CBT marked), stored {d['bytes_new'] / MiB:.1f} MiB "
        f"({second['stats']['duration']:.1f} s)")
    for line in sh(*backup, "list", repo).splitlines():
        say(line)
    older = first["point"]
    sh(*backup, "mount", "--daemon", "--log-file", os.path.join(scratch, "bmnt.log"), repo, bmnt)
    cleanup.append(lambda: fuse_unmount(bmnt))
    loop = sh("losetup", "-r", "--find", "--show", os.path.join(bmnt, older, "disk"))
    cleanup.append(lambda: sh("losetup", "-d", loop))
    sh("mount", "-o", "ro", loop, old)
    cleanup.append(lambda: sh("umount", old))
    shutil.copy(os.path.join(old, "file0"), os.path.join(scratch, "file0.old"))
    got = hashlib.md5(open(os.path.join(scratch, "file0.old"), "rb").read()).hexdigest()  # noqa: SIM115
    if got != old_files["file0"]:
        raise RuntimeError("file0 from the backup mount differs from the file at the older point")
    say(f"backup mount + losetup -r + mount -o ro: copied file0 as of point {older} (md5 matches; "
        "it was rewritten since)")
    for step in (cleanup.pop(), cleanup.pop(), cleanup.pop()):
        step()
    sh(*backup, "restore", repo, older, "disk", restored)
    fsck = subprocess.run(["e2fsck", "-fn", restored], capture_output=True, text=True)
    if fsck.returncode:
        raise RuntimeError(f"e2fsck found problems in the restored image:\n{fsck.stdout}")
    say(f"backup restore of point {older} to a sparse image ({os.stat(restored).st_blocks // 2048} MiB "
        "allocated): e2fsck -fn clean")
    say("backup verify: " + sh(*backup, "verify", repo).splitlines()[-1])
    say("backup prune --keep-last 1: " + sh(*backup, "prune", repo, "--keep-last", "1").splitlines()[-1])


def verify(backup: str, check: str, before: dict, after: dict, cleanup: list) -> None:
    fsck = subprocess.run(["e2fsck", "-fn", backup], capture_output=True, text=True)
    if fsck.returncode:
        raise RuntimeError(f"e2fsck found problems in the backup:\n{fsck.stdout}")
    say("e2fsck -fn on the backup copy: clean")
    sh("mount", "-o", "loop,ro", backup, check)
    try:
        bad = [n for n, d in before.items()
               if hashlib.md5(open(os.path.join(check, n), "rb").read()).hexdigest() != d]  # noqa: SIM115
        leaked = [n for n in after if os.path.exists(os.path.join(check, n))]
    finally:
        sh("umount", check)
    if bad or leaked:
        raise RuntimeError(f"backup differs: changed {bad}, files from after take {leaked}")
    say(f"all {len(before)} files of take time match (md5); none of the {len(after)} later files is in it")


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (loop devices and mounts)", file=sys.stderr)
        return 1
    scratch = tempfile.mkdtemp(prefix="snapfs-demo-", dir="/var/tmp")
    cleanup: list = []
    print(f"snapfs demo in {scratch}")
    status = 0
    try:
        demo(scratch, cleanup)
        print("demo OK: the backup taken from the running filesystem is consistent")
    except Exception as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        status = 1
    finally:
        for step in reversed(cleanup):
            with contextlib.suppress(Exception):
                step()
        shutil.rmtree(scratch, ignore_errors=True)
        print("cleaned up: snapshot destroyed, filesystems unmounted, scratch removed")
    return status


if __name__ == "__main__":
    sys.exit(main())
