"""Read-ahead for one open snapshot image.

Images are read with direct I/O (fs.ImageHandle), so the kernel reads nothing ahead:
a reader that waits for each read (``cp``, ``dd``, fio with one job) would wait for the
disk once per request. ``ReadAhead`` notices such a reader (MIN_STREAK reads in a row,
each starting where the last ended, never two at once) and keeps pieces of PIECE bytes
in flight from its position up to WINDOW bytes ahead, read by ``area.read`` itself:
each piece takes its turn behind the devices' requests like any image read
(docs/concurrency.md rule 4) and has the reader's I/O priority. A read inside the
pieces is cut from them, whatever its size (the kernel splits a read into an
unaligned buffer into two requests of odd sizes).

Contract: ``read(offset, size)`` returns what ``area.read(offset, size, prio)`` would
return when called, or raises what it would raise. Invariants:
    R1 a piece is used only if no image write of its area was in flight at any moment
       from the piece's start to its use: at start ``area.writes_done ==
       area.writes_started`` (the stamp), at use ``area.writes_started == stamp``.
       Device writes need no check: the area returns take-time data whatever the
       device does (its COW ordering), and a piece is an ``area.read``.
    R2 pieces are contiguous, in order, and end at most WINDOW past the read that
       started them; a read not inside them from the first piece on drops them all
       (their reads are cancelled) and reads for itself.
    R3 a piece that failed is never the answer: the reader reads for itself, and so
       gets the error (or data) of its own read. A piece's I/O error does not corrupt
       the image (``DiffArea.read(ahead=True)``): only a read someone asked for does.
    R4 a reader seen with two reads in flight on the handle is parallel: it has its own
       depth, and gets no read-ahead from then on.
    R5 while the devices are busy (``workers.priority.busy``) a reader has at most one
       piece ahead, so a sequential reader queues no more image I/O before the
       devices' requests than a reader without read-ahead; data cut from pieces is
       handed back only once no device request is ready (``priority.quiet``), as
       ``DiffArea.read`` does.
An open handle that stops reading keeps its pieces (at most WINDOW bytes) until it
reads elsewhere or is released.
"""

from collections import deque

import trio

from . import workers

WINDOW = 4 << 20          # bytes read ahead of one sequential reader at most
PIECE = 1 << 20           # one read ahead (FUSE's largest request)
MIN_STREAK = 2            # reads in a row, each where the last ended, before reading ahead


class _Piece:
    """One read ahead: [offset, offset + size) of the area; ``data`` once done (None if
    it failed or was cancelled)."""

    __slots__ = ("data", "done", "offset", "scope", "size", "stamp")

    def __init__(self, offset: int, size: int, stamp: int):
        self.offset, self.size, self.stamp = offset, size, stamp
        self.done = trio.Event()
        self.data: bytes | None = None
        self.scope = trio.CancelScope()

    async def run(self, area, prio: int) -> None:
        """A system task: never raises but Cancelled (R3: a failure leaves ``data``
        None)."""
        try:
            with self.scope:
                self.data = await area.read(self.offset, self.size, prio, ahead=True)
        except Exception:             # the reader reads for itself and gets it (R3)
            self.data = None
        finally:
            self.done.set()


class ReadAhead:
    """The read-ahead of one open image (``area``: its DiffArea; ``prio``: the opener's
    I/O priority). Trio thread only."""

    def __init__(self, area, prio: int = 0):
        self.area, self.prio = area, prio
        self.next = -1            # where the last read ended
        self.streak = 0           # reads in a row that started at ``next``
        self.active = 0           # reads of this handle in flight
        self.parallel = False     # R4
        self.pieces: deque[_Piece] = deque()

    async def read(self, offset: int, size: int) -> bytes:
        self.active += 1
        try:
            if self.active > 1:
                self.parallel = True
                self.drop()
            end = min(offset + size, self.area.capacity)
            if end <= offset:                      # nothing to read: the pieces stay
                self.area.check_usable()
                return b""
            self.streak = self.streak + 1 if offset == self.next else 0
            self.next = offset + size
            if not self.parallel and self.streak >= MIN_STREAK:
                self._fill(offset)
            data = await self._from_pieces(offset, end)
            return data if data is not None else await self.area.read(offset, size, self.prio)
        finally:
            self.active -= 1

    async def _from_pieces(self, offset: int, end: int) -> bytes | None:
        """[offset, end) cut from the pieces, which are consumed up to ``end``; None (and
        every piece dropped) when they do not hold it all (R2) or one is unusable (R1,
        R3)."""
        pieces = self.pieces
        if not pieces or not pieces[0].offset <= offset < end <= pieces[-1].offset + pieces[-1].size:
            self.drop()
            return None
        used = []
        while pieces and pieces[0].offset < end:
            used.append(pieces[0])
            if pieces[0].offset + pieces[0].size > end:
                break                      # partly read: it stays first
            pieces.popleft()
        parts = []
        for piece in used:
            await piece.done.wait()
            if piece.data is None or self.area.writes_started != piece.stamp:
                self.drop()
                return None
            parts.append(piece.data[max(offset, piece.offset) - piece.offset : end - piece.offset])
        await workers.priority.quiet()            # R5
        self.area.check_usable()
        return b"".join(parts) if len(parts) > 1 else parts[0]

    def _fill(self, offset: int) -> None:
        """Pieces from the end of the last one (or ``offset``) until WINDOW past
        ``offset`` (PIECE while the devices are busy: R5) or the area's end; none while
        an image write is in flight (R1)."""
        area = self.area
        if area.writes_done != area.writes_started:
            return
        pos = self.pieces[-1].offset + self.pieces[-1].size if self.pieces else offset
        window = PIECE if workers.priority.busy() else WINDOW       # R5
        while pos < area.capacity and pos < offset + window:
            size = min(PIECE, area.capacity - pos)
            piece = _Piece(pos, size, area.writes_started)
            self.pieces.append(piece)
            trio.lowlevel.spawn_system_task(piece.run, area, self.prio, name="snapfs-readahead")
            pos += size

    def drop(self) -> None:
        """Forget every piece and cancel its read (at a miss, a parallel read, release)."""
        while self.pieces:
            self.pieces.popleft().scope.cancel()
