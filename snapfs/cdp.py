"""Continuous data protection: a device's undo journal (``Recorder``) and views of
past instants (``CdpView``), docs/design.md §9.

Write hook (``Recorder.before_write``, called by ``Tracker`` after the CBT mark and
before COW and the source write; ``after_write`` once the source write returned):
    1. overlapping writes are taken one at a time in admission order: a write waits
       until every earlier admitted write that overlaps it has finished (its source
       write included), so the old data it reads next is what the source held after
       them (J1);
    2. read the old data of the range from the source, append it as records (time
       taken on the trio thread when the record is placed: strictly growing), wait
       until the records are written and published in order (J2);
    3. return: the source write may go ahead.
Every failure of the journal (storage full, I/O error, a limit that views or RETAIN
do not let it meet) stops the journal (``fail``: a ``cdp_stopped`` event on every
view, which then fails with EIO) and never the device write.

Invariants:
    J1 overlapping writes reach the source in admission order, each after the one
       before it was journaled and written;
    J2 a record is in the index (published) before the source write it precedes
       starts, and records are published in time order: a view reading the source
       for a range with no record after its instant, and finding afterwards that no
       record touching that range was published meanwhile, read data no write after
       its instant had changed;
    J3 a segment is dropped only if no view needs it (every segment from the one
       holding a view's first record after its instant) and RETAIN allows it;
    J4 a window (``Windows``) equals the source as it is once the writes in flight
       are done: it is kept only when no other write was in flight over its range
       while it was read, and none was published there meanwhile; each later write
       inside it takes its old data from it and puts its new data in (J1 orders
       overlapping ones); a write over part of it, a discard or a failed source write
       drops it.
A view at T reads, per byte, the old data of the earliest record after T that
covers it, else the source (``journal.Index.resolve``).
"""

import contextlib
import errno
import logging
import os
import stat
import time
import zlib

import trio

from . import workers
from .commands import parse_instant
from .diffarea import DiffArea
from .diffstorage import DiffStorage
from .errors import SnapfsError
from .events import EventLog
from .fileio import FileIO
from .guard import Guard
from .journal import (
    HEADER,
    KIND_MARK,
    KIND_WRITE,
    RECORD_MAX,
    Index,
    Record,
    list_segments,
    lock,
    pack,
    scan,
    segment_name,
)
from .namespace import View
from .params import Params, chunk_size
from .snapshot import Image, Snapshot
from .tracker import Tracker

log = logging.getLogger(__name__)

SEGMENT_MIN, SEGMENT_MAX = 1 << 20, 64 << 20
LIMIT_MIN = 4 << 20
SCRATCH_MINIMUM = 64 << 20       # a view's scratch area grows by this
WINDOW = 256 << 10               # a small write's old data is read this far ahead (J4)
WINDOWS = 4                      # windows kept
BATCH = 8                        # a view read of more pieces reads them in one thread call
VERIFY_RECORDS = 256             # newest records checked against the source at resume


