"""Protected sector ranges of a device (``protect``/``unprotect``) and the mount's
audit log. Knows nothing of FUSE: ``tracker.py`` asks ``Rules.admit`` on the write
path, ``registry.py`` edits the rules, ``fs.py`` shows the log as ``MOUNT/audit``.

Rules of one device: byte ranges ``[start, end)`` on 512-byte sector bounds, each with
an action, ``deny`` (the write fails with EPERM, nothing of it reaches the source or
the CBT) or ``audit`` (the write goes on; a JSON line is appended to the audit log).
Invariants: ``starts`` and ``ends`` ascend, ranges do not overlap
(``ends[i] <= starts[i + 1]``), at most MAX_RULES; so the ranges a write overlaps are
found by one bisect. A device with no rules has none of this: its tracker's ``rules``
is None and the write path tests only that attribute.

A write overlapping a deny range fails whole (even the part outside it). One
overlapping only audit ranges is logged once, with the write's own sector and count,
when it is admitted (before it reaches the source). Who wrote: the pid and uid FUSE
reported for the open of the handle that wrote (pyfuse3 passes no request context with
a write); ``Writer`` carries them.

The audit log: JSON lines ``{"time", "device", "sector", "count", "pid", "uid"}``, in
memory, shown as ``audit`` (the current file) and ``audit.1`` (the one before it). When
a line would take the current file past ``bound`` bytes, the current file becomes the
previous one (the older previous one is dropped) and a new current file begins: at
most 2 x bound bytes are kept, and a reader holding a rotated file keeps its bytes.
"""

import bisect
import errno
import itertools
import json
import logging
import time
from typing import NamedTuple

from .commands import ACTIONS, parse_action
from .errors import SnapfsError
from .params import SECTOR

log = logging.getLogger(__name__)

DENY, AUDIT = ACTIONS
MAX_RULES = 65_536          # per device: editing a rule is O(rules)
DENY_LOG_INTERVAL = 1.0     # seconds: at most one log line per device for denied writes


class Writer(NamedTuple):
    """Who writes through a handle: the pid and uid of the open request."""

    pid: int
    uid: int


NOBODY = Writer(0, 0)


