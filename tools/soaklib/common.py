"""What every part of the soak shares: the error type, progress logging, subprocesses
and control commands that never block forever on the mount, and the check ledger."""

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from snapfs.client import send

MiB, GiB = 1 << 20, 1 << 30
FUSECTL = "/sys/fs/fuse/connections"


class SoakError(Exception):
    """A step of the soak failed (the message says which and why)."""


def log(message: str) -> None:
    """Progress on stderr; stdout carries only the last line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Fuse:
    """The FUSE connection of the snapfs mount, to abort when something hangs on it.
    ``number`` is kept from the last start, so a dead (or lazily unmounted) mount can
    still be aborted."""

    number: int | None = None
    extra_unblock: list[Callable[[], None]] = []

    @classmethod
    def remember(cls, mountpoint: str) -> None:
        from snapfs import mountinfo
        found = mountinfo.at(mountpoint)
        cls.number = os.minor(found.dev) if found else None

    @classmethod
    def abort(cls) -> None:
        """fusectl's ``abort``: every request blocked on the mount fails at once; then
        thaw what a take may have left frozen."""
        from snapfs.mount import mount_fusectl
        if cls.number is not None:
            mount_fusectl()
            with contextlib.suppress(OSError), open(f"{FUSECTL}/{cls.number}/abort", "w") as f:
                f.write("1")
        for unblock in cls.extra_unblock:
            with contextlib.suppress(Exception):
                unblock()


def run(cmd: list[str], timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (output captured, text); past ``timeout`` abort the FUSE connection
    (whatever it waits on then fails), kill it and raise SoakError. ``check``: a non-zero
    exit raises SoakError with the end of its output."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Fuse.abort()
        proc.kill()
        out, err = proc.communicate(timeout=60)
        raise SoakError(f"{' '.join(cmd)[:200]}: no answer within {timeout:.0f} s (FUSE connection aborted)"
                        ) from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and done.returncode:
        raise SoakError(f"{' '.join(cmd)[:200]} exited {done.returncode}: {(err or out).strip()[-600:]}")
    return done


def bounded(fn: Callable[[], object], timeout: float, what: str):
    """``fn()`` in a worker thread; past ``timeout`` abort the FUSE connection (which
    fails the blocked call) and raise SoakError."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        Fuse.abort()
        raise SoakError(f"{what}: no answer within {timeout:.0f} s (FUSE connection aborted)") from None
    finally:
        pool.shutdown(wait=False)


def ctl(mountpoint: str, line: str, timeout: float = 90) -> dict:
    """One control command; its JSON reply (ok or not); bounded."""
    return bounded(lambda: send(mountpoint, line), timeout, f"control command {line!r}")


def ctl_ok(mountpoint: str, line: str, timeout: float = 90) -> dict:
    """A control command that must succeed."""
    reply = ctl(mountpoint, line, timeout)
    if not reply.get("ok"):
        raise SoakError(f"{line}: {reply.get('errno')} {reply.get('error')}")
    return reply


@dataclass
class Ledger:
    """Every check made: name -> [passed, failed], and the failures' messages."""

    counts: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        with self.lock:
            self.counts.setdefault(name, [0, 0])[0 if ok else 1] += 1
            if not ok:
                self.failures.append(f"{name}: {detail}")
        if not ok:
            log(f"CHECK FAILED {name}: {detail}")
        return ok

    def passed(self) -> int:
        return sum(p for p, _ in self.counts.values())

    def failed(self) -> int:
        return sum(f for _, f in self.counts.values())