def segment_size(limit: int) -> int:
    return max(SEGMENT_MIN, min(SEGMENT_MAX, limit // 16))


class Segment:
    """One segment file: its number, fd, data path, bytes placed, first record."""

    def __init__(self, directory: str, number: int, fd: int, size: int = 0):
        self.number = number
        self.path = os.path.join(directory, segment_name(number))
        self.fd = fd
        self.io = FileIO(fd, self._pread, self._pwrite)
        self.size = size
        self.first: int | None = None       # number of its first write record
        self.last_time = 0

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, "short read from the journal")
        return data

    def fdatasync(self) -> None:
        os.fdatasync(self.fd)

    def _pwrite(self, offset: int, data) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def open_segment(directory: str, number: int) -> Segment:
    """Create segment ``number`` (blocking: a worker thread)."""
    path = os.path.join(directory, segment_name(number))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return Segment(directory, number, fd)


class Windows:
    """A few ranges of the source as they are once the writes in flight are done
    (read ahead by ``Recorder._read_old``, J4): a sequential writer's old data comes
    from here instead of a disk read per write. Most recently used last."""

    def __init__(self) -> None:
        self.items: list[tuple[int, bytearray]] = []

    def take(self, offset: int, length: int, new) -> bytes | None:
        """The old data of [offset, offset+length) if a window holds all of it (the
        window then holds ``new`` there); windows holding part of it are dropped.
        None when no window holds it (or ``new`` is None: a discard)."""
        end, hit, keep = offset + length, None, []
        for item in self.items:
            start, data = item
            if start <= offset and end <= start + len(data) and new is not None:
                hit = item
            elif offset < start + len(data) and start < end:
                continue
            else:
                keep.append(item)
        if hit is None:
            self.items = keep
            return None
        self.items = [*keep, hit]
        start, data = hit
        old = bytes(data[offset - start : end - start])
        data[offset - start : end - start] = new
        return old

    def put(self, start: int, data: bytearray) -> None:
        self.drop(start, start + len(data))
        self.items = [*self.items[1 - WINDOWS:], (start, data)]

    def drop(self, start: int, end: int) -> None:
        self.items = [(s, d) for s, d in self.items if not (s < end and start < s + len(d))]


class Recorder:
    """The journal of one device (module docstring). Trio thread only, except the
    blocking helpers handed to worker threads."""

    def __init__(self, tracker: Tracker, directory: str, limit: int, retain_ns: int, lock_fd: int):
        self.tracker = tracker
        self.directory = directory
        self.limit = limit
        self.retain_ns = retain_ns
        self.lock_fd = lock_fd
        self.segment_size = segment_size(limit)
        self.segments: dict[int, Segment] = {}
        self.index = Index()
        self.marks: dict[str, tuple[int, int]] = {}      # label -> (time_ns, segment)
        self.seq = 0
        self.last_time = 0
        self.started_ns = time.time_ns()
        self.oldest_ns = self.started_ns
        self.used = 0
        self.bytes_in = 0
        self.running = True
        self.stopped: dict | None = None
        self.reset: dict | None = None
        self.views: set[CdpView] = set()
        self._ranges: dict[int, tuple[int, int, trio.Event]] = {}
        self._admitted = 0
        self._placed = 0                 # records placed (publication order)
        self._done: dict[int, tuple] = {}
        self._published = 0
        self._publication = trio.Event()
        self._opening: trio.Event | None = None
        self._spare: Segment | None = None
        self._windows = Windows()
        self.window_hits = 0             # records whose old data came from a window

    @property
    def current(self) -> Segment | None:
        return self.segments[max(self.segments)] if self.segments else None

    # ----- the write hook ----------------------------------------------------------

    async def before_write(self, offset: int, length: int, new) -> int:
        """Steps 1-2 of the module docstring; returns the ticket for ``after_write``.
        Raises only on cancellation (then the ticket is released here)."""
        ticket = self._admitted
        self._admitted += 1
        end = offset + length
        earlier = [ev for s, e, ev in self._ranges.values() if s < end and offset < e]
        self._ranges[ticket] = (offset, end, trio.Event())
        try:
            for ev in earlier:
                await ev.wait()
            if self.running and length > 0:
                await self._capture(ticket, offset, length, new)
        except BaseException:
            self.after_write(ticket, False)
            raise
        return ticket

    def after_write(self, ticket: int, done: bool) -> None:
        """The source write of ``ticket`` returned (``done``) or failed: later
        overlapping writes may go on (a failed one's range leaves the windows)."""
        entry = self._ranges.pop(ticket, None)
        if entry is not None:
            if not done:
                self._windows.drop(entry[0], entry[1])
            entry[2].set()

    async def _capture(self, ticket: int, offset: int, length: int, new) -> None:
        try:
            for pos in range(offset, offset + length, RECORD_MAX):
                size = min(RECORD_MAX, offset + length - pos)
                piece = new[pos - offset : pos - offset + size] if new is not None else None
                old = self._windows.take(pos, size, piece)
                self.window_hits += old is not None
                if old is None:
                    old = await self._read_old(ticket, pos, size, piece)
                crc_new = zlib.crc32(piece) if piece is not None else 0
                await self._append(KIND_WRITE, pos, old, crc_new)
            self.bytes_in += length
        except (OSError, SnapfsError) as exc:
            self.fail(f"journal write failed: {exc}")

    async def _read_old(self, ticket: int, pos: int, size: int, new) -> bytes:
        """The old data of [pos, pos+size) from the source; a write smaller than
        WINDOW reads WINDOW bytes and keeps them as a window (with its new data in it)
        when no other write touched that range meanwhile (module docstring, J4)."""
        want = min(max(size, WINDOW), self.tracker.capacity - pos) if new is not None else size
        end = pos + want
        quiet = want > size and not self._busy(ticket, pos, end)
        mark = self.index.next
        data = await self.tracker.source.io.read(pos, want)
        if quiet and not self._busy(ticket, pos, end) and not self.index.overlaps(mark, pos, end):
            window = bytearray(data)
            window[:size] = new
            self._windows.put(pos, window)
        else:
            self._windows.drop(pos, end)
        return data[:size]

    def _busy(self, ticket: int, start: int, end: int) -> bool:
        """Whether a write in flight other than ``ticket`` touches [start, end)."""
        return any(s < end and start < e for t, (s, e, _) in self._ranges.items() if t != ticket)

    async def _append(self, kind: int, offset: int, payload, crc_new: int = 0) -> int:
        """Place one record, write it, wait until it is published; its time."""
        size = HEADER.size + len(payload)
        seg = await self._room(size)
        if not self.running:
            raise SnapfsError(errno.EIO, "the journal stopped")
        now = max(time.time_ns(), self.last_time + 1)       # no await from here to the write
        self.last_time = now
        rec = Record(kind, self.seq, now, offset, len(payload), zlib.crc32(payload), crc_new)
        self.seq += 1
        pos, seg.size = seg.size, seg.size + size
        self.used += size
        order, self._placed = self._placed, self._placed + 1
        try:
            await seg.io.write(pos, pack(rec) + bytes(payload))
        except BaseException:
            self._done[order] = None
            self._publish()
            raise
        self._done[order] = (kind, now, offset, len(payload), seg, pos + HEADER.size, payload)
        self._publish()
        while self._published <= order:
            await self._publication.wait()
        return now

    def _publish(self) -> None:
        """Publish placed records in order, as far as they are written (J2)."""
        woke = False
        while self._published in self._done:
            item = self._done.pop(self._published)
            self._published += 1
            woke = True
            if item is None:
                continue
            kind, now, offset, length, seg, pos, payload = item
            seg.last_time = now
            if kind == KIND_WRITE:
                n = self.index.add(now, offset, length, seg.number, pos)
                if seg.first is None:
                    seg.first = n
            else:
                self.marks[bytes(payload).decode()] = (now, seg.number)
        if woke:
            self._publication.set()
            self._publication = trio.Event()

    async def _room(self, size: int) -> Segment:
        """A segment with room for ``size`` more bytes, dropping the oldest segments
        to stay within the limit (J3); SnapfsError(ENOSPC) when it cannot."""
        while True:
            while self.used + size > self.limit:
                await self._drop_oldest(size)
            seg = self.current
            if seg is not None and (seg.size + size <= self.segment_size or seg.size == 0):
                return seg
            if self._spare is not None:
                self._add_segment(self._spare)
                self._spare = None
                continue
            await self._open_next()

    def _add_segment(self, seg: Segment) -> None:
        self.segments[seg.number] = seg

    async def _open_next(self) -> None:
        if self._opening is not None:
            await self._opening.wait()
            return
        self._opening = trio.Event()
        try:
            number = max(self.segments) + 1 if self.segments else 0
            self._spare = await workers.run(open_segment, self.directory, number)
        finally:
            self._opening.set()
            self._opening = None

    async def _drop_oldest(self, size: int) -> None:
        """Drop the oldest segment, if a view and RETAIN let it go (J3)."""
        numbers = sorted(self.segments)
        if len(numbers) < 2:
            raise SnapfsError(errno.ENOSPC, f"a record of {size} bytes does not fit the limit {self.limit}")
        oldest = self.segments[numbers[0]]
        pinned = min((v.pin for v in self.views), default=None)
        if pinned is not None and pinned <= oldest.number:
            raise SnapfsError(errno.ENOSPC, "the journal is full and a view still needs its oldest history")
        if self.retain_ns and oldest.last_time > time.time_ns() - self.retain_ns:
            raise SnapfsError(errno.ENOSPC, "the journal is full within the RETAIN time")
        del self.segments[oldest.number]
        nxt = self.segments[numbers[1]]
        self.index.drop_before(nxt.first if nxt.first is not None else self.index.next)
        self.oldest_ns = max(self.oldest_ns, oldest.last_time)
        self.marks = {k: v for k, v in self.marks.items() if v[1] != oldest.number}
        self.used -= oldest.size
        await workers.run(_remove, oldest)

    # ----- durability, marks, stop -----------------------------------------------

    async def sync(self) -> None:
        """Make every record written so far durable (before a device fsync), sharing
        flushes with concurrent callers (``FileIO.sync``). A failure stops the
        journal; it never fails the fsync."""
        for number, seg in list(self.segments.items()):
            if self.running and number in self.segments and seg.io.durable < seg.io.written:
                try:
                    await seg.io.sync(seg.fdatasync)
                except OSError as exc:
                    if number in self.segments:    # else dropped meanwhile: nothing to keep
                        self.fail(f"journal fsync failed: {exc}")

    async def mark(self, label: str) -> int:
        """Record a named instant; its time (ns). EEXIST label taken, EIO stopped."""
        if not self.running:
            raise SnapfsError(errno.EIO, f"the journal of {self.tracker.name} is stopped")
        if label in self.marks:
            raise SnapfsError(errno.EEXIST, f"mark {label!r} exists")
        try:
            return await self._append(KIND_MARK, 0, label.encode())
        except (OSError, SnapfsError) as exc:
            self.fail(f"journal write failed: {exc}")
            raise SnapfsError(errno.EIO, f"the journal of {self.tracker.name} stopped: {exc}") from None

    def fail(self, reason: str) -> None:
        """Stop journaling (the device writes go on): every view is ended."""
        if not self.running:
            return
        self.running = False
        self.stopped = {"time": time.time_ns() / 1e9, "reason": reason}
        log.warning("journal of %s stopped: %s", self.tracker.name, reason)
        for view in list(self.views):
            view.events.post("cdp_stopped", device=self.tracker.name, reason=reason)
            for area in view.areas.values():
                area.corrupt(errno.EIO)

    def close(self, sync: bool) -> None:
        """Close every fd, after an fdatasync with ``sync`` (blocking; the files
        stay for the next mount). OSError from the sync (every fd is closed)."""
        segs = [*self.segments.values(), *([self._spare] if self._spare else [])]
        self.segments.clear()
        self._spare = None
        try:
            for seg in segs:
                if sync and seg.io.durable < seg.io.written:
                    os.fdatasync(seg.fd)
        finally:
            for seg in segs:
                os.close(seg.fd)
            os.close(self.lock_fd)

    def config(self) -> dict:
        """What state.py records to take this journal up again."""
        return {"device": self.tracker.name, "storage": self.directory, "limit": self.limit,
                "retain_ns": self.retain_ns, "started_ns": self.oldest_ns,
                "generation": self.tracker.cbt.generation_id}

    def remove_files(self) -> None:
        """cdp_stop: close and delete the journal (blocking)."""
        segs = [*self.segments.values(), *([self._spare] if self._spare else [])]
        self.segments.clear()
        self._spare = None
        for seg in segs:
            _remove(seg)
        os.close(self.lock_fd)

    # ----- views ------------------------------------------------------------------

    def instant(self, when: str) -> tuple[int, str]:
        """WHEN (UNIX seconds, ISO-8601 UTC, or a mark's label) -> (ns, label or "")."""
        if when in self.marks:
            return self.marks[when][0], when
        ns = parse_instant(when)
        if ns is None:
            raise SnapfsError(errno.EINVAL, f"{when[:64]!r} is neither a time nor a mark of "
                              f"{self.tracker.name}")
        return ns, ""

    def check_viewable(self, ns: int) -> None:
        if not self.running:
            raise SnapfsError(errno.EIO, f"the journal of {self.tracker.name} is stopped")
        if ns < self.oldest_ns:
            raise SnapfsError(errno.ERANGE, f"{ns / 1e9:.6f} is before the oldest instant kept "
                              f"({self.oldest_ns / 1e9:.6f})")
        if ns > time.time_ns():
            raise SnapfsError(errno.EINVAL, f"{ns / 1e9:.6f} is in the future")

    def pin_for(self, since: int) -> int:
        """The oldest segment a view whose first record is ``since`` needs."""
        if since < self.index.next and since >= self.index.base:
            return self.index.segments[since - self.index.base]
        seg = self.current
        return seg.number if seg is not None else 0

    def info(self) -> dict:
        newest = self.index.times[-1] if len(self.index) else self.started_ns
        return {
            "device": self.tracker.name, "storage": self.directory, "used": self.used,
            "limit": self.limit, "retain": self.retain_ns / 1e9, "segments": len(self.segments),
            "oldest": -(-self.oldest_ns // 1000) / 1e6,      # rounded up: a viewable instant
            "newest": max(newest, self.last_time) // 1000 / 1e6,
            "writes": self.index.next, "bytes_written": self.bytes_in,
            "marks": {label: t / 1e9 for label, (t, _) in sorted(self.marks.items(), key=lambda m: m[1])},
            "state": "running" if self.running else "stopped", "stopped": self.stopped,
            "history_reset": self.reset, "views": len(self.views), "index_bytes": self.index.memory(),
            "window_hits": self.window_hits,
        }


def start_blocking(tracker: Tracker, guard: Guard, storage: str, limit: int, retain_ns: int,
                   view: View) -> Recorder:
    """Blocking (a worker thread): a new journal of ``tracker`` in the directory
    ``storage`` (where ``view`` sees it), refused as a difference storage would be
    (stack.py); segments a stopped journal left there are removed."""
    guard.elsewhere = view.fstypes()
    target = view.resolve(storage)
    try:
        try:
            st = os.stat(target.path)
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"journal {storage}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise SnapfsError(errno.EINVAL, f"journal {storage}: not a directory")
        reason = guard.why_not(st, True)
        if reason:
            raise SnapfsError(errno.EINVAL, f"journal {storage}: {reason}")
        directory = os.path.realpath(target.path) if not target.shown else target.path
        if target.shown:
            raise SnapfsError(errno.EXDEV, f"journal {target.shown}: name a directory the daemon sees "
                              "(journals are taken up again by path)")
    finally:
        target.close()
    lock_fd = lock(directory)
    try:
        for number in list_segments(directory):
            os.unlink(os.path.join(directory, segment_name(number)))
        return Recorder(tracker, directory, limit, retain_ns, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def resume_blocking(tracker: Tracker, config: dict) -> Recorder:
    """Blocking: take up the journal ``config`` (state.py) names: read every segment
    back (a torn tail is cut), rebuild the index and marks, and check the source: a
    source the CBT cannot vouch for (a new generation) must still hold the data of
    the newest journaled writes, else the history is reset (``reset`` says why)."""
    directory = config["storage"]
    rec = Recorder(tracker, directory, int(config["limit"]), int(config["retain_ns"]), lock(directory))
    try:
        newest = _read_back(rec)
        numbers = sorted(rec.segments)
        rec.oldest_ns = int(config["started_ns"])
        if numbers and numbers[0] != 0 and len(rec.index):
            rec.oldest_ns = max(rec.oldest_ns, rec.index.times[0])
        why = None
        if config.get("generation") != tracker.cbt.generation_id:
            why = _source_differs(tracker, newest)
        if why:
            _reset(rec, why)
    except BaseException:
        rec.close(sync=False)
        raise
    log.info("took up the CDP journal of %s: %d writes, %d bytes", tracker.name, rec.index.next, rec.used)
    return rec


def _read_back(rec: Recorder) -> list[Record]:
    """Segments read into ``rec`` (blocking); the newest VERIFY_RECORDS write records."""
    newest: list[Record] = []
    numbers = list_segments(rec.directory)
    for k, number in enumerate(numbers):
        path = os.path.join(rec.directory, segment_name(number))
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        seg = Segment(rec.directory, number, fd)
        rec.segments[number] = seg
        found, valid = scan(fd, verify_data=k == len(numbers) - 1)
        if valid < os.fstat(fd).st_size:
            log.warning("journal segment %s: torn tail cut at %d", path, valid)
            os.ftruncate(fd, valid)
        seg.size = valid
        rec.used += valid
        for r, pos in found:
            seg.last_time = rec.last_time = r.time_ns
            rec.seq = r.seq + 1
            if r.kind == KIND_WRITE:
                n = rec.index.add(r.time_ns, r.offset, r.length, number, pos)
                seg.first = n if seg.first is None else seg.first
                newest = [*newest[1 - VERIFY_RECORDS:], r]
            else:
                rec.marks[os.pread(fd, r.length, pos).decode()] = (r.time_ns, number)
    return newest


def _source_differs(tracker: Tracker, newest: list[Record]) -> str | None:
    """Why the source is not what the journal's newest writes left (blocking), or None."""
    covered: list[tuple[int, int]] = []
    for r in reversed(newest):
        end = r.offset + r.length
        if end > tracker.capacity:
            return "the source is smaller than the journal's writes"
        if not any(a < end and r.offset < b for a, b in covered):
            crc = zlib.crc32(os.pread(tracker.source.fd, r.length, r.offset))
            if crc not in (r.crc_new, r.crc_old):
                return (f"the source changed behind snapfs (CBT generation is new and the write "
                        f"at {r.offset} journaled at {r.time_ns / 1e9:.6f} is not in it)")
        covered.append((r.offset, end))
    return None


def _reset(rec: Recorder, why: str) -> None:
    """End the history: every segment removed, the journal starts again now."""
    log.warning("CDP journal of %s: history reset: %s", rec.tracker.name, why)
    for seg in list(rec.segments.values()):
        _remove(seg)
    rec.segments.clear()
    rec.index = Index()
    rec.marks.clear()
    rec.used = 0
    rec.oldest_ns = rec.started_ns = time.time_ns()
    rec.reset = {"time": rec.oldest_ns / 1e9, "reason": why}


def open_scratch(rec: Recorder, params: Params, on_grow) -> DiffStorage:
    """Blocking: a view's scratch area for writes to it, an unnamed file in the
    journal's directory (gone with the view)."""
    cap = rec.tracker.capacity
    return DiffStorage.open(rec.directory, cap + chunk_size(cap, params), min(params.diff_storage_minimum,
                            SCRATCH_MINIMUM), lambda st: None, on_grow=on_grow)


def _remove(seg: Segment) -> None:
    try:
        os.close(seg.fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg.path)


# ----- views ------------------------------------------------------------------------

class _PastSource:
    """The device as it was at a view's instant, read through the journal: the
    "source" of the view's DiffArea (which adds the scratch area for writes)."""

    def __init__(self, view: "CdpView"):
        self.view = view
        self.io = self

    async def read(self, offset: int, size: int, prio: int = 0) -> bytes:
        view = self.view
        rec, index = view.recorder, view.recorder.index
        source = rec.tracker.source
        while True:
            if not rec.running:
                raise OSError(errno.EIO, "the journal stopped")
            mark = index.next
            pieces = index.resolve(view.since, offset, offset + size)
            reads = _reads(index, pieces)
            if len(reads) > BATCH:     # many small pieces: one worker-thread call reads them all
                data = await workers.run(_pread_all, [(source.fd if seg is None else rec.segments[seg].fd,
                                                       pos, length) for seg, pos, length in reads])
            else:
                parts = []
                for seg, pos, length in reads:
                    io = source.io if seg is None else rec.segments[seg].io
                    parts.append(await io.read(pos, length, prio))
                data = b"".join(parts)
            if not any(n < 0 and index.overlaps(mark, a, z) for a, z, n in pieces):
                return data


def _pread_all(reads: list[tuple[int, int, int]]) -> bytes:
    """Blocking (a worker thread): the reads (fd, position, length) one after the
    other, joined. OSError(EIO) on a short read. The fds stay open meanwhile: a view's
    segments are pinned (J3) and a view is destroyed, its reads drained, before its
    journal closes them."""
    out = bytearray()
    for fd, pos, length in reads:
        data = os.pread(fd, length, pos)
        if len(data) != length:
            raise OSError(errno.EIO, "short read of a view")
        out += data
    return bytes(out)


def _reads(index: Index, pieces: list[tuple[int, int, int]]) -> list[tuple[int | None, int, int]]:
    """Pieces -> reads (segment or None for the source, position, length), records
    contiguous in one segment merged."""
    out: list[list] = []
    for a, z, n in pieces:
        seg, pos = (None, a) if n < 0 else index.where(n, a)
        if out and out[-1][0] == seg and seg is not None and out[-1][1] + out[-1][2] == pos:
            out[-1][2] += z - a
        else:
            out.append([seg, pos, z - a])
    return [(s, p, n) for s, p, n in out]


class ViewImage(Image):
    """A view's image: writes go to its scratch area only (no CBT marks: the device
    is not written)."""

    async def write(self, offset: int, data) -> int:
        self.area.check_usable()
        if len(data) and offset >= self.area.capacity:
            raise SnapfsError(errno.ENOSPC, "write past the end of the image")
        n = min(len(data), self.area.capacity - offset)
        await self.area.write(offset, memoryview(data)[:n])
        return n


class CdpView(Snapshot):
    """A device as it was at an instant, shown like a snapshot image (its storage is
    the scratch area for writes to it). Pins the journal history it needs (J3)."""

    def __init__(self, recorder: Recorder, instant_ns: int, label: str, scratch: DiffStorage,
                 params: Params, events: EventLog):
        super().__init__(scratch, params, events)
        t = recorder.tracker
        self.recorder = recorder
        self.instant_ns = instant_ns
        self.label = label
        self.since = recorder.index.first_after(instant_ns)
        self.pin = recorder.pin_for(self.since)
        self.trackers = {t.name: t}
        self.areas = {t.name: DiffArea(t.name, _PastSource(self), t.capacity, chunk_size(t.capacity, params),
                                       scratch, self.events)}
        self.taken = True
        self.taken_ns = time.time_ns()
        recorder.views.add(self)

    def add(self, tracker: Tracker) -> None:
        raise SnapfsError(errno.EINVAL, "a CDP view has its one device")

    def destroy(self) -> DiffStorage:
        for area in self.areas.values():
            area.close()
        self.destroyed = True
        self.recorder.views.discard(self)
        self.storage.retire()
        self.events.close()
        return self.storage

    def image(self, name: str, prio: int = 0) -> Image:
        return ViewImage(self.trackers[name], self.areas[name], prio)

    def info(self) -> dict:
        return super().info() | {"cdp": {"device": self.recorder.tracker.name,
                                         "instant": self.instant_ns / 1e9, "mark": self.label}}
