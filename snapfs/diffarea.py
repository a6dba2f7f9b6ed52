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

    async def cow(self, offset: int, length: int) -> None:
        """Before a device write of [offset, offset+length): copy every chunk it touches
        that was not copied yet (or wait for its copy in flight). Never raises:
        failures corrupt the image."""
        if self.error or self.closed or length <= 0:
            return
        first = offset // self.chunk_size
        last = (min(offset + length, self.capacity) - 1) // self.chunk_size
        for i in range(first, last + 1):
            if not await self._ensure_copied(i, by_device=True):
                return

    async def _ensure_copied(self, i: int, by_device: bool) -> bool:
        """Chunk i is in the storage when this returns True; False: image unusable."""
        while not self.copied[i]:
            if self.error or self.closed:
                return False
            pending = self._copying.get(i)
            if pending is not None:
                await pending.wait()
            else:
                await self._copy(i, by_device)
        return True

    async def _copy(self, i: int, by_device: bool) -> None:
        """Copy chunk i's take-time content into a new slot; the only copy of chunk i
        (``_copying[i]`` is set with no await before it)."""
        done = self._copying[i] = trio.Event()
        start, end = self._chunk_span(i)
        try:
            with self.storage.in_flight.using():
                slot = self.storage.alloc(end - start)
                data = await workers.read(self.source, start, end - start)
                await workers.run(self.storage.write, slot, data)
            if not self.closed:
                self.slots[i] = slot
                self.copied[i] = 1
                if by_device:
                    self.cow_copies += 1
                else:
                    self.image_copies += 1
        except SnapfsError as exc:
            self.corrupt(exc.errno)
        except OSError as exc:
            self.corrupt(exc.errno or errno.EIO)
        finally:
            del self._copying[i]
            done.set()

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
                        data = await workers.read(self.storage, self.slots[i] + pos - i * cs, stop - pos)
                    else:
                        j = self.copied.find(1, i + 1, (end - 1) // cs + 1)
                        stop = end if j < 0 else min(j * cs, end)
                        data = await workers.read(self.source, pos, stop - pos)
                        if self.copied.find(1, i, (stop - 1) // cs + 1) >= 0:   # copied meanwhile:
                            continue                                             # the source may be newer
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
                if not await self._ensure_copied(i, by_device=False):
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
