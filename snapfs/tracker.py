"""Per device: the source, its CBT, the write path and the write gate.

Write path (``write``), the one owner of a device write, once admitted by the gate:
    1. clip to the device size (sizes are fixed); with protected ranges
       (``rules``, protect.py), EPERM or an audit line;
    2. mark the CBT write map (before COW, so even a failed copy is tracked);
    2b. if a CDP journal runs: ``recorder.before_write`` returns once the old data
       is journaled (cdp.py; it never fails the write), ``after_write`` after step 4;
    3. if a snapshot is taken: ``DiffArea.before_write`` returns once every chunk the
       write touches is in the storage (or the image is corrupted: it never fails the
       write);
    4. write to the source (``source.io``: inline when the page cache takes it at
       once, else a worker thread); while the device migrates, through the migration
       (``migrate.Migration.write``: also to the target where it is copied already).
Errors of step 4 are real device errors and reach the writer as-is. Reads go to the
source directly (``source.io``).

The gate implements take's "stop admitting writes, wait for in-flight ones"
(docs/design.md section 5 step 3): a write counts as in flight from admission until
its source write returned.
"""

import errno
import logging

import trio

from . import workers
from .cbt import CBT
from .diffarea import DiffArea
from .errors import SnapfsError
from .params import Params, tracking_block_size
from .protect import NOBODY, Rules, Writer
from .source import Source
from .workers import InFlight

log = logging.getLogger(__name__)


class WriteGate:
    """Admission of device writes. ``close`` stops admitting, ``wait_drained`` waits
    until every admitted write has finished (its copies and its source write, worker
    threads included), ``open`` lets the waiting writes in. Trio thread only."""

    def __init__(self) -> None:
        self._closed = False
        self._reopened = trio.Event()
        self.in_flight = InFlight()

    def admitted(self) -> "_Admitted":
        """``async with``: wait while closed, then count the write until it leaves the
        block (no checkpoint between the check and the count). A class, not a
        generator: it runs on every device write."""
        return _Admitted(self)

    def close(self) -> None:
        self._closed = True
        self._reopened = trio.Event()

    async def wait_drained(self) -> None:
        await self.in_flight.drained()

    def open(self) -> None:
        self._closed = False
        self._reopened.set()


class _Admitted:
    __slots__ = ("gate",)

    def __init__(self, gate: WriteGate) -> None:
        self.gate = gate

    async def __aenter__(self) -> None:
        gate = self.gate
        while gate._closed:
            await gate._reopened.wait()
        gate.in_flight.enter()

    async def __aexit__(self, *exc) -> None:
        self.gate.in_flight.leave()


