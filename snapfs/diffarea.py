"""Per device and snapshot: which chunks were copied, copy-before-write, image I/O.

Fields:
    chunk_size, chunk_count: the COW grid, fixed at take (``params.chunk_size``); the
        last chunk may be short.
    copied: bitarray, bit i set iff chunk i's take-time content is in the storage at
        ``slots[i]``. Invariant: copied[i] == (i in slots). A bit is never cleared.
    slots: dict chunk -> storage offset, only for copied chunks (sparse: a 1 TiB device
        costs chunk_count bits plus one entry per copied chunk).
    error: 0, or the positive errno that corrupted this image (sticky until destroy).

Ordering (docs/concurrency.md): I/O runs in worker threads, so other requests run
while a chunk is being copied. Per chunk, ``_copying[i]`` is the event of the copy in
flight: a write (device or image) that finds chunk i uncopied either starts the one
copy (allocating the slot, then reading the source and writing the storage in a
thread) or waits for it, and a device write reaches the source only after every
chunk it touches is copied. ``copied[i]`` is set after the storage holds the data.
An image read of uncopied chunks reads the source and then checks that none of them
was copied meanwhile (a copy precedes the source write that would change them); if
one was, it reads again. Every thread using the source or storage for this area is
counted in ``storage.in_flight``, which destroy drains before closing the storage.

Error handling: COW failures (overflow, storage I/O errors, source read errors while
copying) corrupt the image and post a ``corrupted`` event, and are swallowed by
``cow``: the original's write always proceeds. Image reads and writes raise
SnapfsError(EIO) once corrupted or destroyed.
"""

import errno

import trio
from bitarray import bitarray

