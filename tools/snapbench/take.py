"""Take latency: the longest write wait of 4 O_DIRECT writers while snapshots are taken."""

import bisect
import mmap
import multiprocessing as mp
import os
import random
import signal
import time
from array import array
from pathlib import Path

from .common import BLOCK, BenchError, Config, log
from .contenders import Contender, Take
from .report import Results, percentile


def _writer(path: str, size: int, seed: int, stop, conn) -> None:
    """Writer process: random 4 KiB O_DIRECT writes until ``stop``; sends the start and
    end times (CLOCK_MONOTONIC ns, comparable across processes) of every write."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    starts, ends, error = array("q"), array("q"), ""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            _write_loop(fd, size, seed, stop, starts, ends)
        finally:
            os.close(fd)
    except OSError as exc:
        error = str(exc)
    conn.send((starts.tobytes(), ends.tobytes(), error))
    conn.close()


def _write_loop(fd: int, size: int, seed: int, stop, starts: array, ends: array) -> None:
    """The timed loop of a writer."""
    buf = mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(BLOCK))
    rng, blocks, clock = random.Random(seed), size // BLOCK, time.monotonic_ns
    while not stop.is_set():
        offset = rng.randrange(blocks) * BLOCK
        t0 = clock()
        os.pwrite(fd, buf, offset)
        starts.append(t0)
        ends.append(clock())


class Writers:
    """``count`` writer processes on ``path`` (fork, so no pickling of this script)."""

    def __init__(self, path: Path, size: int, count: int = 4):
        """Start the writers at once."""
        ctx = mp.get_context("fork")
        self.stop_event = ctx.Event()
        self.links = []
        for i in range(count):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_writer, args=(str(path), size, 7000 + i, self.stop_event, send),
                               daemon=True)
            proc.start()
            send.close()
            self.links.append((recv, proc))

    def stop(self) -> tuple[list[tuple[array, array]], list[str]]:
        """Stop the writers; return their (starts, ends) arrays and any errors."""
        self.stop_event.set()
        timings, errors = [], []
        for recv, proc in self.links:
            try:
                if not recv.poll(120):
                    raise EOFError("writer did not answer")
                starts, ends, error = recv.recv()
                timings.append((array("q", starts), array("q", ends)))
                if error:
                    errors.append(error)
            except EOFError as exc:
                errors.append(str(exc))
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        return timings, errors


def window_max(timings: list[tuple[array, array]], t0: int, t1: int) -> int:
    """Longest write (ns) among those overlapping [t0, t1]. Each writer's writes are
    sequential, so starts and ends are sorted and bisect finds the overlap."""
    best = 0
    for starts, ends in timings:
        first = bisect.bisect_right(ends, t0)
        last = bisect.bisect_left(starts, t1)
        for k in range(first, last):
            best = max(best, ends[k] - starts[k])
    return best


def run_take_test(c: Contender, cfg: Config, res: Results) -> None:
    """``cfg.takes`` takes while 4 writers run; per take, the longest write that
    overlapped the take (writers' view). For scale, the same is measured in a window
    as long as the take placed 50 ms after the snapshot's release (no take running)."""
    log(f"take latency on {c.name}: {cfg.takes} takes, 4 writers")
    takes: list[Take] = []
    quiet: list[tuple[int, int]] = []
    writers = Writers(c.device, c.size)
    try:
        time.sleep(0.5)
        for _ in range(cfg.takes):
            take = c.take()
            takes.append(take)
            time.sleep(cfg.hold)
            c.release()
            start = time.monotonic_ns() + 50_000_000
            quiet.append((start, start + take.t1 - take.t0))
            time.sleep(max(cfg.hold, (quiet[-1][1] - time.monotonic_ns()) / 1e9 + 0.05))
    finally:
        timings, errors = writers.stop()
    if errors:
        raise BenchError(f"writers failed: {'; '.join(errors[:3])}")
    record_takes(c.name, takes, quiet, timings, res)


def record_takes(who: str, takes: list[Take], quiet: list[tuple[int, int]], timings: list,
                 res: Results) -> None:
    """Percentiles of the per-take longest waits, the quiet-window baseline, the
    daemon's own numbers, and the writers' overall latency."""
    waits = [window_max(timings, t.t0, t.t1) / 1e6 for t in takes]
    base = [window_max(timings, t0, t1) / 1e6 for t0, t1 in quiet]
    res.add("take_wait_p50", who, percentile(waits, 50))
    res.add("take_wait_p99", who, percentile(waits, 99))
    res.add("take_base_p50", who, percentile(base, 50))
    blocks = [t.block_ms for t in takes if t.block_ms is not None]
    if blocks:
        res.add("take_block_p99", who, percentile(blocks, 99))
    latencies = [e - s for starts, ends in timings for s, e in zip(starts, ends, strict=True)]
    if latencies:
        res.add("writer_lat_p99", who, percentile(latencies, 99) / 1e6)
    command_ms = [(t.t1 - t.t0) / 1e6 for t in takes]
    res.add("take_cmd_p50", who, percentile(command_ms, 50))
    res.extra[who] |= {"take_waits_ms": waits, "quiet_window_waits_ms": base, "take_block_ms": blocks,
                       "take_command_ms": command_ms, "writes_during_take_test": len(latencies)}
    log(f"  {who}: longest wait p50 {percentile(waits, 50):.1f} ms, p99 {percentile(waits, 99):.1f} ms"
        f" (quiet windows p50 {percentile(base, 50):.1f} ms)")
