"""The registry of one mount: its devices and snapshots, and their lifecycle.

attach/detach devices; create/add/take/destroy snapshots; wait for events; growth of
difference storage and fsync of it (both in worker threads, both awaited by destroy);
status. Knows nothing of FUSE or of command lines: ``control.py`` parses commands
and calls these methods, ``fs.py`` shows ``devices`` and ``snapshots``.

Collaborators are given at construction, as small interfaces:
    cbt_store: ``restore(source) -> Restored`` (the CBT or None, the protected
               ranges), ``forget(source)``, ``moved(source)`` and ``record_move(name, old,
               new)`` (cbtstate.py);
    journals:  the record of running CDP journals (journal.JournalStates), taken up
               again when their source is attached;
    listener:  ``events_changed()`` after any event of any snapshot, and
               ``async snapshot_destroyed(snap)`` once a snapshot is gone (fs.py drops
               cached image pages there).

Concurrency (docs/concurrency.md): methods run on the trio thread; every path lookup,
open, fsync or fallocate runs in a worker thread (a path may lead back into this very
mount, which only the trio thread can serve). Registry changes happen in synchronous
runs after the last await of a method, and re-check what an await may have changed.
"""

import errno
import logging
import os
from collections.abc import Callable
from typing import Protocol

import trio

from . import __version__, cdp, workers
from .cbtstate import Restored
from .commands import check_name
from .diffarea import DiffArea
from .diffstorage import DiffStorage
from .errors import SnapfsError
from .events import EventLog
from .freeze import thaw
from .guard import Guard
from .journal import JournalStates
from .migrate import Migration, discard_target, holes, open_target
from .namespace import SAME, View
from .params import SECTOR, Params
from .protect import AuditLog, Rules, ranges_text
from .snapshot import Snapshot, check_addable, freeze_stacked, point_in_time
from .source import Source
from .tracker import Tracker
from .workers import InFlight

log = logging.getLogger(__name__)

INTERRUPT_CHECK = 0.2   # seconds between looks whether a waiting sender was signalled


class CbtStore(Protocol):
    def restore(self, source: Source) -> Restored: ...
    def forget(self, source: Source) -> None: ...
    def moved(self, source: Source) -> str | None: ...
    def record_move(self, name: str, old: str, new: str) -> None: ...


class Listener(Protocol):
    def events_changed(self) -> None: ...
    async def snapshot_destroyed(self, snap: Snapshot) -> None: ...
    def device_detached(self, tracker: Tracker) -> None: ...


class _NoStore:
    def restore(self, source: Source) -> Restored:
        return Restored(None, [])

    def forget(self, source: Source) -> None:
        pass

    def moved(self, source: Source) -> None:
        return None

    def record_move(self, name: str, old: str, new: str) -> None:
        pass


class _NoListener:
    def events_changed(self) -> None:
        pass

    async def snapshot_destroyed(self, snap: Snapshot) -> None:
        pass

    def device_detached(self, tracker: Tracker) -> None:
        pass