from . import workers
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
        self._copying: dict[int, trio.Event] = {}   # chunk -> its copy in flight

    def _chunk_span(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.capacity)

    async def cow(self, offset: int, length: int, then=None) -> bool:
        """Before a device write of [offset, offset+length): copy every chunk it touches
        that was not copied yet, waiting for copies in flight by others. Never raises
        for the copy: failures corrupt the image.

        The chunks this call copies are copied in one worker-thread call (contiguous
        ones with one read and one write), and ``then``, the blocking device write,
        runs in that same call right after them: one thread hop for a first write.
        Returns True when ``then`` ran (an OSError of it is raised), False when the
        caller must still write."""
        if length <= 0:
            return False
        first = offset // self.chunk_size
        last = (min(offset + length, self.capacity) - 1) // self.chunk_size
        return await self._copy_range(first, last, True, then)

    async def _copy_range(self, first: int, last: int, by_device: bool, then=None) -> bool:
        """Chunks first..last end up copied, or the image unusable (``error`` or
        ``closed``): wait for copies in flight by others, then copy the rest in one
        worker call, ``then`` after them. Returns whether ``then`` ran."""
        while not (self.error or self.closed):
            pending = self._copy_in_flight(first, last + 1)
            if pending is not None:
                await pending.wait()
                continue
            todo = [i for i in range(first, last + 1) if not self.copied[i]]
            return bool(todo) and await self._copy(todo, by_device, then)
        return False

    def _copy_in_flight(self, first: int, stop: int) -> trio.Event | None:
        """The event of a copy in flight of a chunk in [first, stop), or None."""
        return next((ev for j, ev in self._copying.items() if first <= j < stop), None)

    async def _copy(self, chunks: list[int], by_device: bool, then=None) -> bool:
        """Copy the take-time content of ``chunks`` (none copied or in flight) into new
        slots; ``_copying`` marks them, set with no await after the caller's check.
        With ``then`` (the device write), it runs in the copy's thread afterwards,
        whatever the copy did; returns whether it ran."""
        done = trio.Event()
        for i in chunks:
            self._copying[i] = done
        copy_error = write_error = None
        ran = False
        try:
            with self.storage.in_flight.using():
                jobs = self._jobs(chunks)
                copy_error, write_error = await workers.run(self._copy_then, jobs, then)
                ran = then is not None
            if copy_error is not None:
                raise copy_error
            if not self.closed:
                self._mark_copied(chunks, jobs, by_device)
        except SnapfsError as exc:                 # no slot: nothing ran
            self.corrupt(exc.errno)
        except OSError as exc:
            self.corrupt(exc.errno or errno.EIO)
        finally:
            for i in chunks:
                del self._copying[i]
            done.set()
        if write_error is not None:
            raise write_error
        return ran

    def _jobs(self, chunks: list[int]) -> list[tuple[int, int, int]]:
        """Allocate a slot per chunk (in order, so slots of consecutive chunks follow
        each other) and merge them into (source offset, size, slot) runs."""
        jobs: list[list[int]] = []
        for i in chunks:
            start, end = self._chunk_span(i)
            slot = self.storage.alloc(end - start)
            if jobs and jobs[-1][0] + jobs[-1][1] == start and jobs[-1][2] + jobs[-1][1] == slot:
                jobs[-1][1] += end - start
            else:
                jobs.append([start, end - start, slot])
        return [(a, b, c) for a, b, c in jobs]

    def _mark_copied(self, chunks: list[int], jobs, by_device: bool) -> None:
        slots = {}
        for start, size, slot in jobs:
            for off in range(0, size, self.chunk_size):
                slots[(start + off) // self.chunk_size] = slot + off
        for i in chunks:
            self.slots[i] = slots[i]
            self.copied[i] = 1
        if by_device:
            self.cow_copies += len(chunks)
        else:
            self.image_copies += len(chunks)

    def _copy_then(self, jobs, then) -> tuple:
        """Worker thread: copy each run, then the device write whatever the copy did
        (the original never suffers). Returns (copy error, write error)."""
        copy_error = None
        try:
            for start, size, slot in jobs:
                self.storage.write(slot, self.source.pread(start, size))
        except OSError as exc:
            copy_error = exc
        if then is None:
            return copy_error, None
        try:
            then()
        except OSError as exc:
            return copy_error, exc
        return copy_error, None

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

    async def read(self, offset: int, size: int) -> bytes:
        """Image read: per chunk, the stored old data if copied, else the source.
        Runs of uncopied chunks are read from the source in one call (and read again
        if a chunk of the run was copied meanwhile), and runs of copied chunks whose
        slots follow each other in the storage in one call."""
        self.check_usable()
        end = min(offset + size, self.capacity)
        parts = []
        pos = offset
        cs = self.chunk_size
        try:
            with self.storage.in_flight.using():
                while pos < end:
                    i = pos // cs
                    if self.copied[i]:
                        k = self._stored_run_end(i, (end - 1) // cs)
                        stop = min(k * cs, end)
                        data = await workers.read(self.storage, self.slots[i] + pos - i * cs, stop - pos,
                                                 bulk=True)
                    else:
                        j = self.copied.find(1, i + 1, (end - 1) // cs + 1)
                        stop = end if j < 0 else min(j * cs, end)
                        data = await workers.read(self.source, pos, stop - pos, bulk=True)
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
        except OSError as exc:
            self.corrupt(exc.errno or errno.EIO)
            raise SnapfsError(errno.EIO, f"reading snapshot image of {self.name}: {exc}") from None
        return b"".join(parts)

    def _stored_run_end(self, i: int, last: int) -> int:
        """The chunk after the run that starts at copied chunk ``i``, ends at ``last``
        at the latest, and whose slots are consecutive in the storage."""
        slots, cs = self.slots, self.chunk_size
        k = i + 1
        while k <= last and slots.get(k) == slots[k - 1] + cs:
            k += 1
        return k

    async def write(self, offset: int, data) -> None:
        """Image write: goes only to the storage (copying the old chunk first)."""
        self.check_usable()
        view = memoryview(data)
        cs = self.chunk_size
        pos, end = offset, offset + len(view)
        with self.storage.in_flight.using():
            while pos < end:
                i = pos // cs
                stop = min((i + 1) * cs, end)
                await self._copy_range(i, i, by_device=False)
                if not self.copied[i]:
                    self.check_usable()
                try:
                    await workers.run(self.storage.write, self.slots[i] + pos - i * cs,
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
