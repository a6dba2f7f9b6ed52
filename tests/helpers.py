"""Helpers shared by the tests: real mounts in a subprocess (``SnapMount``), device
files, the FUSE abort that keeps a hung test from hanging CI, and small tools.
Fixtures live in conftest.py; everything else a test imports comes from here.

The filesystem runs in another process, so the tests may use blocking calls and
threads freely. Every mount is torn down even when a test fails, and its log must be
free of internal errors.
"""


import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapfs.client import send

FUSERMOUNT = shutil.which("fusermount3")
KiB, MiB = 1024, 1024 * 1024


def fuse_works() -> str | None:
    if not FUSERMOUNT:
        return "fusermount3 not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if os.geteuid() != 0:
        return "real-mount tests need root (loop devices, freeze, uid switching)"
    return None


requires_fuse = pytest.mark.skipif(fuse_works() is not None, reason=fuse_works() or "")


def is_mounted(path: str) -> bool:
    from snapfs import mountinfo
    return mountinfo.at(path) is not None


class SnapMount:
    """A running ``snapfs mount`` in a subprocess."""

    def __init__(self, tmp: Path, sources: dict[str, str], options: list[str] | None = None,
                 state_dir: Path | None = None):
        self.tmp = tmp
        self.path = str(tmp / "mnt")
        self.sources = sources
        self.options = options if options is not None else [
            "--chunk-minimum", "64K", "--diff-storage-minimum", "8M"]
        self.state_dir = str(state_dir or tmp / "state")
        self.log = str(tmp / "snapfs.log")
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.path, exist_ok=True)

    def start(self) -> "SnapMount":
        cmd = [sys.executable, "-m", "snapfs", "mount", "--log-file", self.log, "--log-level", "debug",
               "--state-dir", self.state_dir, "-o", "allow_other", *self.options, self.path,
               *[f"{name}={path}" for name, path in self.sources.items()]]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not is_mounted(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"snapfs exited with {self.proc.returncode}:\n{self.read_log()}")
            if time.monotonic() > deadline:
                raise RuntimeError("snapfs did not mount within 15 s")
            time.sleep(0.02)
        from snapfs import mountinfo
        self.connection = os.minor(mountinfo.at(self.path).dev)   # for abort_connection
        # the mount exists once init returns; wait until the loop answers
        while True:
            try:
                os.stat(os.path.join(self.path, "status"))
                break
            except OSError:
                time.sleep(0.02)
        return self

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def dev(self, name: str) -> str:
        return self.p("devices", name)

    def image(self, snap_id: str, name: str) -> str:
        return self.p("snapshots", snap_id, name)

    def ctl(self, line: str) -> dict:
        return send(self.path, line)

    def ok(self, line: str) -> dict:
        reply = self.ctl(line)
        assert reply["ok"], reply
        return reply

    def err(self, line: str) -> str:
        """Run a command that must fail; return its errno name (checks the write
        itself failed with that errno, not only the reply)."""
        fd = os.open(self.p("control"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.write(fd, line.encode() + b"\n")
            reply = read_all(fd)
        finally:
            os.close(fd)
        import json
        reply = json.loads(reply)
        assert reply["ok"] is False and reply["error"], reply
        assert errno.errorcode[info.value.errno] == reply["errno"], (info.value, reply)
        return reply["errno"]

    def snapshot(self, storage: str, limit: str, *names: str, take: bool = True,
                 nofreeze: bool = True) -> str:
        snap_id = self.ok(f"snapshot_create {storage} {limit} {' '.join(names)}")["id"]
        if take:
            self.ok(f"snapshot_take {snap_id}" + (" nofreeze" if nofreeze else ""))
        return snap_id

    def read_log(self) -> str:
        try:
            return Path(self.log).read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        """Clean unmount; the daemon must exit 0 and its log must be clean. A busy
        mount is retried for a few seconds (loop devices detach asynchronously)."""
        deadline = time.monotonic() + 10
        while subprocess.run([FUSERMOUNT, "-u", self.path], capture_output=True).returncode:
            assert time.monotonic() < deadline, f"{self.path} stayed busy"
            time.sleep(0.1)
        assert self.proc is not None
        self.proc.wait(timeout=30)
        assert self.proc.returncode == 0, self.read_log()
        self.check_log()

    def check_log(self) -> None:
        text = self.read_log()
        for bad in ("Traceback", "internal error", "CRITICAL"):
            assert bad not in text, text[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if is_mounted(self.path):
            subprocess.run([FUSERMOUNT, "-u", "-z", self.path], check=False)

    def cleanup(self) -> None:
        """Failure path: never leave a mount or a process behind."""
        if is_mounted(self.path):
            subprocess.run([FUSERMOUNT, "-u", "-z", self.path], check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.abort_connection()       # a daemon waiting on its own mount
                self.proc.kill()
                self.proc.wait(timeout=30)

    def abort_connection(self) -> None:
        """Abort this mount's FUSE connection, even after a lazy unmount."""
        abort_fuse(self.path, getattr(self, "connection", None))


FUSECTL = "/sys/fs/fuse/connections"


def abort_fuse(path: str, connection: int | None = None) -> None:
    """Abort the FUSE connection of the mount at ``path`` (or number ``connection``,
    fusectl's ``abort``): every request blocked on it fails at once, so a hung test can
    clean up."""
    from snapfs import mountinfo
    from snapfs.mount import mount_fusectl
    found = mountinfo.at(path)
    if found is not None:
        connection = os.minor(found.dev)
    if connection is None:
        return
    mount_fusectl()
    with contextlib.suppress(OSError), open(f"{FUSECTL}/{connection}/abort", "w") as f:
        f.write("1")


def bounded(fn, seconds: float, on_timeout):
    """Run ``fn()`` in a thread; if it has not returned within ``seconds``, call
    ``on_timeout()`` (which must unblock it, e.g. ``abort_fuse``) and fail the test.
    So a regression that hangs a mount fails instead of hanging CI."""
    import threading
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        on_timeout()
        thread.join(10)
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {seconds} s "
                    "(the FUSE connection was aborted)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def make_device(path: Path, size: int, seed: int = 0) -> bytes:
    """A device file of ``size`` random bytes (deterministic per seed)."""
    import random
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data




def run(*cmd: str) -> str:
    """Run a command that must succeed; its stdout, stripped."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout.strip()


def snapfs_cli() -> list[str]:
    """The ``snapfs`` command of this virtualenv."""
    exe = os.path.join(os.path.dirname(sys.executable), "snapfs")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "snapfs"]


def snapfs(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run the CLI (bounded: 60 s)."""
    return subprocess.run([*snapfs_cli(), *args], capture_output=True, text=True, timeout=60, **kw)


def state_files(state_dir) -> list[Path]:
    """The saved CBT state files under a state directory."""
    d = Path(state_dir) / "cbt"
    return sorted(d.glob("*.cbt")) if d.exists() else []


def sparse(path: Path, size: int) -> str:
    """A sparse file of ``size`` bytes; its path."""
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@contextlib.contextmanager
def ext4_on_loop(backing: str, mnt: Path):
    """ext4 on a loop device over ``backing``; always thawed, unmounted, detached."""
    mnt.mkdir()
    loop = run("losetup", "--find", "--show", backing)
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
        run("mount", loop, str(mnt))
        yield loop
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, timeout=30)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)


def unhang(m, *frozen: str):
    """An on_timeout for ``bounded``: abort the mount's connection, thaw ``frozen``."""
    def abort():
        abort_fuse(m.path)
        for mnt in frozen:
            subprocess.run(["fsfreeze", "-u", mnt], capture_output=True, timeout=30)
    return abort
