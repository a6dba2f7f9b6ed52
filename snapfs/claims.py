"""Claims: small files under /run (or $XDG_RUNTIME_DIR) that name the mount serving a
source, so that a second mount refused with EBUSY can say which mount holds it.

Only a hint for a message: the source's own lock (or O_EXCL) is what refuses the
second mount (source.py). A crashed daemon's claim is unlocked and ignored, and swept
after STALE_AFTER. Calls here block (file I/O): run them where the source is opened.
"""

import contextlib
import errno
import fcntl
import json
import os
import stat
import time


def claims_dir() -> str | None:
    """Where claims live: /run/snapfs/sources for root, else under $XDG_RUNTIME_DIR;
    None without either."""
    if os.geteuid() == 0:
        return "/run/snapfs/sources"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "snapfs", "sources") if runtime else None


class Claim:
    """A small file naming the mount that serves a source, keyed by the source's
    identity (a block device by its number, a file by device and inode, so any path
    to it finds it) and flock'ed by that mount while it serves the source. A crashed
    daemon's claim is unlocked and ignored; the next mount of the source overwrites
    it. Claims are only a hint for the message: the source's own lock (or O_EXCL) is
    what refuses a second mount. Mount namespaces with their own /run do not see each
    other's claims."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    @staticmethod
    def file_for(st: os.stat_result) -> str | None:
        base = claims_dir()
        if base is None:
            return None
        if stat.S_ISBLK(st.st_mode):
            key = f"bdev-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        else:
            key = f"file-{os.major(st.st_dev)}:{os.minor(st.st_dev)}-{st.st_ino}"
        return os.path.join(base, key)

    @classmethod
    def take(cls, st: os.stat_result, mountpoint: str) -> "Claim | None":
        """Leave a claim for the source with stat ``st`` (whose lock the caller holds);
        None when it cannot be written (the mount works without it)."""
        path = cls.file_for(st)
        if path is None:
            return None
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            _remove_stale(os.path.dirname(path))
        except OSError:
            return None
        # a crashed daemon's file may be locked for a moment by a reader (Claim.read)
        # or another mount's sweep, which may also unlink it between our open and lock
        for _ in range(CLAIM_TRIES):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(errno.ENOENT, "claim file replaced", path)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"mountpoint": mountpoint, "pid": os.getpid()}).encode(), 0)
                return cls(path, fd)
            except (BlockingIOError, FileNotFoundError):
                os.close(fd)
                time.sleep(0.01)
            except OSError:
                os.close(fd)
                return None
        return None

    @classmethod
    def read(cls, st: os.stat_result) -> dict | None:
        """The live claim on the source with stat ``st``: {"mountpoint", "pid"}, or None."""
        path = cls.file_for(st)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path else -1
        except OSError:
            return None
        if fd < 0:
            return None
        try:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None                    # nobody holds it: a crashed daemon's
            claim = json.loads(os.pread(fd, 65536, 0))
            return claim if isinstance(claim, dict) and "mountpoint" in claim else None
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


STALE_AFTER = 60.0   # seconds: a claim this old that nobody locks is a crashed daemon's
CLAIM_TRIES = 50     # 10 ms apart: a claim file locked or unlinked by someone else


def _remove_stale(base: str) -> None:
    """Remove the claims of crashed daemons: unlocked and written STALE_AFTER ago (a
    new claim is locked microseconds after it is created)."""
    for name in os.listdir(base):
        path = os.path.join(base, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > STALE_AFTER:
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)
