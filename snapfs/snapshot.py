"""A snapshot: its devices, its difference storage and events; create/add/take/destroy.

Lifecycle: created (devices may be added) -> taken (images exist, COW on) ->
destroyed (images gone, COW off, storage freed; tracking goes on).

Take (docs/design.md section 5), in ``point_in_time``:
    1. freeze filesystems stacked on member device files (worker thread, FUSE keeps
       serving the flush);
    2. close every member's write gate and wait for admitted writes;
    3. (no fsync of the sources: a decision, docs/design.md section 5);
    4. ``switch``: one synchronous step, no await: build every diff area, switch every
       CBT, enable COW;
    5. open the gates; thaw (always, even on failure).
Writes wait only during 2-4. A failure before 4 changes nothing; 4 builds everything
that can fail (the areas) before it commits anything.
"""

import errno
import logging
import time
import uuid
from collections.abc import Callable

import trio

from . import freeze, workers
from .diffarea import DiffArea
from .diffstorage import DiffStorage
from .errors import SnapfsError
from .events import EventLog
from .params import Params, chunk_size
from .readahead import ReadAhead
from .tracker import Tracker

log = logging.getLogger(__name__)


class Image:
    """One device's snapshot image as its readers see it, bound to the diff area of
    the take (a handle kept open across destroy and a new snapshot never reads the new
    one). Reads: stored old data or the source; writes: only to the storage, marking
    both CBT maps."""

    def __init__(self, tracker: Tracker, area: DiffArea, prio: int = 0):
        self.tracker = tracker
        self.area = area
        self.prio = prio          # the opener's I/O priority (ioprio), for its reads
        self.ahead = ReadAhead(area, prio)

    async def read(self, offset: int, size: int) -> bytes:
        return await self.ahead.read(offset, size)

    def close(self) -> None:
        """The handle is released: reads ahead are cancelled."""
        self.ahead.drop()

    async def write(self, offset: int, data) -> int:
        return await self.tracker.image_write(self.area, offset, data)


class Snapshot:
    def __init__(self, storage: DiffStorage, params: Params, events: EventLog | None = None):
        self.id = str(uuid.uuid4())
        self.storage = storage
        self.params = params
        self.events = events if events is not None else EventLog()
        self.trackers: dict[str, Tracker] = {}
        self.areas: dict[str, DiffArea] = {}
        self.taken = False
        self.destroyed = False
        self.created_ns = time.time_ns()
        self.taken_ns = 0
        self.last_take_block_ns = 0
        self.taking = False
        self.not_frozen: list[str] = []   # loop devices over members that could not be frozen

    @property
    def state(self) -> str:
        if not self.taken:
            return "created"
        return "corrupted" if any(a.error for a in self.areas.values()) else "taken"

    def add(self, tracker: Tracker) -> None:
        """Add a device before take. EALREADY in it; EBUSY in another or taken."""
        check_addable(tracker, self)
        if self.taken:
            raise SnapfsError(errno.EBUSY, f"snapshot {self.id} is taken; add devices before take")
        self.trackers[tracker.name] = tracker
        tracker.snapshot_id = self.id

    def switch(self) -> None:
        """Take step 4: the point in time. Synchronous, no await: atomic under trio."""
        areas = {
            name: DiffArea(name, t.source, t.capacity, chunk_size(t.capacity, self.params),
                           self.storage, self.events)
            for name, t in self.trackers.items()
        }
        for name, t in self.trackers.items():
            t.cbt.switch()
            t.area = areas[name]
        self.areas = areas
        self.taken = True
        self.taken_ns = time.time_ns()

    def destroy(self) -> DiffStorage:
        """Remove images, stop COW. Returns the storage for the caller to close (in a
        thread: closing a large tmpfile can take a while). Synchronous."""
        for t in self.trackers.values():
            t.area = None
            t.snapshot_id = None
        for area in self.areas.values():
            area.close()
        self.destroyed = True
        self.storage.retire()
        self.events.close()
        return self.storage

    def image(self, name: str, prio: int = 0) -> Image:
        """The image of member ``name`` as read with I/O priority ``prio`` (taken
        snapshots only; KeyError otherwise)."""
        return Image(self.trackers[name], self.areas[name], prio)

    def error_code(self, name: str) -> int:
        area = self.areas.get(name)
        return -area.error if area and area.error else 0

    def info(self) -> dict:
        devices = {}
        for name, t in self.trackers.items():
            area = self.areas.get(name)
            devices[name] = area.statistics() if area else {
                "chunk_size": chunk_size(t.capacity, self.params), "state": "created"}
            devices[name]["size"] = t.capacity
        return {
            "id": self.id,
            "state": self.state,
            "created_ns": self.created_ns,
            "taken_ns": self.taken_ns,
            "take_write_block_ms": round(self.last_take_block_ns / 1e6, 3),
            "not_frozen": self.not_frozen,
            "devices": devices,
            "events": len(self.events.events),
        } | self.storage.statistics()


