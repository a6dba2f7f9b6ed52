"""The control surface: device and snapshot registry, command parsing and execution,
replies and errnos. Knows nothing of FUSE: ``fs.py`` hands it lines, it returns dicts
or raises SnapfsError.

Concurrency: commands run on the trio thread; every path lookup, open, fsync or
fallocate runs in a worker thread (a path may lead back into this very mount, which
only the trio thread can serve). Registry changes happen in synchronous runs after
the last await of a command, and re-check what an await may have changed.
"""

import errno
import json
import logging
import os
import re
import shlex
import stat
from collections.abc import Awaitable, Callable

import trio

from . import __version__
from .diffstorage import DiffStorage
from .errors import SnapfsError
from .params import SECTOR, Params, parse_number, parse_size
from .snapshot import Snapshot, take
from .source import Source
from .stack import Guard
from .tracker import Tracker

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_LINE = 8192                 # bytes in one command: parsing stays within ~2 ms
# snapshot_waitevent: the kernel runs one write to the control file at a time, so a
# waiting command holds up every other one (destroy too) until it returns
MAX_TIMEOUT_MS = 60_000


def check_name(name: str) -> str:
    """Device names: ``[A-Za-z0-9._-]{1,64}``, not ``.`` or ``..`` (EINVAL)."""
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise SnapfsError(errno.EINVAL, f"bad device name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return name


class Controller:
    """Owns the devices and snapshots of one mount and runs control commands."""

    def __init__(self, params: Params, mountpoint: str = ""):
        self.params = params
        self.mountpoint = mountpoint
        self.mount_dev: int | None = None
        self.devices: dict[str, Tracker] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.inode_of_device: Callable[[Tracker], int] = lambda t: 0
        self.restore_cbt: Callable[[Source], object] = lambda source: None
        self.forget_cbt: Callable[[Source], None] = lambda source: None
        self.event_listener: Callable[[], None] | None = None
        self.on_destroyed: Callable[[Snapshot], Awaitable[None]] | None = None
        self.nursery: trio.Nursery | None = None
        self._growing: dict[int, trio.Event] = {}

    # ----- registry helpers --------------------------------------------------------

    def device(self, name: str) -> Tracker:
        try:
            return self.devices[name]
        except KeyError:
            raise SnapfsError(errno.ENOENT, f"no device named {name!r}") from None

    def snapshot(self, snap_id: str) -> Snapshot:
        try:
            return self.snapshots[snap_id]
        except KeyError:
            raise SnapfsError(errno.ESRCH, f"no snapshot {snap_id!r}") from None

    def add_device(self, name: str, source: Source) -> Tracker:
        """Register an opened source (synchronous). EEXIST name or source taken."""
        check_name(name)
        if name in self.devices:
            raise SnapfsError(errno.EEXIST, f"device name {name!r} is taken")
        for other in self.devices.values():
            if _same_source(other.source, source):
                raise SnapfsError(errno.EEXIST, f"{source.path} is already attached as {other.name}")
        cbt = self.restore_cbt(source)
        tracker = Tracker(name, source, self.params, cbt)
        self.devices[name] = tracker
        return tracker

    def guard(self) -> Guard:
        """What storages and sources must not rest on (stack.py), as of now."""
        guard = Guard(self.mount_dev)
        for t in self.devices.values():
            src = t.source.st
            if stat.S_ISBLK(src.st_mode):
                guard.bdevs[src.st_rdev] = t.name
            else:
                guard.files[src.st_dev, src.st_ino] = t.name
        return guard

    async def check_storage(self, snap: Snapshot) -> None:
        """Re-check a snapshot's storage against the devices attached now (one may
        have been attached after create). EINVAL naming the reason."""
        st = os.fstat(snap.storage.fd)     # on this thread: destroy may close the fd
        reason = await trio.to_thread.run_sync(self.guard().why_not, st, True)
        if reason:
            raise SnapfsError(errno.EINVAL, f"storage {snap.storage.description}: {reason}")

    # ----- commands ----------------------------------------------------------------

    async def handle(self, data: bytes) -> tuple[int, bytes]:
        """One write to the control file -> (errno, or 0 on success; the JSON reply).

        Every input gets a reply: SnapfsError becomes its errno, anything else is a bug,
        logged once with its traceback and answered with EIO.
        """
        try:
            reply = {"ok": True} | await self.execute(command_line(data))
            code = 0
        except SnapfsError as exc:
            reply = {"ok": False, "errno": exc.errno_name, "error": exc.message}
            code = exc.errno
        except Exception:
            log.exception("internal error in command %r", bytes(data[:200]))
            reply = {"ok": False, "errno": "EIO", "error": "internal error (see the log)"}
            code = errno.EIO
        return code, (json.dumps(reply) + "\n").encode()

    async def execute(self, line: str) -> dict:
        """Run one command line; return the reply fields (without "ok").

        Raises SnapfsError with the command's errno (EINVAL for malformed lines).
        """
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise SnapfsError(errno.EINVAL, f"cannot parse command: {exc}") from None
        if not words:
            raise SnapfsError(errno.EINVAL, "empty command")
        spec = COMMANDS.get(words[0])
        if spec is None:
            raise SnapfsError(errno.EINVAL, f"unknown command {words[0][:64]!r}")
        method, low, high, usage = spec
        args = words[1:]
        if not low <= len(args) <= high:
            raise SnapfsError(errno.EINVAL, f"usage: {words[0]} {usage}")
        return await getattr(self, method)(*args)

    async def cmd_version(self) -> dict:
        return {"version": __version__}

    async def cmd_status(self) -> dict:
        return self.status()

    async def cmd_attach(self, name: str, path: str) -> dict:
        check_name(name)
        if name in self.devices:
            raise SnapfsError(errno.EEXIST, f"device name {name!r} is taken")
        source = await trio.to_thread.run_sync(open_source, absolute(path, "source"), self.guard())
        try:
            tracker = self.add_device(name, source)
        except BaseException:
            source.close()
            raise
        log.info("attached %s (%s, %d bytes)", name, source.path, source.size)
        return {"name": name, "size": tracker.capacity}

    async def cmd_detach(self, name: str) -> dict:
        tracker = self.device(name)
        if tracker.snapshot_id is not None:
            raise SnapfsError(errno.EBUSY, f"{name} is in snapshot {tracker.snapshot_id}")
        if tracker.open_handles:
            raise SnapfsError(errno.EBUSY, f"{name} is open ({tracker.open_handles} handles)")
        del self.devices[name]
        tracker.detached = True
        self.forget_cbt(tracker.source)
        tracker.source.close()
        log.info("detached %s", name)
        return {}

    async def cmd_cbtinfo(self, name: str) -> dict:
        return self.device(name).cbt.info()

    async def cmd_markdirtyblock(self, name: str, *ranges: str) -> dict:
        tracker = self.device(name)
        parsed = [_parse_range(r, tracker.capacity) for r in ranges]
        for offset, length in parsed:
            tracker.cbt.mark_both(offset, length)
        return {"ranges": len(parsed)}

    async def cmd_snapshot_create(self, storage: str, limit: str, *names: str) -> dict:
        limit_bytes = parse_size(limit)
        if limit_bytes <= 0:
            raise SnapfsError(errno.EINVAL, "limit must be positive")
        storage = absolute(storage, "storage")
        for name in names:
            self._check_addable(self.device(name), None)
        if len(set(names)) != len(names):
            raise SnapfsError(errno.EINVAL, "a device is listed twice")
        guard = self.guard()
        store = await trio.to_thread.run_sync(
            DiffStorage.open, storage, limit_bytes, self.params.diff_storage_minimum,
            lambda st: guard.why_not(st, True))
        snap = Snapshot(store, self.params)
        try:
            for name in names:   # re-check: the registry may have changed during the await
                snap.add(self.device(name))
        except BaseException:
            snap.destroy()
            store.close()
            raise
        if self.nursery is not None:
            store.on_grow = lambda: self.nursery.start_soon(self._grow, store)
        if self.event_listener is not None:
            snap.events.listeners.append(self.event_listener)
        self.snapshots[snap.id] = snap
        log.info("created snapshot %s (%s, limit %d)", snap.id, store.description, limit_bytes)
        return {"id": snap.id}

    def _check_addable(self, tracker: Tracker, snap: Snapshot | None) -> None:
        if snap is not None and tracker.name in snap.trackers:
            raise SnapfsError(errno.EALREADY, f"{tracker.name} is already in snapshot {snap.id}")
        if tracker.snapshot_id is not None:
            raise SnapfsError(errno.EBUSY, f"{tracker.name} is in snapshot {tracker.snapshot_id}")

    async def cmd_snapshot_add(self, snap_id: str, name: str) -> dict:
        snap = self.snapshot(snap_id)
        tracker = self.device(name)
        if snap.taking:
            raise SnapfsError(errno.EBUSY, f"snapshot {snap_id} is being taken")
        self._check_addable(tracker, snap)
        await self.check_storage(snap)
        if snap.destroyed:
            raise SnapfsError(errno.ESRCH, f"snapshot {snap_id} was destroyed meanwhile")
        snap.add(self.device(name))   # re-checks: the registry may have changed meanwhile
        return {}

    async def cmd_snapshot_take(self, snap_id: str, option: str = "") -> dict:
        if option not in ("", "nofreeze"):
            raise SnapfsError(errno.EINVAL, f"unknown take option {option!r} (only nofreeze)")
        snap = self.snapshot(snap_id)
        if snap.taking:
            raise SnapfsError(errno.EALREADY, f"snapshot {snap_id} is being taken")
        snap.taking = True
        try:
            await self.check_storage(snap)
            frozen = await take(snap, lambda: self._device_files(snap),
                                nofreeze=option == "nofreeze")
        finally:
            snap.taking = False
        log.info("took snapshot %s (writes held %.3f ms)", snap_id, snap.last_take_block_ns / 1e6)
        return {"id": snap_id, "frozen": frozen,
                "write_block_ms": round(snap.last_take_block_ns / 1e6, 3)}

    def _device_files(self, snap: Snapshot) -> set[tuple[int, int]]:
        if self.mount_dev is None:
            return set()
        return {(self.mount_dev, self.inode_of_device(t)) for t in snap.trackers.values()}

    async def cmd_snapshot_destroy(self, snap_id: str) -> dict:
        snap = self.snapshot(snap_id)
        del self.snapshots[snap_id]
        storage = snap.destroy()
        if self.on_destroyed is not None:   # drop cached image pages before replying
            await self.on_destroyed(snap)
        growing = self._growing.get(id(storage))
        if growing is not None:   # never close the fd under a running fallocate
            await growing.wait()
        await trio.to_thread.run_sync(storage.close)
        log.info("destroyed snapshot %s", snap_id)
        return {}

    async def cmd_snapshot_collect(self) -> dict:
        return {"ids": list(self.snapshots)}

    async def cmd_snapshot_info(self, name: str) -> dict:
        tracker = self.device(name)
        if tracker.snapshot_id is None:
            raise SnapfsError(errno.ESRCH, f"{name} is not in a snapshot")
        snap = self.snapshots[tracker.snapshot_id]
        return {"id": snap.id, "image": f"snapshots/{snap.id}/{name}",
                "error_code": snap.error_code(name)}

    async def cmd_snapshot_waitevent(self, snap_id: str, timeout_ms: str) -> dict:
        snap = self.snapshot(snap_id)
        timeout = parse_number(timeout_ms, "timeout (milliseconds)", MAX_TIMEOUT_MS)
        event = await wait_event(snap, timeout / 1000)
        return {"event": event}

    async def _grow(self, storage: DiffStorage) -> None:
        """Growth worker: fallocate in a thread; writers keep going meanwhile."""
        if id(storage) in self._growing or storage.retired:
            return
        done = self._growing[id(storage)] = trio.Event()
        target = storage.requested
        try:
            await trio.to_thread.run_sync(storage.grow_blocking, target)
        except OSError as exc:
            storage.grow_failed(exc)
        else:
            storage.grow_done(target)
        finally:
            del self._growing[id(storage)]
            done.set()

    async def destroy_all(self) -> None:
        """Stop's first step, on the trio thread: destroy every snapshot, so blocked
        event readers get EOF and waiters ESRCH, and no request stays blocked."""
        for snap_id in list(self.snapshots):
            if snap_id in self.snapshots:
                await self.cmd_snapshot_destroy(snap_id)

    # ----- status --------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "params": vars(self.params),
            "devices": {name: t.statistics() for name, t in self.devices.items()},
            "snapshots": {sid: s.info() for sid, s in self.snapshots.items()},
        }


