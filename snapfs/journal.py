"""The CDP journal: its on-disk format and its in-memory index (docs/design.md §9).

An UNDO journal: before a device write reaches the source, the data it overwrites is
appended here. A journal is a directory (the STORAGE of ``cdp_start``) of segment
files, written in order and dropped whole, oldest first::

    STORAGE/lock                     flock'ed while a mount journals into it
    STORAGE/seg-<16 hex digits>.cdp  segment N, appended to in order

A mount records each journal it runs (``JournalStates``) so that the next mount of
the source takes it up again::

    STATE_DIR/cdp/<key>.json         key = sha256 of the source's real path, 32 hex digits

one JSON object, written atomically at ``cdp_start`` and at a clean stop, removed at
``cdp_stop``: format "snapfs-cdp", version 1, device (the name), storage (the journal
directory), limit (bytes), retain_ns, started_ns (the oldest instant it holds),
generation (the CBT generation_id when written: cdp.py checks the source against the
newest records when it differs).

A segment is a sequence of records; each is a 48-byte header (``HEADER``, little
endian) and its payload:

    magic    u32  0x52504443 ("CDPR")
    kind     u16  1: write (payload: the old bytes of [offset, offset+length) of the
                  source), 2: mark (payload: its label, UTF-8)
    flags    u16  0
    length   u32  payload bytes
    hcrc     u32  CRC-32 of the header with this field 0
    seq      u64  record number, +1 per record, never reused
    time_ns  u64  the instant of the record (UNIX ns): writes that returned before it
                  are in the source before the record's old data was read
    offset   u64  byte offset on the device (write) / 0 (mark)
    crc_old  u32  CRC-32 of the payload
    crc_new  u32  CRC-32 of the new data the write put there (write; 0 for a mark):
                  lets a new mount check the source still holds what was written

Records never cross segments. A torn record (short, bad hcrc or crc_old) ends a
segment when it is read back (``scan``): everything after it in that segment is
ignored. Times grow strictly with seq (``Index.add`` is given them in order).

``Index`` holds, per record, time, offset, length, segment and payload position in
arrays (the ``array`` module: 32 bytes per record), and per 64 KiB block of the device
the record numbers that touch it, so that a view of instant T is a bisect on time
(``first_after``) and a read of a range of it walks only the records of its blocks
from that number on (``resolve``). Trio-free and synchronous; the blocking segment
I/O helpers run in worker threads (cdp.py).
"""

import bisect
import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import zlib
from array import array
from dataclasses import dataclass

from .osutil import lock_exclusive, replace_file

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IHHIIQQQII")
MAGIC = 0x52504443
KIND_WRITE, KIND_MARK = 1, 2
BLOCK_SHIFT = 16                 # index blocks of 64 KiB
RECORD_MAX = 1 << 20             # a write's old data is split into records of at most this
SEGMENT_RE = re.compile(r"seg-([0-9a-f]{16})\.cdp")


@dataclass(frozen=True)
class Record:
    kind: int
    seq: int
    time_ns: int
    offset: int
    length: int
    crc_old: int
    crc_new: int


def pack(rec: Record) -> bytes:
    """The header of ``rec`` (hcrc filled in)."""
    fields = [MAGIC, rec.kind, 0, rec.length, 0, rec.seq, rec.time_ns, rec.offset, rec.crc_old, rec.crc_new]
    fields[4] = zlib.crc32(HEADER.pack(*fields))
    return HEADER.pack(*fields)


def unpack(data: bytes) -> Record | None:
    """The record whose header is ``data`` (HEADER.size bytes), or None if it is not one."""
    if len(data) < HEADER.size:
        return None
    magic, kind, flags, length, hcrc, seq, time_ns, offset, crc_old, crc_new = HEADER.unpack(data)
    if magic != MAGIC or kind not in (KIND_WRITE, KIND_MARK):
        return None
    if zlib.crc32(HEADER.pack(magic, kind, flags, length, 0, seq, time_ns, offset, crc_old, crc_new)) != hcrc:
        return None
    return Record(kind, seq, time_ns, offset, length, crc_old, crc_new)