class Registry:
    """Owns the devices and snapshots of one mount."""

    def __init__(self, params: Params, mountpoint: str = "", cbt_store: CbtStore | None = None,
                 listener: Listener | None = None, journals: JournalStates | None = None):
        self.params = params
        self.journals = journals        # where running CDP journals are recorded (None: nowhere)
        self.mountpoint = mountpoint
        self.mount_dev: int | None = None
        self.devices: dict[str, Tracker] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.migrations: dict[str, Migration] = {}   # the last one of each device
        self.cbt_store = cbt_store or _NoStore()
        self.listener = listener or _NoListener()
        self._nursery: trio.Nursery | None = None
        self.audit = AuditLog(params.audit_file_size)   # MOUNT/audit (protect.py)
        self.takes = InFlight()         # takes in progress: a stop waits for their freeze
        self.stopping = False           # a stop began: commands are refused
        self.on_stop: Callable[[bool, str], None] | None = None   # the lifecycle's (stop.py)

    def mounted(self, mount_dev: int | None) -> None:
        """The mount exists: its device number (storage and sources must not rest on it)."""
        self.mount_dev = mount_dev

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run background work (storage growth) until cancelled. Without it, storage
        grows inline on the writer's request."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # ----- lookups -------------------------------------------------------------------

    def device(self, name: str) -> Tracker:
        try:
            return self.devices[name]
        except KeyError:
            raise SnapfsError(errno.ENOENT, f"no device named {name[:80]!r}") from None

    def snapshot(self, snap_id: str) -> Snapshot:
        try:
            return self.snapshots[snap_id]
        except KeyError:
            raise SnapfsError(errno.ESRCH, f"no snapshot {snap_id[:80]!r}") from None

    def snapshot_of(self, name: str) -> Snapshot:
        """The snapshot device ``name`` is in: ENOENT device, ESRCH none."""
        tracker = self.device(name)
        if tracker.snapshot_id is None:
            raise SnapfsError(errno.ESRCH, f"{name} is not in a snapshot")
        return self.snapshots[tracker.snapshot_id]

    # ----- devices -------------------------------------------------------------------

    def add_device(self, name: str, source: Source) -> Tracker:
        """Register an opened source (synchronous). EEXIST name or source taken."""
        check_name(name)
        if name in self.devices:
            raise SnapfsError(errno.EEXIST, f"device name {name!r} is taken")
        for other in self.devices.values():
            if other.source.same_as(source):
                raise SnapfsError(errno.EEXIST, f"{source.path} is already attached as {other.name}")
        moved = self.cbt_store.moved(source)
        if moved:
            raise SnapfsError(errno.ESTALE, moved)
        restored = self.cbt_store.restore(source)
        tracker = Tracker(name, source, self.params, restored.cbt)
        self._restore_rules(tracker, restored.rules)
        self.devices[name] = tracker
        return tracker

    async def attach(self, name: str, path: str, view: View = SAME) -> Tracker:
        """Open ``path`` (absolute, where ``view`` sees it: namespace.py) in a thread,
        refusing what the data path would wait on itself through (guard.py), and
        register it."""
        check_name(name)
        if name in self.devices:
            raise SnapfsError(errno.EEXIST, f"device name {name!r} is taken")
        source = await workers.run(open_source, path, self.guard(), self.mountpoint, view)
        try:
            await self._check_under_storage(name, source)
            tracker = self.add_device(name, source)
        except BaseException:
            source.close()
            raise
        log.info("attached %s (%s, %d bytes)", name, source.path, source.size)
        await workers.run(self.resume_journal, tracker)
        return tracker

    async def _check_under_storage(self, name: str, source: Source) -> None:
        """A live snapshot's storage must not rest on a new source: its copies would
        change that source behind its tracker. EINVAL naming the snapshot."""
        only = Guard(None).add(name, source.st)
        for snap in list(self.snapshots.values()):
            if snap.storage.closed:
                continue
            reason = await workers.run(only.why_not, os.fstat(snap.storage.fd), True)
            if reason:
                raise SnapfsError(errno.EINVAL, f"{source.path} is under the storage of snapshot "
                                  f"{snap.id} ({snap.storage.description} {reason})")

    def detach(self, name: str) -> None:
        """EBUSY while in a snapshot or open; the CBT history is forgotten."""
        tracker = self.device(name)
        if tracker.snapshot_id is not None:
            raise SnapfsError(errno.EBUSY, f"{name} is in snapshot {tracker.snapshot_id}")
        if tracker.open_handles:
            raise SnapfsError(errno.EBUSY, f"{name} is open ({tracker.open_handles} handles)")
        if tracker.migration is not None:
            raise SnapfsError(errno.EBUSY, f"{name} is migrating (migrate_cancel first)")
        if tracker.recorder is not None:
            raise SnapfsError(errno.EBUSY, f"{name} has a CDP journal (cdp_stop first)")
        del self.devices[name]
        tracker.detached = True
        self.cbt_store.forget(tracker.source)
        tracker.source.close()
        self.listener.device_detached(tracker)
        log.info("detached %s", name)

    def mark_dirty(self, name: str, ranges: list[tuple[int, int]]) -> None:
        """Mark byte ranges changed in both CBT maps (already checked to lie inside)."""
        tracker = self.device(name)
        for offset, length in ranges:
            tracker.cbt.mark_both(offset, length)

    def protect(self, tracker: Tracker, action: str, ranges: list[tuple[int, int]]) -> None:
        """Protect byte ranges of a device (protect.Rules.add: all or none)."""
        rules = tracker.rules or Rules(tracker.name, tracker.capacity, self.audit)
        rules.add(action, ranges)
        tracker.rules = rules
        log.info("%s: %s %s", tracker.name, action, ranges_text(ranges))

    def _restore_rules(self, tracker: Tracker, saved: list[tuple[str, int, int]]) -> None:
        """Protected ranges saved at the last clean stop; one that no longer fits
        is logged and dropped (cbtstate.py checked them against the source's size)."""
        for action, first, count in saved:
            try:
                self.protect(tracker, action, [(first * SECTOR, count * SECTOR)])
            except SnapfsError as exc:
                log.warning("%s: saved %s range %d:%d dropped: %s", tracker.name, action, first, count, exc)

    def unprotect(self, tracker: Tracker, ranges: list[tuple[int, int]] | None) -> None:
        """Unprotect byte ranges of a device, or all of them (None); ENOENT when it
        has no rule (protect.Rules.remove)."""
        if tracker.rules is None:
            raise SnapfsError(errno.ENOENT, f"{tracker.name} has no protected range")
        tracker.rules.remove(ranges)
        if not tracker.rules:
            tracker.rules = None       # the write path tests only this
        log.info("%s: unprotected %s", tracker.name, "all" if ranges is None else ranges_text(ranges))

    def close_sources(self) -> None:
        for tracker in self.devices.values():
            tracker.source.close()

    # ----- the storage guard -----------------------------------------------------------

    def guard(self) -> Guard:
        """What storages and sources must not rest on (guard.py), as of now."""
        guard = Guard(self.mount_dev)
        for t in self.devices.values():
            guard.add(t.name, t.source.st)
        return guard

    async def check_storage(self, snap: Snapshot) -> None:
        """Re-check a snapshot's storage against the devices attached now (one may
        have been attached after create). EINVAL naming the reason."""
        st = os.fstat(snap.storage.fd)     # on this thread: destroy may close the fd
        reason = await workers.run(self.guard().why_not, st, True)
        if reason:
            raise SnapfsError(errno.EINVAL, f"storage {snap.storage.description}: {reason}")

    # ----- snapshots -------------------------------------------------------------------

    async def create(self, storage: str, limit: int, names: list[str], view: View = SAME) -> Snapshot:
        """A new snapshot of ``names`` with its storage at ``storage`` (absolute, where
        ``view`` sees it: namespace.py)."""
        if limit <= 0:
            raise SnapfsError(errno.EINVAL, "limit must be positive")
        for name in names:
            check_addable(self.device(name), None)
        if len(set(names)) != len(names):
            raise SnapfsError(errno.EINVAL, "a device is listed twice")
        guard, events = self.guard(), EventLog([self.listener.events_changed])

        def open_storage() -> DiffStorage:
            def forbidden(st):
                return guard.why_not(st, True)
            guard.elsewhere = view.fstypes()
            target = view.resolve(storage, create_in=forbidden)
            try:
                return DiffStorage.open(target.path, limit, self.params.diff_storage_minimum, forbidden,
                                        on_grow=self._schedule_grow, shown=target.shown,
                                        on_no_space=lambda n: events.post("no_space", requested_bytes=n))
            finally:
                target.close()

        store = await workers.run(open_storage)
        snap = Snapshot(store, self.params, events)
        try:
            for name in names:   # re-check: the registry may have changed during the await
                snap.add(self.device(name))
        except BaseException:
            snap.destroy()
            store.close()
            raise
        self.snapshots[snap.id] = snap
        log.info("created snapshot %s (%s, limit %d)", snap.id, store.description, limit)
        return snap

    async def add(self, snap_id: str, name: str) -> None:
        snap = self.snapshot(snap_id)
        tracker = self.device(name)
        if snap.taking:
            raise SnapfsError(errno.EBUSY, f"snapshot {snap_id} is being taken")
        check_addable(tracker, snap)
        await self.check_storage(snap)
        if snap.destroyed:
            raise SnapfsError(errno.ESRCH, f"snapshot {snap_id} was destroyed meanwhile")
        snap.add(self.device(name))   # re-checks: the registry may have changed meanwhile

    async def take(self, snap_id: str, nofreeze: bool) -> list[str]:
        """Take the snapshot (snapshot.point_in_time); returns the mount points frozen."""
        snap = self.snapshot(snap_id)
        if snap.taking:
            raise SnapfsError(errno.EALREADY, f"snapshot {snap_id} is being taken")
        snap.taking = True
        try:
            with self.takes.using():
                await self.check_storage(snap)
                frozen = await point_in_time(snap, lambda: self._device_files(snap), nofreeze=nofreeze)
        finally:
            snap.taking = False
        log.info("took snapshot %s (writes held %.3f ms)", snap_id, snap.last_take_block_ns / 1e6)
        return frozen

    def _device_files(self, snap: Snapshot) -> set[tuple[int, int]]:
        return self._files_of(list(snap.trackers))

    def _files_of(self, names: list[str]) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of these device files as the kernel reports them
        (blocking: a stat through this mount, so only from a worker thread)."""
        if not self.mountpoint:
            return set()
        found = set()
        for name in names:
            try:
                st = os.stat(os.path.join(self.mountpoint, "devices", name))
            except OSError as exc:
                log.warning("device file of %s not found (%s): not freezing through it", name, exc)
                continue
            found.add((st.st_dev, st.st_ino))
        return found

    async def destroy(self, snap_id: str) -> None:
        """Images gone, COW off, cached image pages dropped, storage closed once no
        growth or fsync uses it."""
        snap = self.snapshot(snap_id)
        del self.snapshots[snap_id]
        storage = snap.destroy()
        await self.listener.snapshot_destroyed(snap)
        await storage.in_flight.drained()  # never close an fd a thread still uses
        await workers.run(storage.close)
        log.info("destroyed snapshot %s", snap_id)

    def request_stop(self, force: bool) -> None:
        """The ``stop`` command: ask the lifecycle for a stop (stop.py), forced or not.
        ENOTSUP without one (a registry with no mount)."""
        if self.on_stop is None:
            raise SnapfsError(errno.ENOTSUP, "nothing here can stop this mount")
        self.on_stop(force, "stop command" + (" (force)" if force else ""))

    async def stop(self) -> None:
        """A stop's first step, while the request loop still serves: refuse new
        commands, destroy every snapshot (blocked event readers get EOF, waiters
        ESRCH), and wait for takes in progress (a freeze flushes through this mount and
        must be served; the take then fails with ESRCH and thaws)."""
        self.stopping = True
        for migration in list(self.migrations.values()):
            if migration.active:
                await migration.cancel()
        for snap_id in list(self.snapshots):
            if snap_id in self.snapshots:
                await self.destroy(snap_id)
        await self.takes.drained()

    async def wait_event(self, snap_id: str, seconds: float,
                         interrupted: Callable[[], bool] = lambda: False) -> dict:
        """Pop the next unconsumed event, waiting up to ``seconds``. ETIMEDOUT, ESRCH
        when the snapshot is destroyed meanwhile, EINTR once ``interrupted()`` (asked
        every INTERRUPT_CHECK seconds: the sender has a signal pending)."""
        snap = self.snapshot(snap_id)
        changed = trio.Event()

        def wake() -> None:
            changed.set()

        snap.events.listeners.append(wake)
        try:
            with trio.move_on_after(seconds):
                while True:
                    event = snap.events.pop_nowait()
                    if event is not None:
                        return event
                    if snap.destroyed:
                        raise SnapfsError(errno.ESRCH, f"snapshot {snap.id} was destroyed")
                    if interrupted():
                        raise SnapfsError(errno.EINTR, "the sender has a signal pending")
                    with trio.move_on_after(INTERRUPT_CHECK):
                        await changed.wait()
                    changed = trio.Event()
        finally:
            snap.events.listeners.remove(wake)
        raise SnapfsError(errno.ETIMEDOUT, f"no event within {seconds * 1000:.0f} ms")

    async def sync_image(self, area: DiffArea) -> None:
        """fsync of an image handle: make its difference storage durable (in a thread;
        destroy waits for it before closing the fd)."""
        if area.closed:
            return
        with area.storage.in_flight.using():
            await area.storage.io.run(area.storage.sync)

    # ----- migration (migrate.py) -------------------------------------------------------

    def migration(self, name: str) -> Migration:
        """The last migration of device ``name``: ENOENT device, ESRCH none."""
        self.device(name)
        try:
            return self.migrations[name]
        except KeyError:
            raise SnapfsError(errno.ESRCH, f"{name} has not been migrated") from None

    def _check_migratable(self, tracker: Tracker) -> None:
        if tracker.snapshot_id is not None:
            raise SnapfsError(errno.EBUSY, f"{tracker.name} is in snapshot {tracker.snapshot_id}: "
                              "migrate it once the snapshot is destroyed")
        if tracker.migration is not None:
            raise SnapfsError(errno.EBUSY, f"{tracker.name} is migrating already")
        if tracker.recorder is not None:     # its record names the source by path (journal.py)
            raise SnapfsError(errno.EBUSY, f"{tracker.name} has a CDP journal: cdp_stop first")
        if self._nursery is None:
            raise SnapfsError(errno.ENOTSUP, "no background tasks here to copy with")

    async def migrate_start(self, name: str, path: str, rate_mib: float = 0, view: View = SAME) -> Migration:
        """Start moving device ``name`` to ``path`` (migrate.open_target): the writes
        in flight are drained first (M5), then the copy runs in the background."""
        self._check_migratable(self.device(name))
        target, remove = await workers.run(open_target, path, self.device(name).capacity,
                                           self.guard(), self.mountpoint, view)
        try:
            tracker = self.device(name)     # re-check: the registry may have changed meanwhile
            self._check_migratable(tracker)
            if target.same_as(tracker.source):
                raise SnapfsError(errno.EINVAL, f"{path} is the source of {name}")
        except BaseException:
            await workers.run(discard_target, target, remove)
            raise
        migration = Migration(tracker, target, remove, rate_mib, spawn=self._nursery.start_soon)
        tracker.migration = migration       # no await since the checks
        self.migrations[name] = migration
        tracker.gate.close()
        try:
            await tracker.gate.wait_drained()
        finally:
            tracker.gate.open()
        self._nursery.start_soon(migration.run, holes(tracker.source) if remove else None)
        log.info("migrating %s from %s to %s", name, tracker.source.path, target.path)
        return migration

    async def migrate_complete(self, name: str) -> None:
        """The pivot (Migration.complete), then the old source is closed once no read
        uses it (its lock and claim released)."""
        old = await self.migration(name).complete(self.cbt_store.record_move)
        await old.users.drained()
        await workers.run(old.close)

    async def migrate_cancel(self, name: str) -> None:
        await self.migration(name).cancel()

    # ----- storage growth -----------------------------------------------------------

    def _schedule_grow(self, storage: DiffStorage) -> bool:
        """DiffStorage's growth hook: start the worker; False without one (grow inline)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(self._grow, storage)
        return True

    async def _grow(self, storage: DiffStorage) -> None:
        """Growth worker: fallocate in a thread; writers keep going meanwhile."""
        if storage.retired:
            return
        target = storage.requested
        workers.outside_request()     # spawned from a device write: not part of it
        with storage.in_flight.using():
            try:
                await storage.io.run(storage.grow_blocking, target)
            except OSError as exc:
                storage.grow_failed(exc)
            else:
                storage.grow_done(target)

    # ----- CDP journals (cdp.py) -------------------------------------------------------

    def recorder(self, name: str) -> cdp.Recorder:
        """The journal of device ``name``: ENOENT device, ESRCH none."""
        tracker = self.device(name)
        if tracker.recorder is None:
            raise SnapfsError(errno.ESRCH, f"{name} has no CDP journal")
        return tracker.recorder

    async def cdp_start(self, name: str, storage: str, limit: int, retain_ns: int | None,
                        view: View = SAME) -> cdp.Recorder:
        """Journal every later write of ``name`` into the directory ``storage``
        (refused as a difference storage would be: §4 Guard). EBUSY journaled already
        or the directory in use; EINVAL limit, not a directory, refused."""
        tracker = self.device(name)
        if tracker.recorder is not None:
            raise SnapfsError(errno.EBUSY, f"{name} has a CDP journal already (cdp_stop first)")
        if tracker.migration is not None:
            raise SnapfsError(errno.EBUSY, f"{name} is migrating: start its journal once it is done")
        if limit < cdp.LIMIT_MIN:
            raise SnapfsError(errno.EINVAL, f"limit {limit} is below {cdp.LIMIT_MIN} bytes")
        rec = await workers.run(cdp.start_blocking, tracker, self.guard(), storage, limit,
                                retain_ns or 0, view)
        if tracker.recorder is not None or tracker.detached:   # changed during the await
            await workers.run(rec.remove_files)
            raise SnapfsError(errno.EBUSY, f"{name} changed while its journal was being started")
        tracker.recorder = rec
        if self.journals is not None:
            await workers.run(self.journals.save, tracker.source.path, rec.config())
        log.info("CDP journal of %s started in %s (limit %d)", name, storage, limit)
        return rec

    async def cdp_stop(self, name: str) -> None:
        """End the journal of ``name``: its views are destroyed, its files removed."""
        rec = self.recorder(name)
        for view in list(rec.views):
            if view.id in self.snapshots:
                await self.destroy(view.id)
        rec.fail("cdp_stop")
        tracker = self.device(name)
        if tracker.recorder is rec:
            tracker.recorder = None
        await workers.run(rec.remove_files)
        if self.journals is not None:
            await workers.run(self.journals.forget, tracker.source.path)
        log.info("CDP journal of %s stopped", name)

    async def cdp_mark(self, name: str, label: str, nofreeze: bool) -> tuple[int, list[str]]:
        """A named instant of ``name``, with the filesystems stacked on it frozen
        (as take does) unless ``nofreeze``: (its time in ns, mount points frozen)."""
        rec = self.recorder(name)
        frozen: list = []
        try:
            if not nofreeze:
                frozen, _ = await workers.run(freeze_stacked, lambda: self._files_of([name]))
            return await rec.mark(label), [mp for mp, _ in frozen]
        finally:
            if frozen:
                with trio.CancelScope(shield=True):
                    await workers.run(thaw, frozen)

    async def cdp_view(self, name: str, when: str) -> cdp.CdpView:
        """The device ``name`` as it was at ``when``, shown as a snapshot image."""
        rec = self.recorder(name)
        instant, label = rec.instant(when)
        rec.check_viewable(instant)
        events = EventLog([self.listener.events_changed])
        scratch = await workers.run(cdp.open_scratch, rec, self.params, self._schedule_grow)
        try:
            rec.check_viewable(instant)        # again: the history may have moved
        except BaseException:
            await workers.run(scratch.close)
            raise
        view = cdp.CdpView(rec, instant, label, scratch, self.params, events)
        self.snapshots[view.id] = view
        log.info("CDP view %s of %s at %.6f", view.id, name, instant / 1e9)
        return view

    def resume_journal(self, tracker: Tracker) -> None:
        """Blocking: take up the journal a previous mount ran on this source (state.py),
        if any. Failures are logged: the device works without it."""
        config = self.journals.load(tracker.source.path) if self.journals is not None else None
        if config is None:
            return
        try:
            tracker.recorder = cdp.resume_blocking(tracker, config)
        except (OSError, SnapfsError) as exc:
            log.error("cannot take up the CDP journal of %s in %s: %s", tracker.name, config["storage"], exc)

    def close_journals(self) -> None:
        """Clean stop (blocking): journals synced, recorded with the CBT generation, closed."""
        for tracker in self.devices.values():
            rec = tracker.recorder
            if rec is None:
                continue
            try:
                rec.close(sync=True)
                if rec.running and self.journals is not None:
                    self.journals.save(tracker.source.path, rec.config())
            except OSError as exc:
                log.error("closing the CDP journal of %s: %s", tracker.name, exc)

    # ----- status ----------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "params": vars(self.params),
            "devices": {name: t.statistics() for name, t in self.devices.items()},
            "snapshots": {sid: s.info() for sid, s in self.snapshots.items()},
            "migrations": {name: m.info() for name, m in self.migrations.items()},
            "cdp": {name: t.recorder.info() for name, t in self.devices.items() if t.recorder},
        }


def open_source(path: str, guard: Guard, served_by: str = "", view: View = SAME) -> Source:
    """Blocking: find ``path`` where ``view`` sees it (namespace.py), refuse a source
    the data path would wait on itself through (guard.py), then open it (claimed for
    the mount at ``served_by``, claims.Claim)."""
    guard.elsewhere = view.fstypes()
    target = view.resolve(path)
    name = target.shown or path
    try:
        try:
            st = os.stat(target.path)
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"source {name}") from None
        same = guard.source_name(st)
        if same is not None:
            raise SnapfsError(errno.EEXIST, f"{name} is already attached as {same}")
        reason = guard.why_not(st, False)
        if reason:
            raise SnapfsError(errno.EINVAL, f"source {name} {reason}")
        return Source.open(target.path, served_by, target.shown)
    finally:
        target.close()
