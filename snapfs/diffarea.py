"""Per device and snapshot: which chunks were copied, copy-before-write, image I/O.

Fields:
    chunk_size, chunk_count: the COW grid, fixed at take (``params.chunk_size``); the
        last chunk may be short.
    copied: bitarray, bit i set iff chunk i's take-time content is in the storage at
        ``slots[i]``. Invariant: copied[i] == (i in slots). A bit is never cleared.
    slots: dict chunk -> storage offset, only for copied chunks (sparse: a 1 TiB device
        costs chunk_count bits plus one entry per copied chunk).
    error: 0, or the positive errno that corrupted this image (sticky until destroy).

Ordering (docs/concurrency.md): reads and writes may wait (AIO, worker threads), so
other requests run while a chunk is being copied. Per chunk, ``_copying[i]`` is the
event of the copy in flight: a write (device or image) that finds chunk i uncopied
either claims it for a ``CopyPlan`` (slots allocated, then the old data read from the
source and written to the storage) or waits for the copy that claimed it, and a device
write reaches the source only after every chunk it touches is copied. ``copied[i]`` is
set after the storage holds the data. An image read of uncopied chunks reads the
source and then checks that none of them was copied meanwhile (a copy precedes the
source write that would change them); if one was, it reads again. All I/O of this area
is counted in ``storage.in_flight``, which destroy drains before closing the storage.

Error handling: COW failures (overflow, storage I/O errors, source read errors while
copying) corrupt the image and post a ``corrupted`` event, and are swallowed by
``cow``: the original's write always proceeds. Image reads and writes raise
SnapfsError(EIO) once corrupted or destroyed.
"""

import errno
from dataclasses import dataclass

import trio
from bitarray import bitarray

from . import ioprio, workers
from .diffstorage import DiffStorage
from .errors import SnapfsError
from .events import EventLog


