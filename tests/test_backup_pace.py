"""snapfs/backup/pace.py: the I/O priority a backup reads at, and its rate limit."""

import threading
import time

from snapfs import ioprio
from snapfs.backup.pace import BURST, RateLimit, set_io_priority


def test_the_io_priority_reaches_threads_started_afterwards():
    seen = []

    def main():
        set_io_priority("idle")
        worker = threading.Thread(target=lambda: seen.append(ioprio.of(threading.get_native_id())))
        worker.start()
        worker.join()
        seen.append(ioprio.of(threading.get_native_id()))

    t = threading.Thread(target=main)
    t.start()
    t.join()
    assert len(seen) == 2 and all(ioprio.is_idle(v) for v in seen), seen


def test_the_rate_limit_holds_readers_to_the_rate():
    """Four threads take 8 MiB in 256 KiB pieces at 16 MiB/s: at least 0.5 s less the
    burst allowance, and the unlimited bucket never waits."""
    limit = RateLimit(16)
    t0 = time.monotonic()

    def reader():
        for _ in range(8):
            limit.take(256 << 10)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 >= 0.5 - BURST - 0.02
    t0 = time.monotonic()
    for _ in range(1000):
        RateLimit(0).take(1 << 30)
    assert time.monotonic() - t0 < 0.5
