"""Per device and snapshot: which chunks were copied, copy-before-write, image I/O.

Fields:
    chunk_size, chunk_count: the COW grid, fixed at take (``params.chunk_size``); the
        last chunk may be short.
    copied: bitarray, bit i set iff chunk i's take-time content is in the storage at
        ``slots[i]``. Invariant: copied[i] == (i in slots). A bit is never cleared.
    slots: dict chunk -> storage offset, only for copied chunks (sparse: a 1 TiB device
        costs chunk_count bits plus one entry per copied chunk).
    error: 0, or the positive errno that corrupted this image (sticky until destroy).

Design: every method is synchronous and runs on the trio thread with no await, so a
copy, its bookkeeping and the write that caused it form one atomic step: no other
request can observe a half-copied chunk, and no lock is needed (docs/concurrency.md).
Chunk I/O is plain pread/pwrite on page-cached files; the old data is in the storage
file's page cache (at least as safe as "in memory") before the device write proceeds.

Error handling: COW failures (overflow, storage I/O errors, source read errors while
copying) corrupt the image and post a ``corrupted`` event, and are swallowed by
``cow``: the original's write always proceeds. Image reads and writes raise
SnapfsError(EIO) once corrupted or destroyed.
"""

import errno

from bitarray import bitarray

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

    def _chunk_span(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.capacity)

    def cow(self, offset: int, length: int) -> None:
        """Before a device write of [offset, offset+length): copy every chunk it touches
        that was not copied yet. Never raises: failures corrupt the image."""
        if self.error or self.closed or length <= 0:
            return
        first = offset // self.chunk_size
        last = (min(offset + length, self.capacity) - 1) // self.chunk_size
        copied = self.copied
        for i in range(first, last + 1):
            if not copied[i]:
                if not self._copy(i):
                    return
                self.cow_copies += 1

    def _copy(self, i: int) -> bool:
        """Copy chunk i's current (take-time) content into a new slot."""
        start, end = self._chunk_span(i)
        try:
            data = self.source.pread(start, end - start)
            slot = self.storage.alloc(end - start)
            self.storage.write(slot, data)
        except SnapfsError as exc:
            self.corrupt(exc.errno)
            return False
        except OSError as exc:
            self.corrupt(exc.errno or errno.EIO)
            return False
        self.slots[i] = slot
        self.copied[i] = 1
        return True

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

    def read(self, offset: int, size: int) -> bytes:
        """Image read: per chunk, the stored old data if copied, else the source.
        Runs of uncopied chunks are read from the source in one call, and runs of
        copied chunks whose slots follow each other in the storage in one call."""
        self.check_usable()
        end = min(offset + size, self.capacity)
        parts = []
        pos = offset
        cs = self.chunk_size
        try:
            while pos < end:
                i = pos // cs
                if self.copied[i]:
                    k = self._stored_run_end(i, (end - 1) // cs)
                    stop = min(k * cs, end)
                    parts.append(self.storage.read(self.slots[i] + pos - i * cs, stop - pos))
                else:
                    j = self.copied.find(1, i + 1, (end - 1) // cs + 1)
                    stop = end if j < 0 else min(j * cs, end)
                    parts.append(self.source.pread(pos, stop - pos))
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

    def write(self, offset: int, data) -> None:
        """Image write: goes only to the storage (copying the old chunk first)."""
        self.check_usable()
        view = memoryview(data)
        cs = self.chunk_size
        pos, end = offset, offset + len(view)
        while pos < end:
            i = pos // cs
            stop = min((i + 1) * cs, end)
            if not self.copied[i]:
                if not self._copy(i):
                    self.check_usable()
                self.image_copies += 1
            try:
                self.storage.write(self.slots[i] + pos - i * cs, view[pos - offset : stop - offset])
            except OSError as exc:
                self.corrupt(exc.errno or errno.EIO)
                self.check_usable()
            pos = stop

    def close(self) -> None:
        """Destroy: all later image I/O fails with EIO."""
        self.closed = True
        self.slots.clear()

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
