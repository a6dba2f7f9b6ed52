"""Changed-block tracking (CBT): blksnap's two byte maps with generations.

Fields:
    block_size, capacity, block_count: the tracking grid (``params.tracking_block_size``).
    write_map: one byte per block, the number of the newest snapshot period the block
        changed in. Invariant: every value <= ``active``. Values only grow within a
        generation.
    read_map: what users read (``cbt/NAME/map``): the write map as of the last take,
        plus "set both" marks. Invariant: every value <= 255.
    active: the number writes are stamped with now (1..255).
    changes_number: the number of the last take (``previous`` in blksnap); 0 before
        the first take of a generation.
    generation_id: UUID; a new one means "all history lost, do a full backup".

Design: a backup tool remembers (generation_id, changes_number) of its last backup.
At the next take, block i changed since then iff the generation is the same and
``read_map[i] > remembered_number``. The switch at take must happen in the same
synchronous step that enables copy-before-write, so that no write falls between two
periods (see snapshot.py).

Wrap-around: when ``active`` is 255 at take, the read map still receives a copy of the
write map, then a new generation starts: write map zeroed, ``changes_number`` 0,
``active`` 1. The snapshot taken at that moment is the first of the new generation,
so a tool holding an older generation does a full backup, and the next take reports
``map[i] > 0`` for exactly the blocks written since.
"""

import functools
import uuid
from collections.abc import Iterator

MAX_NUMBER = 255


@functools.cache
def _raise_table(number: int) -> bytes:
    """bytes.translate table mapping each value v to max(v, number)."""
    return bytes(max(v, number) for v in range(256))


class CBT:
    """CBT state of one device. Not thread-safe: call from the trio thread only."""

    def __init__(self, capacity: int, block_size: int):
        self.capacity = capacity
        self.block_size = block_size
        self.block_count = -(-capacity // block_size)
        self.write_map = bytearray(self.block_count)
        self.read_map = bytearray(self.block_count)
        self.active = 1
        self.changes_number = 0
        self.generation_id = str(uuid.uuid4())

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        """Half-open block range [first, last) covering bytes [offset, offset+length)."""
        end = min(offset + length, self.capacity)
        if length <= 0 or offset >= end:
            return 0, 0
        return offset // self.block_size, -(-end // self.block_size)

    def mark(self, offset: int, length: int) -> None:
        """Record a write to the device (write map := active over the range)."""
        first, last = self._blocks(offset, length)
        if last > first:
            # Every value is <= active (invariant), so assignment is the "max".
            self.write_map[first:last] = bytes((self.active,)) * (last - first)

    def mark_both(self, offset: int, length: int) -> None:
        """Record a change that both the current and the next period must report:
        image writes and ``markdirtyblock`` (write map: active; read map: previous)."""
        self.mark(offset, length)
        first, last = self._blocks(offset, length)
        if last > first:
            raise_to = _raise_table(self.changes_number)
            self.read_map[first:last] = self.read_map[first:last].translate(raise_to)

    def switch(self) -> None:
        """Take: read map := write map; changes_number := active; active += 1,
        or a new generation on wrap-around (see the module docstring)."""
        self.read_map[:] = self.write_map
        if self.active >= MAX_NUMBER:
            self.new_generation(keep_read_map=True)
            return
        self.changes_number = self.active
        self.active += 1

    def new_generation(self, keep_read_map: bool = False) -> None:
        """Forget all history: new generation_id, zeroed write map, numbering restarts."""
        self.generation_id = str(uuid.uuid4())
        self.write_map[:] = bytes(self.block_count)
        if not keep_read_map:
            self.read_map[:] = bytes(self.block_count)
        self.changes_number = 0
        self.active = 1

    def info(self) -> dict:
        """The public summary (``cbt/NAME/info``, ``cbtinfo``)."""
        return dict(block_size=self.block_size, device_capacity=self.capacity,
                    block_count=self.block_count, generation_id=self.generation_id,
                    changes_number=self.changes_number)

    def changed_ranges(self, generation_id: str, since: int) -> Iterator[tuple[int, int]] | None:
        """Byte ranges (offset, length) whose read-map value exceeds ``since``, merged
        into runs; None when ``generation_id`` differs (a full backup is needed)."""
        if generation_id != self.generation_id:
            return None
        return changed_runs(self.read_map, since, self.block_size, self.capacity)

    def memory_bytes(self) -> int:
        """Bytes held by the two maps (the dominant cost: 2 x block_count)."""
        return len(self.write_map) + len(self.read_map)


def changed_runs(read_map: bytes, since: int, block_size: int,
                 capacity: int) -> Iterator[tuple[int, int]]:
    """Merged byte ranges (offset, length) of blocks with ``read_map[i] > since``."""
    start = None
    for i, value in enumerate(read_map):
        if value > since and start is None:
            start = i
        elif value <= since and start is not None:
            yield start * block_size, i * block_size - start * block_size
            start = None
    if start is not None:
        yield start * block_size, capacity - start * block_size
