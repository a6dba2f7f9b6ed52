"""I/O priorities (``ioprio_get``/``ioprio_set``, ``ionice``): the priority of the
process that opens a snapshot image is carried to the source I/O its reads cause
(docs/concurrency.md rule 4). Values are the kernel's: class << 13 | level; 0 means
none set (derived from the CPU nice value). And the other half of reading beside a
workload: a rate limit (``RateLimit``, a backup's and a migration's ``--rate-limit``)."""

import os
import threading
import time

from .osutil import LIBC

_SYS_GET, _SYS_SET = {"x86_64": (252, 251), "aarch64": (31, 30)}.get(os.uname().machine, (None, None))
_WHO_PROCESS = 1
CLASS_SHIFT = 13
IDLE = 3                 # the idle class: ``ionice -c3``


def of(pid: int) -> int:
    """The I/O priority of thread ``pid`` (0: none set, unknown, or gone; also class
    "none" with a level, which older kernels report for a default thread and refuse as
    a request's priority)."""
    return _get(pid) if pid > 0 else 0


def current_thread() -> int:
    """The calling thread's I/O priority (as ``of``)."""
    return _get(0)


def _get(who: int) -> int:
    if _SYS_GET is None:
        return 0
    value = LIBC.syscall(_SYS_GET, _WHO_PROCESS, who)
    return value if value > 0 and value >> CLASS_SHIFT else 0


def set_current_thread(value: int) -> None:
    """Give the calling thread I/O priority ``value`` (failures ignored: a priority is a
    hint)."""
    if _SYS_SET is not None:
        LIBC.syscall(_SYS_SET, _WHO_PROCESS, 0, value)


def is_idle(value: int) -> bool:
    return value >> CLASS_SHIFT == IDLE


BURST = 0.25             # seconds of reading at the full rate allowed after a pause


class RateLimit:
    """At most ``mib_per_s`` MiB/s over all callers (0: no limit): a token bucket
    holding at most BURST seconds' worth. Thread-safe. ``take`` sleeps (a thread);
    ``reserve`` only says how long to sleep (a trio task awaits that itself)."""

    def __init__(self, mib_per_s: float):
        self.rate = mib_per_s * (1 << 20)
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """Count ``nbytes`` as read; the seconds to wait before reading them."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - BURST) + nbytes / self.rate
            return max(0.0, self._next - now)

    def take(self, nbytes: int) -> None:
        """Wait (sleeping the calling thread) until ``nbytes`` more may be read."""
        wait = self.reserve(nbytes)
        if wait > 0:
            time.sleep(wait)