def sectors(offset: int, length: int) -> tuple[int, int]:
    """The 512-byte sectors a byte range touches: (first sector, count)."""
    first = offset // SECTOR
    return first, -(-(offset + length) // SECTOR) - first


class AuditLog:
    """The mount's audit lines (trio thread only): ``current`` and ``previous``
    bytearrays, ``generation`` counts rotations (module docstring)."""

    def __init__(self, bound: int):
        self.bound = bound
        self.current = bytearray()
        self.previous: bytearray | None = None
        self.generation = 0
        self.lines = 0

    def append(self, record: dict) -> None:
        line = json.dumps(record).encode() + b"\n"
        if self.current and len(self.current) + len(line) > self.bound:
            self.previous, self.current = self.current, bytearray()
            self.generation += 1
        self.current += line
        self.lines += 1


class Rules:
    """The protected ranges of device ``name`` (``capacity`` bytes); audit lines go
    to ``audit``. Trio thread only."""

    def __init__(self, name: str, capacity: int, audit: AuditLog):
        self.name, self.capacity, self.audit = name, capacity, audit
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.actions: list[str] = []
        self.denied = 0
        self.audited = 0
        self._next_log = 0.0

    def __len__(self) -> int:
        return len(self.starts)

    # ----- the write path --------------------------------------------------------------

    def admit(self, offset: int, length: int, writer: Writer) -> None:
        """A device write of ``length`` bytes at ``offset``: EPERM if it overlaps a
        deny range; an audit line if it overlaps audit ranges only."""
        end = offset + length
        i = bisect.bisect_right(self.ends, offset)
        if i == len(self.starts) or self.starts[i] >= end or length <= 0:
            return
        j = bisect.bisect_left(self.starts, end, i)
        if DENY in self.actions[i:j]:
            self._deny(offset, length, writer, self.actions.index(DENY, i, j))
        self.audited += 1
        first, count = sectors(offset, length)
        self.audit.append({"time": time.time_ns(), "device": self.name, "sector": first,
                           "count": count, "pid": writer.pid, "uid": writer.uid})

    def _deny(self, offset: int, length: int, writer: Writer, k: int) -> None:
        self.denied += 1
        first, count = sectors(offset, length)
        rule = _text(self.starts[k], self.ends[k])
        message = (f"write to {self.name} sectors {first}:{count} by pid {writer.pid} uid {writer.uid} "
                   f"overlaps protected range {rule}")
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + DENY_LOG_INTERVAL
            log.warning("denied: %s (%d denied on %s so far)", message, self.denied, self.name)
        raise SnapfsError(errno.EPERM, message)

    # ----- editing -----------------------------------------------------------------

    def add(self, action: str, ranges: list[tuple[int, int]]) -> None:
        """Protect byte ranges (offset, length), all or none: EINVAL when they
        overlap each other, EEXIST when one overlaps a rule, ENOSPC past MAX_RULES."""
        parse_action(action)
        new = sorted((offset, offset + length) for offset, length in ranges)
        for (_, end), (start, _) in itertools.pairwise(new):
            if start < end:
                raise SnapfsError(errno.EINVAL, "the ranges given overlap each other")
        for start, end in new:
            i = bisect.bisect_right(self.ends, start)
            if i < len(self.starts) and self.starts[i] < end:
                raise SnapfsError(errno.EEXIST, f"range {_text(start, end)} overlaps the "
                                  f"{self.actions[i]} range {_text(self.starts[i], self.ends[i])}")
        if len(self) + len(new) > MAX_RULES:
            raise SnapfsError(errno.ENOSPC, f"at most {MAX_RULES} protected ranges per device")
        for start, end in new:
            i = bisect.bisect_left(self.starts, start)
            self.starts.insert(i, start)
            self.ends.insert(i, end)
            self.actions.insert(i, action)

    def remove(self, ranges: list[tuple[int, int]] | None) -> None:
        """Unprotect byte ranges (offset, length), or every range (None): a rule
        partly covered keeps the rest. ENOENT (nothing changed) if a range given
        touches no rule."""
        if ranges is None:
            self.starts, self.ends, self.actions = [], [], []
            return
        for offset, length in ranges:
            i = bisect.bisect_right(self.ends, offset)
            if i == len(self.starts) or self.starts[i] >= offset + length:
                raise SnapfsError(errno.ENOENT, f"no protected range on {self.name} overlaps "
                                  f"{_text(offset, offset + length)}")
        kept = self._triples()
        for offset, length in ranges:
            kept = [piece for rule in kept for piece in _subtract(rule, offset, offset + length)]
        if len(kept) > MAX_RULES:
            raise SnapfsError(errno.ENOSPC, f"at most {MAX_RULES} protected ranges per device")
        self.starts = [s for s, _, _ in kept]
        self.ends = [e for _, e, _ in kept]
        self.actions = [a for _, _, a in kept]

    def listing(self) -> list[tuple[str, int, int]]:
        """(action, first sector, sector count) of every rule, in order: what
        ``status`` shows and cbtstate.py saves."""
        return [(a, s // SECTOR, (e - s) // SECTOR) for s, e, a in self._triples()]

    def _triples(self) -> list[tuple[int, int, str]]:
        return list(zip(self.starts, self.ends, self.actions, strict=True))


def _subtract(rule: tuple[int, int, str], start: int, end: int) -> list[tuple[int, int, str]]:
    """What is left of ``rule`` (start, end, action) outside [start, end)."""
    s, e, a = rule
    if end <= s or start >= e:
        return [rule]
    return [piece for piece in ((s, start, a), (end, e, a)) if piece[0] < piece[1]]


def _text(start: int, end: int) -> str:
    return f"{start // SECTOR}:{(end - start) // SECTOR}"


def ranges_text(ranges: list[tuple[int, int]]) -> str:
    """Byte ranges (offset, length) as a command has them: ``SECTOR:COUNT ...``."""
    return " ".join(_text(offset, offset + length) for offset, length in ranges)