def segment_name(number: int) -> str:
    return f"seg-{number:016x}.cdp"


def list_segments(directory: str) -> list[int]:
    """Numbers of the segment files in ``directory``, oldest first (blocking)."""
    found = (SEGMENT_RE.fullmatch(n) for n in os.listdir(directory))
    return sorted(int(m.group(1), 16) for m in found if m)


def lock(directory: str) -> int:
    """Open and flock ``directory/lock`` (blocking): EBUSY when another mount journals
    there. Returns the fd (closing it releases the lock)."""
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return lock_exclusive(fd, f"journal {directory}",
                          lambda: f"journal {directory} is in use by another mount")


def scan(fd: int, verify_data: bool) -> tuple[list[tuple[Record, int]], int]:
    """Read a segment back (blocking): its records with the position of each payload,
    and the length of its valid prefix. Stops at the first torn or foreign record;
    ``verify_data`` also checks each payload's CRC (the newest segment, where a crash
    may have torn the tail)."""
    size = os.fstat(fd).st_size
    found, pos = [], 0
    while pos + HEADER.size <= size:
        rec = unpack(os.pread(fd, HEADER.size, pos))
        if rec is None or pos + HEADER.size + rec.length > size:
            break
        if verify_data and zlib.crc32(os.pread(fd, rec.length, pos + HEADER.size)) != rec.crc_old:
            break
        found.append((rec, pos + HEADER.size))
        pos += HEADER.size + rec.length
    return found, pos


class JournalStates:
    """The record of the journals a mount runs (module docstring). Blocking: worker
    threads, or before the mount serves."""

    FORMAT, VERSION = "snapfs-cdp", 1
    KEYS = ("device", "storage", "limit", "retain_ns", "started_ns", "generation")

    def __init__(self, state_dir: str):
        self.dir = os.path.join(state_dir, "cdp")

    def path_for(self, source_path: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(source_path.encode()).hexdigest()[:32] + ".json")

    def load(self, source_path: str) -> dict | None:
        """The journal recorded for the source, or None; a malformed record is logged
        and ignored."""
        try:
            with open(self.path_for(source_path), "rb") as f:
                found = json.loads(f.read())
            if found.get("format") != self.FORMAT or found.get("version") != self.VERSION:
                raise ValueError("unknown format")
            return {k: found[k] for k in self.KEYS}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            log.warning("ignoring the CDP record of %s: %s", source_path, exc)
            return None

    def save(self, source_path: str, config: dict) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        path = self.path_for(source_path)
        data = json.dumps({"format": self.FORMAT, "version": self.VERSION} | config).encode()
        replace_file(path, [data], path + ".tmp", mode=0o600)

    def forget(self, source_path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_for(source_path))


