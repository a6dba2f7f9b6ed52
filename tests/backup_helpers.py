"""Helpers of the backup tests: the ``snapfs backup`` CLI in a subprocess (bounded),
a read-only backup mount in a subprocess, and hashing of files under a FUSE mount
(bounded: a hung mount is aborted, so CI never hangs)."""

import hashlib
import json
import os
import random
import subprocess
import time

from helpers import FUSERMOUNT, KiB, abort_fuse, bounded, is_mounted, snapfs_cli

CHUNK = 64 * KiB                     # the repositories of the tests: chunk = CBT block


def backup(*args: str, timeout: float = 90, mount=None) -> subprocess.CompletedProcess:
    """``snapfs backup ARGS`` (no check); a hang aborts ``mount``'s FUSE connection."""
    def call():
        return subprocess.run([*snapfs_cli(), "backup", *args], capture_output=True, text=True,
                              timeout=timeout)
    on_timeout = mount.abort_connection if mount is not None else (lambda: None)
    return bounded(call, timeout + 10, on_timeout)


def ok(*args: str, mount=None, timeout: float = 90):
    """``snapfs backup ARGS --json`` that must exit 0; the parsed JSON."""
    done = backup(*args, "--json", mount=mount, timeout=timeout)
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout)


def init(repo, chunk: int = CHUNK) -> str:
    ok("init", str(repo), "--chunk-size", str(chunk))
    return str(repo)


def create(m, repo: str, *names: str, extra: tuple = (), storage: str | None = None) -> dict:
    """A point of ``names`` on SnapMount ``m``; its manifest."""
    args = ["create", repo, *names, "-m", m.path, *extra]
    if storage:
        args += ["--storage", storage]
    return ok(*args, mount=m)


def sha256_file(path: str, mount_path: str | None = None) -> str:
    """sha256 of a file; under a FUSE mount, bounded (the mount is aborted on a hang)."""
    def digest():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    if mount_path is None:
        return digest()
    return bounded(digest, 60, lambda: abort_fuse(mount_path))


def pwrite(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def scattered_writes(m, name: str, seed: int, count: int, size: int) -> set[int]:
    """``count`` random writes (1 byte to 100 KiB) through MOUNT/devices/NAME; the chunk
    indexes they touch."""
    rng = random.Random(seed)
    touched: set[int] = set()
    for _ in range(count):
        length = rng.randint(1, 100 * KiB)
        offset = rng.randrange(0, size - length)
        bounded(lambda o=offset, n=length: pwrite(m.dev(name), o, rng.randbytes(n)), 30, m.abort_connection)
        touched.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    return touched


def restore_sha(repo: str, point: str, name: str, target) -> str:
    ok("restore", repo, point, name, str(target), "--force")
    return sha256_file(str(target))


class BackupMount:
    """``snapfs backup mount REPO PATH`` in a subprocess, unmounted and stopped at exit."""

    def __init__(self, repo: str, path):
        self.repo, self.path, self.proc = repo, str(path), None

    def __enter__(self) -> "BackupMount":
        os.makedirs(self.path, exist_ok=True)
        self.proc = subprocess.Popen([*snapfs_cli(), "backup", "mount", self.repo, self.path],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while not is_mounted(self.path):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "backup mount did not appear within 15 s"
            time.sleep(0.02)
        return self

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def __exit__(self, *exc) -> None:
        deadline = time.monotonic() + 10
        while is_mounted(self.path) and subprocess.run([FUSERMOUNT, "-u", self.path],
                                                       capture_output=True).returncode:
            if time.monotonic() > deadline:
                abort_fuse(self.path)
                subprocess.run([FUSERMOUNT, "-u", "-z", self.path], check=False)
                break
            time.sleep(0.1)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        log = self.proc.stderr.read()
        assert "internal error" not in log and "Traceback" not in log, log