def check_addable(tracker: Tracker, snap: Snapshot | None) -> None:
    """A device may join ``snap`` (None: a new snapshot): EALREADY when it is in it,
    EBUSY when it is in another or migrating (docs/design.md §4 Migration)."""
    if snap is not None and tracker.name in snap.trackers:
        raise SnapfsError(errno.EALREADY, f"{tracker.name} is already in snapshot {snap.id}")
    if tracker.snapshot_id is not None:
        raise SnapfsError(errno.EBUSY, f"{tracker.name} is in snapshot {tracker.snapshot_id}")
    if tracker.migration is not None:
        raise SnapfsError(errno.EBUSY, f"{tracker.name} is migrating: snapshot it once the "
                          "migration completed or was cancelled")


async def point_in_time(snap: Snapshot, device_files: Callable[[], set[tuple[int, int]]],
                        nofreeze: bool = False) -> list[str]:
    """Take ``snap``: freeze, hold writes, switch, thaw (module docstring).
    ``device_files`` returns the (st_dev, st_ino) of the member device files, for
    finding stacked filesystems (called in a thread).

    Returns the mount points frozen. Raises SnapfsError: EALREADY taken, ENODEV no
    devices, ESRCH destroyed meanwhile; nothing is changed then.
    """
    if snap.taken:
        raise SnapfsError(errno.EALREADY, f"snapshot {snap.id} is already taken")
    if snap.destroyed:
        raise SnapfsError(errno.ESRCH, f"snapshot {snap.id} was destroyed")
    if not snap.trackers:
        raise SnapfsError(errno.ENODEV, f"snapshot {snap.id} has no devices")
    trackers = list(snap.trackers.values())
    frozen: list = []
    try:
        if not nofreeze:
            frozen, snap.not_frozen = await workers.run(freeze_stacked, device_files)
        if snap.destroyed:
            raise SnapfsError(errno.ESRCH, f"snapshot {snap.id} was destroyed during take")
        if snap.taken:
            raise SnapfsError(errno.EALREADY, f"snapshot {snap.id} was taken meanwhile")
        await _switch_with_writes_held(snap, trackers)
        return [mp for mp, _ in frozen]
    finally:
        if frozen:   # always, even when cancelled: a frozen filesystem blocks its writers
            with trio.CancelScope(shield=True):
                await workers.run(freeze.thaw, frozen)


def freeze_stacked(device_files: Callable[[], set[tuple[int, int]]]) -> tuple[list, list[str]]:
    """Blocking: freeze the filesystems stacked on the device files ``device_files()``
    names (take step 1, and ``cdp_mark``); (frozen, loop devices not frozen)."""
    mounts, hidden = freeze.stacked_mounts(device_files())
    for loop in hidden:
        log.warning("not freezing %s: it is in use but no mount of it is visible here "
                    "(another mount namespace?); the image is crash-consistent", loop)
    return (freeze.freeze(mounts) if mounts else []), hidden


async def _switch_with_writes_held(snap: Snapshot, trackers: list[Tracker]) -> None:
    t0 = time.perf_counter_ns()
    for t in trackers:
        t.gate.close()
    try:
        for t in trackers:
            await t.gate.wait_drained()
        if snap.destroyed:
            raise SnapfsError(errno.ESRCH, f"snapshot {snap.id} was destroyed during take")
        snap.switch()
    finally:
        for t in trackers:
            t.gate.open()
        snap.last_take_block_ns = time.perf_counter_ns() - t0

