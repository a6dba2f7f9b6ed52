"""How a backup reads beside the workload: at an I/O priority (``ionice``'s classes;
the snapfs daemon sees the priority of the process that opens an image and gives its
reads that priority, and an idle-class reader its turn only as if the devices were
always busy), and at most at a rate (``--rate-limit``)."""

import threading
import time

from .. import ioprio

PRIORITIES = {"idle": ioprio.IDLE << ioprio.CLASS_SHIFT | 7,
              "best-effort": 2 << ioprio.CLASS_SHIFT | 7,     # the lowest best-effort level
              "normal": 0}                                     # as the nice value says
BURST = 0.25             # seconds of reading at the full rate allowed after a pause


def set_io_priority(name: str) -> None:
    """Give the calling thread, and the threads it starts from now on (Linux copies a
    thread's I/O priority to its children), the priority ``name`` of PRIORITIES."""
    ioprio.set_current_thread(PRIORITIES[name])


class RateLimit:
    """At most ``mib_per_s`` MiB/s over all threads that call ``take`` (0: no limit): a
    token bucket holding at most BURST seconds' worth. Thread-safe."""

    def __init__(self, mib_per_s: float):
        self.rate = mib_per_s * (1 << 20)
        self._next = 0.0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may be read."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - BURST) + nbytes / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)
