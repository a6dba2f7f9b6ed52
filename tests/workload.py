"""Concurrent writers with a timed log, and the model that says what an image must
contain.

Each writer owns a disjoint region of a device, so the device's final content is
determined by applying every writer's log in order. Around a take, a writer's log
splits into writes that ended before the take began (must be in the image), writes
that started after it ended (must not), and a few in between (either): the image
must equal the region after some prefix of the log in that window.

One write() may reach snapfs as several FUSE requests (the kernel ends a request at
a partial page that is not cached), so the take can fall between two requests of one
syscall, as it can between two bios on a block device. The model therefore also
accepts, for the first write not in the image, a *torn* prefix: its bytes up to a
4096-aligned file offset applied, the rest not. Nothing else is accepted.
"""

import hashlib
import mmap
import os
import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Write:
    start: float
    end: float
    offset: int
    data: bytes


@dataclass(eq=False)
class Writer(threading.Thread):
    path: str
    lo: int
    hi: int
    seed: int
    direct: bool = False
    max_size: int = 300_000
    log: list[Write] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self):
        threading.Thread.__init__(self, daemon=True)
        self.stop_event = threading.Event()

    def run(self):
        try:
            self._run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _run(self):
        rnd = random.Random(self.seed)
        flags = os.O_WRONLY | (os.O_DIRECT if self.direct else 0)
        fd = os.open(self.path, flags)
        buf = mmap.mmap(-1, 1 << 20) if self.direct else None
        try:
            while not self.stop_event.is_set():
                offset, data = self._next(rnd)
                t0 = time.monotonic()
                if buf is not None:
                    buf[: len(data)] = data
                    n = os.pwritev(fd, [memoryview(buf)[: len(data)]], offset)
                else:
                    n = os.pwrite(fd, data, offset)
                assert n == len(data), (n, len(data))
                self.log.append(Write(t0, time.monotonic(), offset, data))
                time.sleep(rnd.random() * 0.002)
        finally:
            os.close(fd)

    def _next(self, rnd: random.Random) -> tuple[int, bytes]:
        if self.direct:
            size = rnd.randrange(1, 64) * 4096
            offset = rnd.randrange(self.lo // 4096, (self.hi - size) // 4096) * 4096
        else:
            size = rnd.randrange(1, self.max_size)
            offset = rnd.randrange(self.lo, self.hi - size)
        return offset, rnd.randbytes(size)

    def stop(self):
        self.stop_event.set()
        self.join(30)
        assert not self.is_alive(), "writer hung"
        if self.error:
            raise self.error


def apply(region: bytearray, lo: int, writes: list[Write]) -> None:
    for w in writes:
        region[w.offset - lo : w.offset - lo + len(w.data)] = w.data


def region_candidates(initial: bytes, writer: Writer, t0: float, t1: float):
    """Yield (content, next write) for every whole-write prefix the image may hold for
    this writer, for a take that began at t0 and ended at t1."""
    log = list(writer.log)
    done = [w for w in log if w.end < t0]
    maybe = [w for w in log[len(done) :] if w.start < t1]
    region = bytearray(initial[writer.lo : writer.hi])
    apply(region, writer.lo, done)
    for w in maybe:
        yield bytes(region), w
        apply(region, writer.lo, [w])
    yield bytes(region), None


def torn(base: bytes, got: bytes, lo: int, w: Write) -> bool:
    """Is ``got`` equal to ``base`` with a page-aligned prefix of write ``w`` applied?"""
    a, b = w.offset - lo, w.offset - lo + len(w.data)
    if got[:a] != base[:a] or got[b:] != base[b:]:
        return False
    seg, old = got[a:b], base[a:b]
    split = next((i for i in range(4096 - w.offset % 4096, len(seg), 4096)
                  if seg[:i] == w.data[:i] and seg[i:] == old[i:]), None)
    return split is not None


def take_time_content(initial: bytes, image: bytes, writers: list[Writer], t0: float, t1: float) -> bytes:
    """The legal take-time content equal to ``image`` if there is one (per writer
    region: a whole-write prefix, or one torn write after it); else the region after
    the writes that surely preceded the take, which then mismatches and is reported."""
    expected = bytearray(initial)
    for w in writers:
        got = image[w.lo : w.hi]
        candidates = list(region_candidates(initial, w, t0, t1))
        match = next((c for c, nxt in candidates
                      if c == got or (nxt is not None and torn(c, got, w.lo, nxt))), None)
        expected[w.lo : w.hi] = got if match is not None else candidates[0][0]
    return bytes(expected)


def final_content(initial: bytes, writers: list[Writer]) -> bytes:
    model = bytearray(initial)
    for w in writers:
        apply(model, 0, w.log)
    return bytes(model)


def chunk_mismatches(a: bytes, b: bytes, chunk: int) -> list[int]:
    """Chunk indices whose sha256 differ (the per-chunk report)."""
    return [i for i in range(0, max(len(a), len(b)), chunk)
            if hashlib.sha256(a[i : i + chunk]).digest() != hashlib.sha256(b[i : i + chunk]).digest()]


def read_direct(path: str, size: int, block: int = 1 << 20) -> bytes:
    """Read a whole file with O_DIRECT through an aligned buffer."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, block)
    out = bytearray()
    try:
        pos = 0
        while pos < size:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                break
            out += buf[:n]
            pos += n
    finally:
        os.close(fd)
    return bytes(out)
