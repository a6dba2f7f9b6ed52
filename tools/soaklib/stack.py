"""The layers the soak runs, bottom up: a 2 GiB file behind a ``--direct-io=on`` loop
device (the source), the snapfs daemon started as tools/systemd/snapfs@.service starts
it, ext4 on a loop device over MOUNT/devices/disk0, PostgreSQL on that ext4. Each layer
comes up and goes down on its own, so the run can do what an operator does after a
crash or for a restart. Every step that can block on the mount is bounded (common.run)."""

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from snapbench.pg import PG_BIN, as_postgres
from snapbench.procs import is_mounted, lazy_unmount, shielded, spawn

from .common import Fuse, SoakError, log, run

DEVICE = "disk0"


def snapfs_exe() -> str:
    """The ``snapfs`` command of this virtualenv (what the unit's ExecStart runs)."""
    import sys
    exe = Path(sys.executable).parent / "snapfs"
    if not exe.exists():
        raise SoakError(f"{exe} missing: run `make venv` first")
    return str(exe)


class Stack:
    """The source, the daemon, ext4 and PostgreSQL of one soak, in ``work``."""

    def __init__(self, work: Path, size: int, scale: int):
        self.work, self.size, self.scale = work, size, scale
        self.mnt, self.state, self.log = work / "snap", work / "state", work / "snapfs.log"
        self.data, self.sock, self.pglogs = work / "data", work / "pgsock", work / "pglogs"
        self.source: str | None = None          # what disk0 is backed by now
        self.loop_source: str | None = None     # the --direct-io loop device
        self.proc: subprocess.Popen | None = None
        self.dloop: str | None = None           # loop device over MOUNT/devices/disk0
        self.pg_up = False
        Fuse.extra_unblock = [self.thaw]

    @property
    def device(self) -> str:
        return str(self.mnt / "devices" / DEVICE)

    @property
    def pgdata(self) -> Path:
        return self.data / "pgdata"

    # ----- the source ------------------------------------------------------------------

    def make_source(self) -> None:
        """A sparse 2 GiB file behind a loop device with direct I/O."""
        backing = self.work / "source.img"
        with open(backing, "wb") as f:
            f.truncate(self.size)
        made = run(["losetup", "--direct-io=on", "--find", "--show", str(backing)], 60)
        self.loop_source = made.stdout.strip()
        self.source = self.loop_source

    # ----- the daemon --------------------------------------------------------------------

    def start_daemon(self) -> None:
        """As the unit does: clear a dead mount (ExecStartPre, only when the mountpoint
        cannot be stat'ed), mkdir, then ``snapfs mount`` in the foreground; ready once
        MOUNT/status answers."""
        mnt = str(self.mnt)
        run(["sh", "-c", f'stat "{mnt}" >/dev/null 2>&1 || exec fusermount3 -u -z "{mnt}"'], 60, check=False)
        self.mnt.mkdir(parents=True, exist_ok=True)
        cmd = [snapfs_exe(), "mount", "--log-file", str(self.log), "--state-dir", str(self.state),
               "-o", "allow_other", mnt, f"{DEVICE}={self.source}"]
        self.proc = spawn(cmd, self.work / "snapfs.stdout")
        deadline = time.monotonic() + 60
        while not (is_mounted(mnt) and os.path.exists(self.mnt / "status")):
            if self.proc.poll() is not None:
                raise SoakError(f"snapfs exited with {self.proc.returncode} at start (see {self.log})")
            if time.monotonic() > deadline:
                raise SoakError("snapfs did not answer within 60 s of its start")
            time.sleep(0.05)
        Fuse.remember(mnt)
        log(f"snapfs up (pid {self.proc.pid}) over {self.source}")

    def stop_daemon(self) -> int:
        """SIGTERM (systemctl stop) and the exit code; SIGKILL after 90 s (TimeoutStopSec)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            Fuse.abort()
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise SoakError("snapfs did not stop within 90 s of SIGTERM") from None

    def kill_daemon(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    # ----- ext4 --------------------------------------------------------------------------

    def ext4_up(self, mkfs: bool = False, fsck: bool = False) -> None:
        """A loop device over the snapfs device, ``e2fsck -p`` (after a crash), mounted."""
        self.dloop = run(["losetup", "--find", "--show", self.device], 60).stdout.strip()
        if mkfs:
            run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", self.dloop], 300)
        if fsck:
            done = run(["e2fsck", "-p", self.dloop], 600, check=False)
            if done.returncode not in (0, 1):
                raise SoakError(f"e2fsck -p {self.dloop} exited {done.returncode}: {done.stdout[-500:]}")
        self.data.mkdir(exist_ok=True)
        run(["mount", self.dloop, str(self.data)], 120)
        if not self.pgdata.exists():
            self.pgdata.mkdir()
            shutil.chown(self.pgdata, "postgres", "postgres")

    def thaw(self) -> None:
        subprocess.run(["fsfreeze", "-u", str(self.data)], capture_output=True, timeout=30, check=False)

    def ext4_down(self) -> None:
        """Thaw (a take killed mid-freeze leaves ext4 frozen), unmount (lazily if it will
        not go), detach the loop device."""
        if is_mounted(str(self.data)):
            self.thaw()
            if run(["umount", str(self.data)], 120, check=False).returncode:
                run(["umount", "-l", str(self.data)], 60, check=False)
        if self.dloop:
            run(["losetup", "-d", self.dloop], 60, check=False)
            self.dloop = None

    # ----- PostgreSQL --------------------------------------------------------------------

    def pg_start(self, init: bool = False) -> None:
        """The server on ext4 (crash recovery when it was not stopped cleanly); with
        ``init``: initdb, the ``bench`` database and pgbench's tables first."""
        for where in (self.sock, self.pglogs):
            where.mkdir(exist_ok=True)
            shutil.chown(where, "postgres", "postgres")
        if init:
            as_postgres(str(PG_BIN / "initdb"), "-D", str(self.pgdata), "-A", "trust", timeout=300)
        opts = f"-k {self.sock} -c listen_addresses='' -c fsync=on -c shared_buffers=64MB"
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata), "-o", opts, "-l",
                    str(self.pglogs / "pg.log"), "-w", "-t", "600", "start", timeout=660)
        self.pg_up = True
        if init:
            as_postgres("createdb", "-h", str(self.sock), "bench", timeout=120)
            as_postgres("pgbench", "-h", str(self.sock), "-i", "-q", "-s", str(self.scale), "bench",
                        timeout=1200)

    def pg_stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (``immediate`` after a crash); SIGKILL of the postmaster if it
        does not go within 60 s."""
        if not self.pg_up:
            return
        cmd = ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata),
               "-m", mode, "-w", "-t", "60", "stop"]
        done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        if done.returncode:
            self.pg_kill()
        self.pg_up = False

    def pg_kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            time.sleep(1)

    def psql(self, sql: str, sock: Path | None = None) -> str:
        return as_postgres("psql", "-h", str(sock or self.sock), "-d", "bench", "-Atc", sql,
                           timeout=600).stdout.strip()

    # ----- the whole stack ---------------------------------------------------------------

    def up(self, first: bool = False, fsck: bool = False) -> None:
        self.start_daemon()
        self.ext4_up(mkfs=first, fsck=fsck)
        self.pg_start(init=first)

    def down_clean(self) -> int:
        """As an operator before a restart: PostgreSQL, ext4, then SIGTERM; the daemon's
        exit code."""
        self.pg_stop("fast")
        self.ext4_down()
        return self.stop_daemon()

    def teardown(self) -> None:
        """On any exit: nothing of the soak left mounted, attached or running."""
        with shielded():
            with contextlib.suppress(Exception):
                self.pg_stop("immediate")
            with contextlib.suppress(Exception):
                self.ext4_down()
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.stop_daemon()
            if is_mounted(str(self.mnt)):
                Fuse.abort()
                lazy_unmount(str(self.mnt))
            if self.loop_source:
                subprocess.run(["losetup", "-d", self.loop_source], capture_output=True, timeout=60,
                               check=False)