class Index:
    """The write records of a journal, numbered in time order from 0 (in memory only:
    a new mount numbers them again); number n lives at row n - ``base``. Rows of
    dropped segments are cut from the front."""

    def __init__(self) -> None:
        self.base = 0                      # number of row 0
        self.next = 0                      # number of the next record
        self.times = array("q")
        self.offsets = array("q")
        self.lengths = array("i")
        self.segments = array("i")
        self.positions = array("q")
        self.blocks: dict[int, array] = {}    # 64 KiB block -> numbers of the records touching it

    def __len__(self) -> int:
        return len(self.times)

    def add(self, time_ns: int, offset: int, length: int, segment: int, position: int) -> int:
        """A write record, in time order; returns its number."""
        n = self.next
        self.next += 1
        self.times.append(time_ns)
        self.offsets.append(offset)
        self.lengths.append(length)
        self.segments.append(segment)
        self.positions.append(position)
        for b in range(offset >> BLOCK_SHIFT, ((offset + length - 1) >> BLOCK_SHIFT) + 1):
            entries = self.blocks.get(b)
            if entries is None:
                entries = self.blocks[b] = array("q")
            entries.append(n)
        return n

    def first_after(self, time_ns: int) -> int:
        """The number of the first record with a time after ``time_ns`` (``next`` if none)."""
        return self.base + bisect.bisect_right(self.times, time_ns)

    def oldest_time(self) -> int | None:
        return self.times[0] if len(self.times) else None

    def drop_before(self, n: int) -> None:
        """Forget the records numbered below ``n`` (their segment is gone)."""
        cut = min(max(0, n - self.base), len(self.times))
        for arr in (self.times, self.offsets, self.lengths, self.segments, self.positions):
            del arr[:cut]
        self.base += cut
        for b in list(self.blocks):
            entries = self.blocks[b]
            k = bisect.bisect_left(entries, self.base)
            if k == len(entries):
                del self.blocks[b]
            elif k:
                del entries[:k]

    def resolve(self, since: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """[start, end) as seen at the instant before record ``since``: pieces
        (piece start, piece end, n of the record holding its old data, or -1: the
        source), in order. Per byte, the earliest record from ``since`` on that
        covers it holds its old data; bytes no such record covers are the source's."""
        pieces: list[tuple[int, int, int]] = []
        block_end = 0
        pos = start
        while pos < end:
            b = pos >> BLOCK_SHIFT
            block_end = min(end, (b + 1) << BLOCK_SHIFT)
            pieces.extend(self._resolve_block(b, since, pos, block_end))
            pos = block_end
        return _merge(pieces)

    def _resolve_block(self, b: int, since: int, start: int, end: int) -> list[tuple[int, int, int]]:
        entries = self.blocks.get(b)
        if entries is None:
            return [(start, end, -1)]
        uncovered = [(start, end)]
        pieces = []
        base, offsets, lengths = self.base, self.offsets, self.lengths
        for k in range(bisect.bisect_left(entries, max(since, base)), len(entries)):
            n = entries[k]
            row = n - base
            r0 = offsets[row]
            r1 = r0 + lengths[row]
            left = []
            for u0, u1 in uncovered:
                if r1 <= u0 or r0 >= u1:
                    left.append((u0, u1))
                    continue
                a, z = max(u0, r0), min(u1, r1)
                pieces.append((a, z, n))
                if u0 < a:
                    left.append((u0, a))
                if z < u1:
                    left.append((z, u1))
            uncovered = left
            if not uncovered:
                break
        pieces.extend((u0, u1, -1) for u0, u1 in uncovered)
        pieces.sort()
        return pieces

    def where(self, n: int, device_offset: int) -> tuple[int, int]:
        """(segment, file position) of the byte at ``device_offset`` in record ``n``."""
        row = n - self.base
        return self.segments[row], self.positions[row] + device_offset - self.offsets[row]

    def overlaps(self, since: int, start: int, end: int) -> bool:
        """Whether a record numbered ``since`` or later touches [start, end)."""
        base = self.base
        for n in range(max(since, base), self.next):
            row = n - base
            if row >= len(self.offsets):
                break
            r0 = self.offsets[row]
            if r0 < end and start < r0 + self.lengths[row]:
                return True
        return False

    def memory(self) -> int:
        """Bytes held by the arrays (an estimate for status)."""
        arrays = (self.times, self.offsets, self.lengths, self.segments, self.positions)
        return sum(a.buffer_info()[1] * a.itemsize for a in arrays) + \
            sum(e.buffer_info()[1] * 8 + 64 for e in self.blocks.values())


def _merge(pieces: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent source pieces (-1) merged into one."""
    out: list[tuple[int, int, int]] = []
    for p in pieces:
        if out and p[2] == -1 and out[-1][2] == -1 and out[-1][1] == p[0]:
            out[-1] = (out[-1][0], p[1], -1)
        else:
            out.append(p)
    return out