class DiffArea:
    def __init__(self, name: str, source, capacity: int, chunk_size: int,
                 storage: DiffStorage, events: EventLog):
        self.name = name
        self.source = source
        self.capacity = capacity
        self.chunk_size = chunk_size
        self.chunk_count = -(-capacity // chunk_size)
        self.copied = bitarray(self.chunk_count)
        self.copied.setall(0)
        self.slots: dict[int, int] = {}
        self.storage = storage
        self.events = events
        self.error = 0
        self.closed = False
        self.cow_copies = 0
        self.image_copies = 0
        self.writes_started = 0     # image writes begun / ended (readahead R1)
        self.writes_done = 0
        self._copying: dict[int, trio.Event] = {}   # chunk -> its copy in flight

    def _chunk_span(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.capacity)

    async def before_write(self, offset: int, length: int) -> None:
        """Copy-before-write of a device write of [offset, offset+length): returns once
        every chunk it touches is in the storage, copying those nobody copied and waiting
        for copies in flight by others; or once the image is unusable. Never raises:
        a failed copy corrupts the image, and the device write proceeds."""
        if length <= 0:
            return
        first = offset // self.chunk_size
        last = (min(offset + length, self.capacity) - 1) // self.chunk_size
        await self._ensure_copied(first, last, by_device=True)

    async def _ensure_copied(self, first: int, last: int, by_device: bool) -> None:
        """Chunks first..last end up copied, or the image unusable (``error`` or
        ``closed``)."""
        while not (self.error or self.closed):
            pending = self._copy_in_flight(first, last + 1)
            if pending is not None:
                await pending.wait()
                continue
            todo = [i for i in range(first, last + 1) if not self.copied[i]]
            if todo:
                await self._copy(todo, by_device)
            return

    def _copy_in_flight(self, first: int, stop: int) -> trio.Event | None:
        """The event of a copy in flight of a chunk in [first, stop), or None."""
        return next((ev for j, ev in self._copying.items() if first <= j < stop), None)

    async def _copy(self, chunks: list[int], by_device: bool) -> None:
        """Claim ``chunks`` (none copied or in flight: the caller checked with no await
        since), plan their copy and carry it out; failures corrupt the image."""
        done = trio.Event()
        for i in chunks:
            self._copying[i] = done
        try:
            with self.storage.in_flight.using():
                plan = self._plan(chunks)
                await self._carry_out(plan)
            if not self.closed:
                self._mark_copied(plan, by_device)
        except SnapfsError as exc:                 # no slot: nothing was copied
            self.corrupt(exc.errno)
        except OSError as exc:
            self.corrupt(exc.errno or errno.EIO)
        finally:
            for i in chunks:
                del self._copying[i]
            done.set()

    def _plan(self, chunks: list[int]) -> "CopyPlan":
        """Allocate a slot per chunk (in order, so slots of consecutive chunks follow
        each other) and merge them into runs of (source offset, size, slot): one read
        and one write per run. SnapfsError(ENOSPC) when the storage has no slot."""
        runs: list[list[int]] = []
        for i in chunks:
            start, end = self._chunk_span(i)
            slot = self.storage.alloc(end - start)
            if runs and runs[-1][0] + runs[-1][1] == start and runs[-1][2] + runs[-1][1] == slot:
                runs[-1][1] += end - start
            else:
                runs.append([start, end - start, slot])
        return CopyPlan(chunks, [(a, b, c) for a, b, c in runs])

    async def _carry_out(self, plan: "CopyPlan") -> None:
        """Each run: read the take-time data from the source, write it to its slots
        (``fileio``: inline where the page cache allows, else AIO or a thread)."""
        for start, size, slot in plan.runs:
            data = await self.source.io.read(start, size)
            await self.storage.io.write(slot, data)

    def _mark_copied(self, plan: "CopyPlan", by_device: bool) -> None:
        cs = self.chunk_size
        for start, size, slot in plan.runs:
            for off in range(0, size, cs):
                i = (start + off) // cs
                self.slots[i] = slot + off
                self.copied[i] = 1
        if by_device:
            self.cow_copies += len(plan.chunks)
        else:
            self.image_copies += len(plan.chunks)

    def corrupt(self, code: int) -> None:
        """Mark the image corrupted with ``code`` (first error wins) and post the event."""
        if self.error or self.closed:
            return
        self.error = code
        self.events.post("corrupted", device=self.name, error_code=code)

    def check_usable(self) -> None:
        if self.closed:
            raise SnapfsError(errno.EIO, f"snapshot of {self.name} was destroyed")
        if self.error:
            raise SnapfsError(errno.EIO, f"snapshot image of {self.name} is corrupted "
                              f"(errno {self.error})")

    async def read(self, offset: int, size: int, prio: int = 0, ahead: bool = False) -> bytes:
        """Image read: per chunk, the stored old data if copied, else the source.
        Runs of uncopied chunks are read from the source in one call (and read again
        if a chunk of the run was copied meanwhile), and runs of copied chunks whose
        slots follow each other in the storage in one call. ``prio``: the reader's I/O
        priority (``ioprio``), carried to the disk reads; the idle class also takes
        its turn as if the devices were always busy. ``ahead``: a read nobody asked
        for yet (readahead.py): an I/O error fails it without corrupting the image."""
        self.check_usable()
        parts: list[bytes] = []
        try:
            with self.storage.in_flight.using():
                async with workers.bulk(ioprio.is_idle(prio)):
                    self.check_usable()            # destroyed while it waited for its turn
                    await self._read_runs(offset, min(offset + size, self.capacity), parts, prio)
                    await workers.priority.quiet()
        except OSError as exc:
            if not ahead:
                self.corrupt(exc.errno or errno.EIO)
            raise SnapfsError(errno.EIO, f"reading snapshot image of {self.name}: {exc}") from None
        return b"".join(parts)

    async def _read_runs(self, pos: int, end: int, parts: list, prio: int) -> None:
        """Image read of [pos, end) into ``parts``, run by run (``read``)."""
        cs = self.chunk_size
        while pos < end:
            i = pos // cs
            if self.copied[i]:
                k = self._stored_run_end(i, (end - 1) // cs)
                stop = min(k * cs, end)
                data = await self.storage.io.read(self.slots[i] + pos - i * cs, stop - pos, prio)
            else:
                j = self.copied.find(1, i + 1, (end - 1) // cs + 1)
                stop = end if j < 0 else min(j * cs, end)
                data = await self.source.io.read(pos, stop - pos, prio)
                k = (stop - 1) // cs + 1
                pending = self._copy_in_flight(i, k)
                if pending is not None:           # a copy (and maybe its write) in flight
                    await pending.wait()
                    continue
                if self.copied.find(1, i, k) >= 0:   # copied meanwhile: the source may
                    continue                         # be newer: read again
            self.check_usable()
            parts.append(data)
            pos = stop

    def _stored_run_end(self, i: int, last: int) -> int:
        """The chunk after the run that starts at copied chunk ``i``, ends at ``last``
        at the latest, and whose slots are consecutive in the storage."""
        slots, cs = self.slots, self.chunk_size
        k = i + 1
        while k <= last and slots.get(k) == slots[k - 1] + cs:
            k += 1
        return k

    async def write(self, offset: int, data) -> None:
        """Image write: goes only to the storage (copying the old chunk first). Counted
        in ``writes_started``/``writes_done`` (readahead R1)."""
        self.check_usable()
        self.writes_started += 1
        try:
            with self.storage.in_flight.using():
                await self._write_chunks(offset, memoryview(data))
        finally:
            self.writes_done += 1

    async def _write_chunks(self, offset: int, view: memoryview) -> None:
        cs = self.chunk_size
        pos, end = offset, offset + len(view)
        while pos < end:
            i = pos // cs
            stop = min((i + 1) * cs, end)
            await self._ensure_copied(i, i, by_device=False)
            if not self.copied[i]:
                self.check_usable()
            try:
                await self.storage.io.write(self.slots[i] + pos - i * cs,
                                            view[pos - offset : stop - offset])
            except OSError as exc:
                self.corrupt(exc.errno or errno.EIO)
                self.check_usable()
            pos = stop

    def close(self) -> None:
        """Destroy: all later image I/O fails with EIO (requests in flight check
        ``closed`` after each await; the slots stay until the area is dropped)."""
        self.closed = True

    def statistics(self) -> dict:
        return {
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
            "chunks_copied": len(self.slots),
            "cow_copies": self.cow_copies,
            "image_write_copies": self.image_copies,
            "error_code": -self.error if self.error else 0,
            "state": "corrupted" if self.error else "taken",
        }


@dataclass(frozen=True)
class CopyPlan:
    """The copies one write needs: the chunks it claimed and their runs of (source
    offset, size, storage slot), each contiguous on both sides."""

    chunks: list[int]
    runs: list[tuple[int, int, int]]
