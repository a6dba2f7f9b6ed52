"""Live migration of a device to new storage (issue 23), modelled on QEMU's mirror
block job in ``write-blocking`` mode. Knows nothing of FUSE or command lines: the
registry starts, completes and cancels a ``Migration``; the tracker hands it every
device write while it runs.

Per device, the device is cut into PIECE-sized pieces and ``copied`` has one bit per
piece. One background task (``Migration.run``) copies the pieces in order, once: a
piece is read from the source (at the copy's I/O priority, taking its turn behind
the devices' requests: ``workers.bulk``, and under ``--rate-limit``) and written to
the target, then its bit is set. A device write (``Migration.write``):

- waits while a piece it touches is being copied (``_copying[i]``, an event);
- then, with no await between, decides: ``mirror`` iff any piece it touches is
  copied, and counts itself in ``_pending[i]`` of every piece it touches;
- writes the source, then, if ``mirror`` and the migration still runs, the target
  (before the write returns: write-blocking), and leaves ``_pending``.

Invariants (docs/concurrency.md, M1-M5):
- M1 a bit of ``copied`` is never cleared; once set, the target holds that piece as
  the source does, and every later write to it reaches the target before it returns.
- M2 a piece's copy reads the source only when no write to it is in flight
  (``_pending[i] == 0``, awaited after the claim) and none can start (``_copying[i]``
  set with no await after the check), so it reads the piece's final content and no
  write slips between its read and its bit.
- M3 so one pass converges under any write rate: pieces behind the copy are
  mirrored, pieces ahead are picked up when the copy gets there. ``ready`` means
  every bit is set and mirroring is on.
- M4 a failing target (``OSError`` of a target write) fails the migration with its
  errno; the device write that met it succeeds (the source has it); mirroring stops at
  once, the target is closed and a created target removed. The device never fails
  because of the target.
- M5 the writes in flight when the migration starts are drained first (the write
  gate), so every write the copy could miss is counted in ``_pending``.
"""

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable

import trio
from bitarray import bitarray

from . import ioprio, workers
from .errors import SnapfsError
from .guard import Guard
from .ioprio import RateLimit
from .namespace import SAME, View
from .osutil import write_back
from .source import Source
from .workers import InFlight

log = logging.getLogger(__name__)

PIECE = 1 << 20                  # bytes the copy reads and writes at a time
COPY_PRIORITY = 2 << ioprio.CLASS_SHIFT | 7   # the lowest best-effort level: a write
#                                 may wait for a piece's copy, so never the idle class
COPIERS = 4                      # copy tasks; workers.bulk decides how many read at once
WRITE_BACK_EVERY = 16 << 20      # bytes copied between starts of the target's write-back
ZERO = bytes(PIECE)
BUSY_PAUSE_MAX = 0.1             # seconds: the longest pause after a piece while the devices are busy