class Tracker:
    """One attached device: source, CBT, write gate, and the diff area while a
    snapshot of it is taken."""

    def __init__(self, name: str, source: Source, params: Params, cbt: CBT | None = None):
        self.name = name
        self.source = source
        self.capacity = source.size
        self.cbt = cbt or CBT(source.size, tracking_block_size(source.size, params))
        self.area: DiffArea | None = None
        self.recorder = None     # cdp.Recorder while a journal runs: before_write/after_write/sync
        self.snapshot_id: str | None = None
        self.gate = WriteGate()
        self.rules: Rules | None = None     # None: no protected range (the write path's one test)
        self.open_handles = 0
        self.bytes_written = 0
        self.write_requests = 0
        self.detached = False
        self.migration = None            # a migrate.Migration while one runs

    def _check_attached(self) -> None:
        if self.detached:
            raise SnapfsError(errno.EIO, f"device {self.name} was detached")

    def _clip(self, offset: int, length: int) -> int:
        if offset < 0:
            raise SnapfsError(errno.EINVAL, "negative offset")
        if length and offset >= self.capacity:
            raise SnapfsError(errno.ENOSPC, f"write past the end of device {self.name}")
        return min(length, self.capacity - offset)

    async def write(self, offset: int, data, writer: Writer = NOBODY) -> int:
        """Device write by ``writer`` (see module docstring). Returns the bytes written."""
        self._check_attached()
        with workers.priority.request():
            return await self._write(offset, data, writer)

    async def _write(self, offset: int, data, writer: Writer) -> int:
        n = await self._change(offset, len(data), writer, data)
        self.bytes_written += n
        self.write_requests += 1
        return n

    async def discard(self, offset: int, length: int, writer: Writer = NOBODY) -> None:
        """DISCARD / punch-hole counts as a write: protected ranges, CBT mark, journal and
        COW, then deallocate."""
        await self._change(offset, length, writer, None)

    async def _change(self, offset: int, length: int, writer: Writer, data) -> int:
        """The one path of a change to the device, a write (``data``) or a discard
        (None), in the order of the module docstring: admission, protected ranges, CBT
        mark, journal, copy-before-write, then the source (and a migration's target).
        Returns the bytes changed."""
        async with self.gate.admitted():
            n = self._clip(offset, length)
            if self.rules is not None:
                self.rules.admit(offset, n, writer)
            self.cbt.mark(offset, n)
            piece = None if data is None else memoryview(data)[:n]
            rec = self.recorder
            ticket = await rec.before_write(offset, n, piece) if rec is not None else None
            done = False
            try:
                if self.area is not None:
                    await self.area.before_write(offset, n)
                if self.migration is None:        # the common case: no closure, no hop
                    await _apply(self.source, offset, n, piece)
                else:
                    await self.migration.write(offset, n, lambda source: _apply(source, offset, n, piece))
                done = piece is not None          # a discard's journal windows are gone anyway
            except OSError as exc:
                what = f"writing device {self.name}" if piece is not None else f"discarding on {self.name}"
                raise SnapfsError.from_oserror(exc, what) from None
            finally:
                if ticket is not None:
                    rec.after_write(ticket, done)
            return n

    async def read(self, offset: int, size: int) -> bytes:
        """Device read (no snapshot involvement)."""
        self._check_attached()
        size = max(0, min(size, self.capacity - offset))
        source = self.source
        try:
            with workers.priority.request(), source.users.using():
                return await source.io.read(offset, size) if size else b""
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"reading device {self.name}") from None

    async def sync(self) -> None:
        """fsync of the device file: fdatasync the source in a worker thread, shared
        with concurrent fsyncs (``FileIO.sync``; detach waits for no open handle, so the
        fd stays open)."""
        self._check_attached()
        source = self.source
        try:
            with workers.priority.request(), source.users.using():
                if self.recorder is not None:      # the journal is durable first
                    await self.recorder.sync()
                await source.io.sync(source.fsync)
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"syncing device {self.name}") from None

    async def image_write(self, area: DiffArea, offset: int, data) -> int:
        """Snapshot-image write to ``area`` (the one the handle was opened on): marks
        both CBT maps; the data goes only to the difference storage."""
        area.check_usable()
        n = self._clip(offset, len(data))
        self.cbt.mark_both(offset, n)
        await area.write(offset, memoryview(data)[:n])
        return n

    def protected(self) -> list[dict]:
        """The protected ranges, as ``status`` and the protect commands show them."""
        listing = self.rules.listing() if self.rules else []
        return [{"action": a, "sector": s, "count": c} for a, s, c in listing]

    def statistics(self) -> dict:
        cbt = self.cbt
        return {
            "path": self.source.path,
            "kind": self.source.kind,
            "size": self.capacity,
            "bytes_written": self.bytes_written,
            "write_requests": self.write_requests,
            "open_handles": self.open_handles,
            "snapshot": self.snapshot_id,
            "cow_copies": self.area.cow_copies if self.area else 0,
            "protected": self.protected(),
            "denied_writes": self.rules.denied if self.rules else 0,
            "cbt": cbt.info() | {"active": cbt.active},
        }


def _apply(source, offset: int, n: int, piece):
    """The source part of a change (``Tracker._change``) on ``source``: write ``piece``,
    or punch when it is None. A coroutine."""
    if piece is not None:
        return source.io.write(offset, piece)
    return source.io.run(source.punch, offset, n)
