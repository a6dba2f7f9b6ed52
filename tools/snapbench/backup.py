"""The backup section: ``snapfs backup`` against ``borg create`` and raw ``dd`` on one
uncached device of mixed data (issue 13).

The device: a ``--backup-size`` file (4 GiB) of thirds -- random, zeros, one random
1 MiB block repeated -- on a loop device with ``--direct-io=on``, mounted by snapfs as
``disk=/dev/loopN``; the page cache is dropped before every step (``realdev.uncache``).
All three read the same snapshot image, ``MNT/snapshots/ID/disk``:

    full       snapfs backup create (zstd 3, BLAKE3; two repositories: the default 4 MiB
               chunks and 256 KiB chunks) | borg create
               --compression zstd,3 of the image | dd bs=4M of the image to /dev/null
    1% incr.   after 1% of the device was rewritten in scattered 64 KiB pieces through
               MNT/devices/disk: snapfs backup create (CBT) | borg create of the new image
               (it rereads and rechunks everything) | dd of the image again
    restore    snapfs backup restore to a new file (sparse) | borg extract --sparse |
               dd if=/dev/zero of a file of the same size, conv=fsync
    verify     snapfs backup verify | borg check --verify-data
    repository size after the two points (du); bytes the incremental read from the
               device, and from the repository (snapfs rebuilds a partly changed chunk from
               the parent's chunk and the changed CBT blocks)

borg runs with ``BORG_*`` variables that keep it from asking questions, on an
unencrypted repository (``-e none``), so both tools do the same work.
"""

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import BenchError, Config, MiB, human, log
from .procs import shielded
from .realdev import loop_device, uncache

SNAPFS = [sys.executable, "-m", "snapfs"]
SNAPFS_REPOS = {"snapfs": "4M", "snapfs 256K": "256K"}     # the default chunk size, and a small one
WHO = ("snapfs", "snapfs 256K", "borg", "dd")
BORG_ENV = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "YES", "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "YES"}