class Migration:
    """One device's move from its source to ``target`` (an opened Source).
    ``created``: the target is a new file (removed on cancel or failure; its holes
    need no write); ``remove`` unlinks it (blocking)."""

    def __init__(self, tracker, target: Source, remove: Callable[[], None] | None,
                 rate_mib: float = 0, spawn: Callable | None = None):
        self.tracker = tracker
        self.target = target
        self.source_path = tracker.source.path
        self.remove = remove
        self.total = tracker.capacity
        self.count = -(-self.total // PIECE)
        self.copied = bitarray(self.count)
        self.copied.setall(0)
        self.touched = bitarray(self.count)    # written since start (the hole scan's guard)
        self.touched.setall(0)
        self.copied_bytes = 0
        self.state = "running"
        self.error = ""                        # errno name once failed
        self.message = ""
        self.rate = RateLimit(rate_mib)
        self.started = time.monotonic()
        self.ready_seconds: float | None = None
        self.write_block_ms: float | None = None   # how long the pivot held device writes
        self.target_users = InFlight()         # every use of the target's fd
        self._copying: dict[int, trio.Event] = {}
        self._pending: dict[int, int] = {}
        self._drained: dict[int, trio.Event] = {}
        self._scope = trio.CancelScope()
        self._copy_done = trio.Event()
        self._closed = trio.Event()
        self._spawn = spawn
        self._unsynced = 0                     # bytes copied since the target's last write-back

    @property
    def active(self) -> bool:
        """Mirroring is on (M4: off at once on failure and cancel)."""
        return self.state in ("running", "ready", "completing")

    def info(self) -> dict:
        left = self.total - self.copied_bytes
        return {"state": self.state, "copied": self.copied_bytes, "total": self.total,
                "dirty": left if self.state in ("running", "ready", "completing") else 0,
                "target": self.target.path, "source": self.source_path,
                "seconds": round(time.monotonic() - self.started, 3),
                "ready_seconds": self.ready_seconds, "write_block_ms": self.write_block_ms} | (
                    {"errno": self.error, "error": self.message} if self.state == "failed" else {})

    def _pieces(self, offset: int, length: int) -> range:
        return range(offset // PIECE, (offset + max(length, 1) - 1) // PIECE + 1)

    # ----- the write path -------------------------------------------------------------

    async def write(self, offset: int, length: int, op: Callable[[Source], Awaitable[None]]) -> None:
        """A device write (or discard) of [offset, offset+length), already clipped:
        ``op(source)`` does it to the device's source (its OSError reaches the
        caller), then to the target as the module docstring says (M4)."""
        pieces = self._pieces(offset, length)
        while (busy := next((self._copying[i] for i in pieces if i in self._copying), None)) is not None:
            await busy.wait()
        for i in pieces:                                   # no await since the check
            self.touched[i] = 1
            self._pending[i] = self._pending.get(i, 0) + 1
        mirror = self.copied[pieces.start:pieces.stop].any()
        try:
            await op(self.tracker.source)
            if mirror and self.active:
                await self._to_target(op)
        finally:
            for i in pieces:
                left = self._pending.pop(i) - 1
                if left:
                    self._pending[i] = left
                elif i in self._drained:
                    self._drained.pop(i).set()

    async def _to_target(self, op: Callable[[Source], Awaitable[None]]) -> None:
        with self.target_users.using():
            try:
                await op(self.target)
            except OSError as exc:
                self.fail(exc, f"writing {self.target.path}")

    # ----- the copy -------------------------------------------------------------------

    async def run(self, fresh_holes: Callable[[], list[tuple[int, int]]] | None) -> None:
        """The background copy, one pass (M3); ``fresh_holes`` (blocking) lists the
        source's holes when the target is a new file: those pieces need no copy."""
        workers.outside_request()
        try:
            with self._scope:
                if fresh_holes is not None:
                    self._skip_holes(await workers.run(fresh_holes))
                pieces = iter(range(self.count))
                async with trio.open_nursery() as nursery:
                    for _ in range(COPIERS):
                        nursery.start_soon(self._copier, pieces)
                if self.state == "running":
                    self.state = "ready"
                    self.ready_seconds = round(time.monotonic() - self.started, 3)
                    log.info("migration of %s to %s ready (%.1f s)", self.tracker.name,
                             self.target.path, self.ready_seconds)
        except OSError as exc:
            self.fail(exc, "copying")
        finally:
            self._copy_done.set()

    def _skip_holes(self, holes: list[tuple[int, int]]) -> None:
        """Pieces wholly inside a hole of the source that no write touched since the
        start: a new target reads zeros there too."""
        for start, end in holes:
            i = -(-start // PIECE)
            while i < self.count and i * PIECE + self._size(i) <= end:
                if not self.touched[i] and not self.copied[i]:
                    self.copied[i] = 1
                    self.copied_bytes += self._size(i)
                i += 1

    def _size(self, i: int) -> int:
        return min(PIECE, self.total - i * PIECE)

    async def _copier(self, pieces) -> None:
        """One of COPIERS tasks taking the next piece in order (as many run at once as
        ``workers.bulk`` gives turns: one while the devices are busy)."""
        try:
            for i in pieces:
                if not self.copied[i]:
                    await self._copy(i)
        except OSError as exc:
            self.fail(exc, "copying")
        except Exception:             # a bug: fail the migration, never the mount
            log.exception("internal error copying %s", self.tracker.name)
            self.fail(OSError(errno.EIO, "internal error (see the log)"), "copying")

    async def _copy(self, i: int) -> None:
        """Copy piece ``i`` (M2), paced like a backup's read, and while the devices are
        busy holding its turn as long again (at most BUSY_PAUSE_MAX), so the copy takes
        at most about half the disk from the workload; every WRITE_BACK_EVERY
        bytes the write-back of the target is started (not waited for, and no journal
        commit that the workload's fsyncs would wait behind), so that its dirty pages
        never pile up for the pivot's fsync."""
        size = self._size(i)
        delay = self.rate.reserve(size)
        if delay:
            await trio.sleep(delay)
        async with workers.bulk(idle=ioprio.is_idle(COPY_PRIORITY)):
            t0 = time.monotonic()
            done = self._copying[i] = trio.Event()
            try:
                while self._pending.get(i):
                    drained = self._drained.setdefault(i, trio.Event())
                    await drained.wait()
                with self.target_users.using():
                    data = await self.tracker.source.io.read(i * PIECE, size, COPY_PRIORITY)
                    if self.remove is None or not _zeros(data):     # a new file's zeros stay holes
                        await self.target.io.write(i * PIECE, data)
                self.copied[i] = 1
                self.copied_bytes += size
            finally:
                del self._copying[i]
                done.set()
            if workers.priority.busy():   # the workload first: the turn lasts as long again
                await trio.sleep(min(time.monotonic() - t0, BUSY_PAUSE_MAX))
        self._unsynced += size
        if self._unsynced >= WRITE_BACK_EVERY:
            self._unsynced = 0
            with self.target_users.using():
                await self.target.io.run(write_back, self.target.fd)

    # ----- the end --------------------------------------------------------------------

    def fail(self, exc: OSError, what: str) -> None:
        """M4: the migration fails with ``exc``'s errno; the device stays on its source."""
        if not self.active:
            return
        self.error = errno.errorcode.get(exc.errno or errno.EIO, "EIO")
        self.message = f"{what}: {exc.strerror or exc}"
        log.error("migration of %s to %s failed: %s", self.tracker.name, self.target.path, self.message)
        self._end("failed")
        if self._spawn is not None:
            self._spawn(self.close)

    def _end(self, state: str) -> None:
        self.state = state
        if self.tracker.migration is self:
            self.tracker.migration = None
        self._scope.cancel()

    async def cancel(self) -> None:
        """The device stays on its source; a created target is removed. Returns once
        the target is closed (the copy's read in flight and mirror writes in flight
        finish first: milliseconds)."""
        if self.state == "completing":
            raise SnapfsError(errno.EBUSY, f"the migration of {self.tracker.name} is completing")
        if self.active:
            self._end("cancelled")
            log.info("migration of %s to %s cancelled", self.tracker.name, self.target.path)
        await self.close()

    async def close(self) -> None:
        """After the end (not completed): wait for the copy task and every use of the
        target, then close it and remove a created one. Idempotent."""
        if self._closed.is_set():
            return
        await self._copy_done.wait()
        await self.target_users.drained()
        if not self._closed.is_set():
            self._closed.set()
            await workers.run(self.abandon)

    def abandon(self) -> None:
        """Blocking: close the target and remove it if created (also a stop with the
        migration unfinished: the source stays authoritative)."""
        discard_target(self.target, self.remove)

    async def complete(self, record: Callable[[str, str, str], None]) -> Source:
        """The pivot: EAGAIN unless ready. Drains every device write in flight (the
        write gate), makes the target durable, ``record(name, old, new)`` (blocking:
        the state directory), then swaps the device's source. Returns the old source,
        which the caller closes once no read uses it. On any failure the device stays
        on its source and the migration stays ready (or failed, M4)."""
        if self.state != "ready":
            raise SnapfsError(errno.EAGAIN, f"the migration of {self.tracker.name} is {self.state}, "
                              "not ready")
        tracker, old = self.tracker, self.tracker.source
        self.state = "completing"
        try:
            await self._sync_target()       # most of it, while writes still run
            tracker.gate.close()
            held = time.monotonic()
            try:
                await tracker.gate.wait_drained()
                await self._sync_target()
                if self.state != "completing":
                    raise SnapfsError(errno.EIO, f"the target failed: {self.message}")
                try:
                    await workers.run(record, tracker.name, old.path, self.target.path)
                except OSError as exc:
                    raise SnapfsError.from_oserror(exc, "recording the move in the state directory") from None
                tracker.source = self.target          # no await since the checks
                tracker.migration = None
                self.state = "completed"
                self.remove = None
            finally:
                tracker.gate.open()
                self.write_block_ms = round((time.monotonic() - held) * 1000, 3)
        finally:
            if self.state == "completing":
                self.state = "ready"
        log.info("%s now on %s (was %s)", tracker.name, self.target.path, old.path)
        return old

    async def _sync_target(self) -> None:
        with self.target_users.using():
            try:
                await self.target.io.run(self.target.fsync)
            except OSError as exc:
                self.fail(exc, f"syncing {self.target.path}")
                raise SnapfsError(exc.errno or errno.EIO, f"the target failed: {self.message}") from None


def _zeros(data: bytes) -> bool:
    return data == ZERO if len(data) == PIECE else data == bytes(len(data))


# ----- opening the target (blocking: worker threads) ---------------------------------------

def discard_target(target: Source, remove: Callable[[], None] | None) -> None:
    """Close ``target``; remove it when ``remove`` (it was created). Blocking."""
    target.close()
    if remove is not None:
        try:
            remove()
        except OSError as exc:
            log.warning("cannot remove %s: %s", target.path, exc)


def open_target(path: str, size: int, guard: Guard, served_by: str,
                view: View = SAME) -> tuple[Source, Callable[[], None] | None]:
    """TARGET of ``migrate_start``: a block device of at least ``size`` bytes (opened
    O_EXCL), or a new regular file (created 0600, ``size`` bytes, sparse). Refuses what
    a storage may not be (guard.Guard: inside this mount, on a source...). Returns the
    opened target (claimed for ``served_by``) and, for a created file, its remover.
    SnapfsError: EEXIST an existing regular file, ENOSPC a device too small, EINVAL."""
    guard.elsewhere = view.fstypes()
    parent, _, name = path.rstrip("/").rpartition("/")
    try:
        found = view.resolve(path)
    except SnapfsError as exc:
        if exc.errno != errno.ENOENT:
            raise
        found = None
    if found is not None:
        try:
            st = os.stat(found.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            found.close()
            raise SnapfsError.from_oserror(exc, f"target {path}") from None
        try:
            if st is not None:
                return _open_device(found.path, found.shown or path, st, size, guard, served_by), None
        finally:
            found.close()
    if name in ("", ".", ".."):
        raise SnapfsError(errno.EINVAL, f"target {path}: not a file name")
    directory = view.resolve(parent or "/")
    try:
        reason = guard.why_not(os.stat(directory.path), True)
        if reason:
            raise SnapfsError(errno.EINVAL, f"target {path}: {reason}")
        created = os.path.join(directory.path, name)
        fd = os.open(created, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        directory.close()
        raise SnapfsError.from_oserror(exc, f"creating {path}") from None
    except BaseException:
        directory.close()
        raise
    shown = f"{path} (in the mount namespace of pid {view.pid})" if directory.shown else ""

    def remove() -> None:
        try:
            os.unlink(created)
        finally:
            directory.close()
    try:
        os.ftruncate(fd, size)
        target = Source.open(created, served_by, shown)
    except BaseException:
        remove()
        raise
    finally:
        os.close(fd)
    return target, remove


def _open_device(path: str, shown: str, st: os.stat_result, size: int, guard: Guard,
                 served_by: str) -> Source:
    """An existing TARGET with stat ``st``: only a large enough block device will do."""
    if not stat.S_ISBLK(st.st_mode):
        raise SnapfsError(errno.EEXIST, f"target {shown} exists: name a new file or a block device")
    reason = guard.why_not(st, True)
    if reason:
        raise SnapfsError(errno.EINVAL, f"target {shown} {reason}")
    target = Source.open(path, served_by, shown if shown != path else "")
    if target.size < size:
        target.close()
        raise SnapfsError(errno.ENOSPC, f"target {shown} has {target.size} bytes, the device {size}")
    return target


def holes(source: Source) -> Callable[[], list[tuple[int, int]]] | None:
    """For a regular-file source: a blocking callable listing its holes as
    [start, end) byte ranges (SEEK_DATA/SEEK_HOLE); None for a block device."""
    if source.kind != "file":
        return None

    def scan() -> list[tuple[int, int]]:
        found, pos = [], 0
        while pos < source.size:
            try:
                data = os.lseek(source.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:            # no data after pos
                    found.append((pos, source.size))
                    break
                raise
            if data > pos:
                found.append((pos, data))
            pos = os.lseek(source.fd, data, os.SEEK_HOLE)
        return found
    return scan