async def wait_event(snap: Snapshot, seconds: float) -> dict:
    """Pop the next unconsumed event, waiting up to ``seconds``.

    Raises SnapfsError: ETIMEDOUT, or ESRCH when the snapshot is destroyed meanwhile.
    """
    changed = trio.Event()
    listener = changed.set
    snap.events.listeners.append(listener)
    try:
        with trio.move_on_after(seconds):
            while True:
                event = snap.events.pop_nowait()
                if event is not None:
                    return event
                if snap.destroyed:
                    raise SnapfsError(errno.ESRCH, f"snapshot {snap.id} was destroyed")
                await changed.wait()
                changed = trio.Event()
                snap.events.listeners.remove(listener)
                listener = changed.set
                snap.events.listeners.append(listener)
    finally:
        snap.events.listeners.remove(listener)
    raise SnapfsError(errno.ETIMEDOUT, f"no event within {seconds * 1000:.0f} ms")


def command_line(data: bytes) -> str:
    """The one command line in one write: at most MAX_LINE bytes (E2BIG), UTF-8, no
    NUL, one line (a trailing newline is allowed) (EINVAL)."""
    if len(data) > MAX_LINE:
        raise SnapfsError(errno.E2BIG, f"command longer than {MAX_LINE} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise SnapfsError(errno.EINVAL, "command is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if "\n" in text or "\0" in text:
        raise SnapfsError(errno.EINVAL, "one command per write, one line, no NUL bytes")
    return text


def absolute(path: str, what: str) -> str:
    """Paths in commands name files as the daemon sees them: relative ones would resolve
    against its working directory, so they are refused (the CLI sends absolute ones)."""
    if not path.startswith("/"):
        raise SnapfsError(errno.EINVAL, f"{what} path {path[:64]!r} is not absolute")
    return path


def open_source(path: str, guard: Guard) -> Source:
    """Blocking: refuse a source the data path would wait on itself through (stack.py),
    then open it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"source {path}") from None
    reason = guard.why_not(st, False)
    if reason:
        raise SnapfsError(errno.EINVAL, f"source {path} {reason}")
    return Source.open(path)


def _parse_range(text: str, capacity: int) -> tuple[int, int]:
    """``SECTOR:COUNT`` (512-byte sectors) -> (offset, length) in bytes; EINVAL if
    malformed or outside the device."""
    sector, sep, count = text.partition(":")
    if not sep:
        raise SnapfsError(errno.EINVAL, f"bad range {text[:64]!r}: use SECTOR:COUNT")
    offset = parse_number(sector, "sector") * SECTOR
    length = parse_number(count, "sector count") * SECTOR
    if length == 0 or offset + length > capacity:
        raise SnapfsError(errno.EINVAL, f"range {text[:64]} is outside the device ({capacity} bytes)")
    return offset, length


def _same_source(a: Source, b: Source) -> bool:
    if a.kind == "bdev" and b.kind == "bdev":
        return a.st.st_rdev == b.st.st_rdev
    return (a.st.st_dev, a.st.st_ino) == (b.st.st_dev, b.st.st_ino)


# command -> (method, min args, max args, usage)
COMMANDS = {
    "version": ("cmd_version", 0, 0, ""),
    "status": ("cmd_status", 0, 0, ""),
    "attach": ("cmd_attach", 2, 2, "NAME PATH"),
    "detach": ("cmd_detach", 1, 1, "NAME"),
    "cbtinfo": ("cmd_cbtinfo", 1, 1, "NAME"),
    "markdirtyblock": ("cmd_markdirtyblock", 2, 10_000, "NAME SECTOR:COUNT..."),
    "snapshot_create": ("cmd_snapshot_create", 2, 1_000, "STORAGE LIMIT [NAME...]"),
    "snapshot_add": ("cmd_snapshot_add", 2, 2, "ID NAME"),
    "snapshot_take": ("cmd_snapshot_take", 1, 2, "ID [nofreeze]"),
    "snapshot_destroy": ("cmd_snapshot_destroy", 1, 1, "ID"),
    "snapshot_collect": ("cmd_snapshot_collect", 0, 0, ""),
    "snapshot_info": ("cmd_snapshot_info", 1, 1, "NAME"),
    "snapshot_waitevent": ("cmd_snapshot_waitevent", 2, 2, "ID TIMEOUT_MS"),
}