def sh(*cmd, env=None, cwd=None) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, **(env or {})}, cwd=cwd, check=False)
    if done.returncode:
        raise BenchError(f"{' '.join(map(str, cmd))} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout.strip()


def timed(fn, dev: Path) -> float:
    """Seconds ``fn()`` takes, starting uncached."""
    uncache(dev)
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def make_mixed_file(path: Path, size: int) -> None:
    """Thirds: random, zeros (a hole), one random 1 MiB block repeated."""
    third = size // 3 // MiB * MiB
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(third // MiB):
            f.write(os.urandom(MiB))
        f.seek(2 * third)
        for _ in range((size - 2 * third) // MiB):
            f.write(block)
        f.truncate(size)


def du(path: Path) -> int:
    return int(sh("du", "-sb", path).split()[0])


@contextlib.contextmanager
def snapfs_mount(work: Path, dev: Path):
    mnt = work / "mnt"
    mnt.mkdir()
    sh(*SNAPFS, "mount", "--daemon", "--state-dir", work / "state", "--diff-storage-minimum", "64M",
       mnt, f"disk={dev}")
    try:
        yield mnt
    finally:
        with shielded():
            subprocess.run([*SNAPFS, "umount", mnt], capture_output=True, check=False)
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


@contextlib.contextmanager
def snapshot(mnt: Path, work: Path, size: int):
    """A taken snapshot of disk; yields its image path."""
    snap = sh(*SNAPFS, "snapshot_create", "-m", mnt, work, str(2 * size), "disk").split("=", 1)[1]
    try:
        sh(*SNAPFS, "snapshot_take", "-m", mnt, snap, "--nofreeze")
        yield mnt / "snapshots" / snap / "disk"
    finally:
        with shielded():
            subprocess.run([*SNAPFS, "snapshot_destroy", "-m", mnt, snap], capture_output=True, check=False)


def rewrite_one_percent(device: Path, size: int) -> int:
    """1% of the device rewritten in scattered 64 KiB pieces; the bytes written."""
    piece, rng = 64 << 10, random.Random(13)
    offsets = rng.sample(range(size // piece), max(1, size // 100 // piece))
    fd = os.open(device, os.O_WRONLY)
    try:
        for index in offsets:
            os.pwrite(fd, rng.randbytes(piece), index * piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(offsets) * piece


class BackupBench:
    """One run of the section; ``figures`` collects {row key: {contender: value}}."""

    def __init__(self, cfg: Config, work: Path):
        self.size, self.work = cfg.backup_size, work / "backup"
        self.borg = shutil.which("borg") is not None
        self.figures: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []

    def put(self, key: str, who: str, value: float) -> None:
        self.figures.setdefault(key, {})[who] = value
        log(f"  backup: {key} {who}: {value:.2f}")

    def run(self) -> None:
        self.work.mkdir()
        backing = self.work / "disk.img"
        log(f"backup: {human(self.size)} mixed device (random, zeros, repeated), loop --direct-io=on")
        make_mixed_file(backing, self.size)
        os.sync()
        try:
            with loop_device(backing) as dev, snapfs_mount(self.work, dev) as mnt:
                self.points(mnt, dev)
                self.restore_and_verify(dev)
        finally:
            backing.unlink(missing_ok=True)

    def snapfs_backup(self, who: str, mnt: Path, dev: Path) -> tuple[float, dict]:
        import json
        out: dict = {}

        def create():
            out.update(json.loads(sh(*SNAPFS, "backup", "create", "--json", "-m", mnt, "--nofreeze",
                                     "--storage", self.work, self.repos[who], "disk")))
        return timed(create, dev), out

    def profile(self, who: str, manifest: dict) -> None:
        """The full backup's worker time by stage (the manifest's thread-seconds), as shares."""
        spent = manifest["devices"]["disk"].get("seconds", {})
        total = sum(spent.values()) or 1.0
        for stage in ("image", "hash", "store"):
            self.put(f"profile_{stage}", who, 100 * spent.get(stage, 0.0) / total)

    def borg_create(self, image: Path, name: str, dev: Path) -> float:
        return timed(lambda: sh("borg", "create", "--compression", "zstd,3", f"{self.borg_repo}::{name}",
                                image.name, env=BORG_ENV, cwd=image.parent), dev)

    def points(self, mnt: Path, dev: Path) -> None:
        """Full, then 1% incremental: snapfs (two chunk sizes), borg and dd on the images."""
        self.repos = {who: self.work / f"repo-{chunk}" for who, chunk in SNAPFS_REPOS.items()}
        self.borg_repo = self.work / "borg"
        for who, chunk in SNAPFS_REPOS.items():
            sh(*SNAPFS, "backup", "init", "--chunk-size", chunk, self.repos[who])
        if self.borg:
            sh("borg", "init", "-e", "none", self.borg_repo, env=BORG_ENV)
        else:
            self.notes.append("borg not installed (apt-get install borgbackup): its column is n/a")
        mib = self.size / MiB
        for who in SNAPFS_REPOS:
            seconds, manifest = self.snapfs_backup(who, mnt, dev)
            self.put("full", who, mib / seconds)
            self.profile(who, manifest)
        with snapshot(mnt, self.work, self.size) as image:
            self.put("full", "dd", mib / timed(lambda: sh("dd", f"if={image}", "of=/dev/null", "bs=4M"), dev))
            direct = mib / timed(lambda: sh("dd", f"if={image}", "of=/dev/null", "bs=4M", "iflag=direct"),
                                 dev)
            self.notes.append(f"dd iflag=direct of the image (snapfs backup reads with O_DIRECT): "
                              f"{direct:.0f} MiB/s.")
            if self.borg:
                self.put("full", "borg", mib / self.borg_create(image, "p1", dev))
        changed = rewrite_one_percent(mnt / "devices" / "disk", self.size)
        self.notes.append(f"The 1% rewrite changed {changed / MiB:.0f} MiB, whole 64 KiB CBT blocks.")
        for who in SNAPFS_REPOS:
            seconds, manifest = self.snapfs_backup(who, mnt, dev)
            self.put("incremental", who, seconds)
            self.put("incr_read", who, manifest["stats"]["bytes_read"] / MiB)
            self.put("incr_repo_read", who, manifest["stats"].get("repo_bytes_read", 0) / MiB)
        with snapshot(mnt, self.work, self.size) as image:
            self.put("incremental", "dd", timed(lambda: sh("dd", f"if={image}", "of=/dev/null", "bs=4M"),
                                                dev))
            if self.borg:
                self.put("incremental", "borg", self.borg_create(image, "p2", dev))
                self.put("incr_read", "borg", mib)
        for who in SNAPFS_REPOS:
            self.put("repo_size", who, du(self.repos[who]) / MiB)
        if self.borg:
            self.put("repo_size", "borg", du(self.borg_repo) / MiB)

    def restore_and_verify(self, dev: Path) -> None:
        mib, target = self.size / MiB, self.work / "restored.img"
        for who in SNAPFS_REPOS:
            seconds = timed(lambda w=who: sh(*SNAPFS, "backup", "restore", self.repos[w], "latest", "disk",
                                             target), dev)
            self.put("restore", who, mib / seconds)
            target.unlink()
            self.put("verify", who, timed(lambda w=who: sh(*SNAPFS, "backup", "verify", self.repos[w]), dev))
        dd = timed(lambda: sh("dd", "if=/dev/zero", f"of={target}", "bs=4M",
                              f"count={self.size // (4 * MiB)}", "conv=fsync"), dev)
        self.put("restore", "dd", mib / dd)
        target.unlink()
        if self.borg:
            extract = self.work / "extract"
            extract.mkdir()
            self.put("restore", "borg", mib / timed(lambda: sh("borg", "extract", "--sparse",
                                                                f"{self.borg_repo}::p2", env=BORG_ENV,
                                                                cwd=extract), dev))
            shutil.rmtree(extract)
            self.put("verify", "borg", timed(lambda: sh("borg", "check", "--verify-data", self.borg_repo,
                                                         env=BORG_ENV), dev))


# key, label, unit, lower is better
ROWS = [
    ("full", "full backup (dd: read of the image)", "MiB/s", False),
    ("profile_image", "full backup: worker time reading the image", "%", True),
    ("profile_hash", "full backup: worker time hashing (BLAKE3)", "%", True),
    ("profile_store", "full backup: worker time storing (zstd, write, fsync)", "%", True),
    ("incremental", "after 1% rewritten: backup (borg: 2nd run; dd: read of the image)", "s", True),
    ("incr_read", "after 1% rewritten: bytes read from the device", "MiB", True),
    ("incr_repo_read", "after 1% rewritten: bytes read from the repository", "MiB", True),
    ("restore", "restore to a new file (dd: write of the same size)", "MiB/s", False),
    ("verify", "verify the repository (borg check --verify-data)", "s", True),
    ("repo_size", "repository after both points", "MiB", True),
]


def ratio(value: float | None, other: float | None, lower: bool) -> str:
    if not value or not other:
        return "n/a"
    r = other / value if lower else value / other
    return f"{r:.2f}"


def render(bench: "BackupBench") -> tuple[str, list[dict]]:
    """The Markdown table and its rows for --json."""
    def cell(v):
        return "n/a" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}")
    rows, lines = [], []
    head = ["workload", "unit", *WHO, "snapfs/borg", "256K/borg", "snapfs/dd"]
    for key, label, unit, lower in ROWS:
        f = bench.figures.get(key, {})
        who = {w: f.get(w) for w in WHO}
        rows.append({"key": key, "workload": label, "unit": unit, **who})
        lines.append([label, unit, *map(cell, who.values()), ratio(who["snapfs"], who["borg"], lower),
                      ratio(who["snapfs 256K"], who["borg"], lower), ratio(who["snapfs"], who["dd"], lower)])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"
    caption = (f"backup: one {human(bench.size)} device of mixed data (thirds: random, zeros, a repeated "
               "1 MiB block) on a loop device with --direct-io=on, page cache dropped before every step")
    legend = ("snapfs = the default 4 MiB chunks, snapfs 256K = a repository with 256 KiB chunks. Ratios: "
              ">= 1 favours snapfs (for s and MiB rows it is other/snapfs). All read the same device "
              "through snapshot images; borg: zstd,3, unencrypted. " + " ".join(bench.notes))
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([caption, "", line(head), rule, *map(line, lines), "", legend]), rows


def run_backup_bench(cfg: Config, work: Path) -> tuple[str, list[dict]]:
    bench = BackupBench(cfg, work)
    try:
        bench.run()
    except (BenchError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
        bench.notes.append(f"backup section failed: {exc}")
        log(f"backup section failed: {exc}")
    return render(bench)
