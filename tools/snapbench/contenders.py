"""The systems under test: the Contender interface and Take, the raw file, snapfs
(qemu-storage-daemon is in ``qemu``)."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from snapfs.cli import command as snapfs_command

from .common import BenchError
from .procs import finish_process, is_mounted, lazy_unmount, shielded, spawn, tail, wait_until


@dataclass(frozen=True)
class Take:
    """A take: monotonic ns around the step that holds writes, and the daemon's own
    count of how long writes were held (snapfs only)."""

    t0: int
    t1: int
    block_ms: float | None = None


class Contender:
    """A system under test. ``device`` is written and read by the plain and COW jobs;
    ``image`` is the snapshot image while one is held (between take and release)."""

    name = ""
    can_take = True

    def __init__(self, directory: Path, source: Path, size: int):
        """``directory`` holds the contender's files; ``source`` is its own copy."""
        self.dir = directory
        self.source = source
        self.size = size
        self.pid: int | None = None
        self.image: Path | None = None

    @property
    def device(self) -> Path:
        """Path of the device as the workload sees it."""
        return self.source

    @property
    def reader(self) -> Path:
        """Path the plain read jobs of the real-device section use: the device, unless
        the contender has a read-only path closer to the source."""
        return self.device

    def start(self) -> None:
        """Bring the contender up."""

    def take(self) -> Take | None:
        """Take a snapshot; sets ``image``."""
        self.image = self.source
        return None

    def release(self) -> None:
        """Destroy the snapshot taken last."""

    def copied_bytes(self) -> int | None:
        """Bytes of old data the held snapshot keeps (a sanity check), if known."""
        return None

    def stop(self) -> None:
        """Stop everything started; idempotent, never raises for cleanup problems."""


class Raw(Contender):
    """The source file itself: the physical reference (no snapshot)."""

    name = "raw"
    can_take = False


class Snapfs(Contender):
    """A snapfs mount over one source: device ``d``; storage directory in the scratch
    dir (same disk); diff-storage minimum = limit = ``storage`` (no growth mid-run)."""

    name = "snapfs"
    env: dict | None = None      # more environment for the daemon (PYTHONPATH: another version)

    def __init__(self, directory: Path, source: Path, size: int, storage: int):
        """``storage``: diff-storage minimum and snapshot limit, in bytes."""
        super().__init__(directory, source, size)
        self.storage = storage
        self.mnt, self.store, self.log = directory / "mnt", directory / "store", directory / "snapfs.log"
        self.proc: subprocess.Popen | None = None
        self.snap_id: str | None = None

    @property
    def device(self) -> Path:
        """MNT/devices/d."""
        return self.mnt / "devices" / "d"

    def start(self) -> None:
        """``snapfs mount`` in the foreground of a child process; wait until it answers."""
        for d in (self.mnt, self.store):
            d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "snapfs", "mount", "--log-file", str(self.log),
               "--log-level", "warning", "--state-dir", str(self.dir / "state"),
               "--chunk-minimum", "64K", "--diff-storage-minimum", str(self.storage),
               str(self.mnt), f"d={self.source}"]
        self.proc = spawn(cmd, self.dir / "stdout.log", self.env)
        wait_until(self._ready, 30, "snapfs mount")
        self.pid = self.ctl("status")["pid"]

    def _ready(self) -> bool:
        """Mounted and serving (the status file answers)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"snapfs exited with {self.proc.returncode}: {tail(self.log)}")
        if not is_mounted(self.mnt):
            return False
        try:
            os.stat(self.mnt / "status")
        except OSError:
            return False
        return True

    def ctl(self, line: str) -> dict:
        """One control command (raises SnapfsError on failure)."""
        return snapfs_command(str(self.mnt), line)

    def cli_args(self, *args: str) -> list[str]:
        """The command line of ``snapfs -m MNT ARGS...``."""
        return [sys.executable, "-m", "snapfs", "-m", str(self.mnt), *args]

    def cli(self, *args: str) -> None:
        """Run ``snapfs -m MNT ARGS...``; BenchError with its output when it fails."""
        done = subprocess.run(self.cli_args(*args), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"snapfs {' '.join(args)} failed: {(done.stderr or done.stdout)[-500:]}")

    def take(self) -> Take:
        """snapshot_create (storage dir, limit) then snapshot_take, timed."""
        self.snap_id = self.ctl(f"snapshot_create {self.store} {self.storage} d")["id"]
        t0 = time.monotonic_ns()
        reply = self.ctl(f"snapshot_take {self.snap_id}")
        t1 = time.monotonic_ns()
        self.image = self.mnt / "snapshots" / self.snap_id / "d"
        return Take(t0, t1, reply.get("write_block_ms"))

    def copied_bytes(self) -> int:
        """chunks_copied x chunk_size from the snapshot's info."""
        info = self.ctl("status")["snapshots"][self.snap_id]["devices"]["d"]
        return info["chunks_copied"] * info["chunk_size"]

    def release(self) -> None:
        """snapshot_destroy."""
        if self.snap_id:
            snap_id, self.snap_id, self.image = self.snap_id, None, None
            self.ctl(f"snapshot_destroy {snap_id}")

    def stop(self) -> None:
        """Clean unmount (fusermount3 -u, the daemon saves CBT and exits); lazy unmount
        and SIGTERM/SIGKILL if that fails."""
        if self.proc is None:
            return
        with shielded():
            clean = is_mounted(self.mnt) and subprocess.run(
                ["fusermount3", "-u", str(self.mnt)], capture_output=True, check=False).returncode == 0
            if not clean:
                lazy_unmount(self.mnt)
            finish_process(self.proc, 60 if clean else 5)
            lazy_unmount(self.mnt)
            self.proc = None

    def log_problems(self) -> str | None:
        """Internal errors in the daemon's log (a snapfs bug), if any."""
        text = tail(self.log, 1 << 20)
        bad = [w for w in ("Traceback", "internal error", "CRITICAL") if w in text]
        return f"snapfs log {self.log} contains {', '.join(bad)}" if bad else None
