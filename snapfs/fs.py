"""The pyfuse3 adapter: one small class per kind of file, an inode table, and
``Operations``, which only dispatches to them and maps errors in one place.

Tree (docs/design.md): ``control``, ``status``, ``audit``, ``audit.1``, ``devices/NAME``,
``snapshots/ID/{NAME,info,events}``, ``cbt/NAME/{info,map}``. Each entry is an object
of a kind below (``DeviceFile``, ``ImageFile``, ``JsonFile``, ``ControlFile``,
``EventsFile``, ``CbtMapFile``, ``AuditFile``; ``RootDir``, ``ListingDir``, ``SnapshotDir``,
``CbtDeviceDir``); its ``key`` (kind, objects)
identifies it. Children are computed from the registry on every lookup; inode
numbers are handed out once per key and never reused. A node whose entry is gone
answers ENOENT, and is dropped from the table when the kernel forgets it.

Each file kind's ``open`` returns a handle with its own ``read``/``write``/``fsync``/
``poll``/``release``. Errors: SnapfsError and OSError become FUSEError with their
errno in ``_fuse_errors`` (fusecommon.py); anything else is a bug (errors.py): logged once with its
traceback and answered with EIO, and the mount keeps serving (a pyfuse3 handler
raising anything but FUSEError would end the mount).
"""

import errno
import json
import logging
import os
import select
import stat
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from . import control, ioprio, procs, workers
from .errors import SnapfsError
from .fusecommon import BaseOperations, fuse_errors
from .namespace import View
from .protect import AuditLog, Writer
from .registry import INTERRUPT_CHECK, Registry
from .snapshot import Snapshot
from .tracker import Tracker

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
BLKSIZE = 1 << 20     # st_blksize: cp and other tools read this much at a time


_fuse_errors = fuse_errors(log)           # the one place where errors become errnos


# ----- handles ---------------------------------------------------------------------------

class Handle:
    """An open file. Defaults: read-only, nothing to sync, always ready."""

    direct_io = True

    async def read(self, offset: int, size: int) -> bytes:
        raise SnapfsError(errno.EBADF, "not readable")

    async def write(self, offset: int, data: bytes) -> int:
        raise SnapfsError(errno.EBADF, "read-only file")

    async def fsync(self) -> None:
        pass

    def poll(self, poll_handle) -> int:
        return select.POLLIN | select.POLLOUT

    def release(self) -> None:
        pass


class BlockHandle(Handle):
    """A device or an image: reads and writes go to ``target`` (a Tracker or an
    Image) through the kernel's page cache (direct_io off); ``sync`` is the fsync;
    ``on_release`` runs when the kernel releases the handle."""

    direct_io = False

    def __init__(self, target, sync, on_release=None):
        self.target, self.sync, self.on_release = target, sync, on_release

    async def read(self, offset, size):
        return await self.target.read(offset, size)

    async def write(self, offset, data):
        return await self.target.write(offset, data)

    async def fsync(self):
        await self.sync()

    def release(self):
        if self.on_release is not None:
            self.on_release()


class DeviceHandle(BlockHandle):
    """A device: writes carry who opened the handle (``writer``: FUSE's pid and uid
    of the open; pyfuse3 gives a write no request context) for protected ranges."""

    def __init__(self, target, sync, on_release, writer: Writer):
        super().__init__(target, sync, on_release)
        self.writer = writer

    async def write(self, offset, data):
        return await self.target.write(offset, data, self.writer)


class ImageHandle(BlockHandle):
    """A snapshot image: direct I/O (``direct_io``), no page cache and no kernel
    read-ahead, so a backup's copy does not fill the page cache with the image nor
    queue read-ahead ahead of the devices' own requests (measured: docs/performance.md);
    each read is one request of the reader's size (``st_blksize`` tells ``cp`` to use
    1 MiB) and takes its turn (docs/concurrency.md rule 4); the daemon reads ahead of a
    sequential reader itself (readahead.py)."""

    direct_io = True


class ContentHandle(Handle):
    """status, info, cbt info: JSON frozen at open; the CBT map: bytes frozen at open;
    an audit file: its bytearray, read as it grows (until it is rotated out)."""

    def __init__(self, content: bytes | bytearray):
        self.content = content

    async def read(self, offset, size):
        return bytes(self.content[offset : offset + size])


class ControlHandle(Handle):
    """One command per write; the reply waits here for the next read (offsets ignored).
    Paths in commands are resolved where the opener sees them (``view``: pyfuse3's
    write has no request context, so the open's pid decides, as for the uid); a
    waiting ``snapshot_waitevent`` ends with EINTR once that pid has a signal pending."""

    def __init__(self, registry: Registry, view: View):
        self.registry, self.view, self.reply = registry, view, b""

    async def write(self, offset, data):
        code, self.reply = await control.handle(self.registry, data, self.view)
        if code:
            raise pyfuse3.FUSEError(code)
        return len(data)

    async def read(self, offset, size):
        data, self.reply = self.reply[:size], self.reply[size:]
        return data

    def release(self):
        self.view.close()


HOLDERS_CHECK = 0.6    # seconds between scans for the holders of a blocked events file


class EventsHandle(Handle):
    """Reads block at the end of the log until the next event, or EOF once destroyed,
    or EINTR once a reader has a signal pending (the kernel holds a reader in a FUSE
    request until it is answered, SIGKILL or not, and pyfuse3 does not pass the
    kernel's interrupts on): the opener (``pid``, the reader in practice) is looked at
    every INTERRUPT_CHECK, every process holding this events file (an inherited
    descriptor) every HOLDERS_CHECK; with O_NONBLOCK, EAGAIN."""

    def __init__(self, snap: Snapshot, flags: int, waiters: "Waiters", pid: int = 0):
        self.snap, self.flags, self.waiters, self.pid = snap, flags, waiters, pid
        self.position = 0
        self.poll_handle = None
        self._next_scan: float | None = None   # set when a read first blocks

    async def read(self, offset, size):
        log_ = self.snap.events
        while True:
            data = log_.read(offset, size)
            if data or log_.closed:
                self.position = offset + len(data)
                return data
            if self.flags & os.O_NONBLOCK:
                raise SnapfsError(errno.EAGAIN, "no new event")
            if procs.signal_pending(self.pid) or await self._holder_signalled():
                raise SnapfsError(errno.EINTR, "the reader has a signal pending")
            with trio.move_on_after(INTERRUPT_CHECK):
                await self.waiters.wait()

    async def _holder_signalled(self) -> bool:
        """Every HOLDERS_CHECK seconds (a scan of every process's descriptors, in a
        worker thread): whether a process holding this events file has a signal pending."""
        now = trio.current_time()
        if self._next_scan is None:
            self._next_scan = now + HOLDERS_CHECK
        if now < self._next_scan:
            return False
        self._next_scan = now + HOLDERS_CHECK
        suffix = f"/snapshots/{self.snap.id}/events"
        return await workers.run(procs.holder_signalled, suffix)

    def poll(self, poll_handle):
        events = self.snap.events
        if len(events.text) > self.position or events.closed:
            return select.POLLIN
        self.poll_handle = poll_handle
        self.waiters.pollers.add(self)
        return 0

    def release(self):
        self.waiters.pollers.discard(self)


class Waiters:
    """Blocked event readers and pollers; the registry's listener wakes them."""

    def __init__(self) -> None:
        self._changed = trio.Event()
        self.pollers: set[EventsHandle] = set()

    async def wait(self) -> None:
        await self._changed.wait()

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        for handle in list(self.pollers):
            if handle.poll_handle is not None:
                handle.poll_handle.notify()
                handle.poll_handle = None
        self.pollers.clear()


# ----- entries: one class per kind of file ----------------------------------------------

@dataclass
class Attrs:
    mode: int
    size: int = 0
    owner: tuple[int, int] | None = None     # None: the mount's owner
    cache: bool = False                      # device and image attrs may be cached 1 s
    backup: bool = False                     # an image or CBT file: --image-group may read it


class Entry:
    """A kind of file or directory. ``key`` identifies the object it shows."""

    key: tuple = ()

    def attrs(self) -> Attrs:
        raise NotImplementedError

    def children(self, registry: Registry) -> "dict[str, Entry]":
        return {}

    async def open(self, ops: "Operations", flags: int, ctx) -> Handle:
        raise SnapfsError(errno.EISDIR, "is a directory")


class Dir(Entry):
    def attrs(self):
        return Attrs(stat.S_IFDIR | 0o755)


class Gone(Entry):
    """What a node of a destroyed snapshot or a detached device shows until the kernel
    forgets its inode: nothing, and no reference to the object (its maps would stay in
    memory as long as the kernel keeps the dentry, which may be for ever). Such a node
    is not alive (``Operations._alive``), so every request on it is ENOENT."""

    def __init__(self, inode: int):
        self.key = ("gone", inode)

    def attrs(self):
        raise SnapfsError(errno.ENOENT, "destroyed")


class RootDir(Dir):
    key = ("root",)

    def children(self, registry):
        audit = registry.audit
        previous = {"audit.1": AuditFile(audit, audit.generation - 1)} if audit.previous is not None else {}
        return {"control": ControlFile(), "status": JsonFile(("status",), registry.status),
                "audit": AuditFile(audit, audit.generation), **previous,
                "devices": ListingDir("devices", "devices", DeviceFile),
                "snapshots": ListingDir("snapshots", "snapshots", SnapshotDir),
                "cbt": ListingDir("cbt", "devices", CbtDeviceDir)}


class ListingDir(Dir):
    """``devices``, ``snapshots``, ``cbt``: one entry per object of a registry table."""

    def __init__(self, name: str, table: str, make):
        self.key, self.table, self.make = (name,), table, make

    def children(self, registry):
        return {name: self.make(obj) for name, obj in getattr(registry, self.table).items()}


class SnapshotDir(Dir):
    def __init__(self, snap: Snapshot):
        self.snap, self.key = snap, ("snapdir", snap)

    def children(self, registry):
        snap = self.snap
        images = {name: ImageFile(snap, name) for name in snap.areas} if snap.taken else {}
        return {"info": JsonFile(("info", snap), snap.info), "events": EventsFile(snap), **images}


class CbtDeviceDir(Dir):
    def __init__(self, tracker: Tracker):
        self.tracker, self.key = tracker, ("cbtdir", tracker)

    def children(self, registry):
        t = self.tracker
        return {"info": JsonFile(("cbtinfo", t), t.cbt.info, source=t), "map": CbtMapFile(t)}


def _source_owner(tracker: Tracker) -> tuple[int, int]:
    return tracker.source.st.st_uid, tracker.source.st.st_gid


class DeviceFile(Entry):
    def __init__(self, tracker: Tracker):
        self.tracker, self.key = tracker, ("device", tracker)

    def attrs(self):
        t = self.tracker
        return Attrs(stat.S_IFREG | t.source.st.st_mode & 0o777, t.capacity, _source_owner(t), True)

    async def open(self, ops, flags, ctx):
        t = self.tracker
        t.open_handles += 1      # detach waits for none

        def release() -> None:
            t.open_handles -= 1

        return DeviceHandle(t, t.sync, release, Writer(ctx.pid, ctx.uid))


class ImageFile(Entry):
    """Mode and owner of the source, without write for others."""

    def __init__(self, snap: Snapshot, name: str):
        self.snap, self.name, self.key = snap, name, ("image", snap, name)

    def attrs(self):
        t = self.snap.trackers[self.name]
        return Attrs(stat.S_IFREG | t.source.st.st_mode & 0o775, t.capacity, _source_owner(t), True,
                     backup=True)

    async def open(self, ops, flags, ctx):
        image = self.snap.image(self.name, ioprio.of(ctx.pid))
        return ImageHandle(image, lambda: ops.registry.sync_image(image.area), image.close)


class ReadOnlyFile(Entry):
    async def open(self, ops, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise SnapfsError(errno.EACCES, "read-only file")
        return self.handle(ops, flags, ctx.pid)

    def handle(self, ops: "Operations", flags: int, pid: int = 0) -> Handle:
        raise NotImplementedError


class JsonFile(ReadOnlyFile):
    """status and snapshot info: 0400 to the mount's owner (they name sources and
    storage); cbt info (``source``): the source's owner and read bits."""

    def __init__(self, key: tuple, produce, source: Tracker | None = None):
        self.key, self.produce, self.source = key, produce, source

    def attrs(self):
        if self.source is None:
            return Attrs(stat.S_IFREG | 0o400)
        return Attrs(stat.S_IFREG | self.source.source.st.st_mode & 0o444, 0, _source_owner(self.source),
                     backup=True)

    def handle(self, ops, flags, pid=0):
        return ContentHandle((json.dumps(self.produce()) + "\n").encode())


class CbtMapFile(ReadOnlyFile):
    """Which blocks changed when: as private as the data (the source's read bits)."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.key = tracker, ("cbtmap", tracker)

    def attrs(self):
        t = self.tracker
        return Attrs(stat.S_IFREG | t.source.st.st_mode & 0o444, t.cbt.block_count, _source_owner(t),
                     backup=True)

    def handle(self, ops, flags, pid=0):
        return ContentHandle(bytes(self.tracker.cbt.read_map))


class AuditFile(ReadOnlyFile):
    """``audit`` (the current generation of the log) or ``audit.1`` (the one before):
    0400 to the mount's owner; a new inode at each rotation, so ``tail -F`` follows."""

    def __init__(self, audit: AuditLog, generation: int):
        self.audit, self.generation, self.key = audit, generation, ("audit", audit, generation)

    def _content(self) -> bytearray:
        current = self.generation == self.audit.generation
        return self.audit.current if current else self.audit.previous or bytearray()

    def attrs(self):
        return Attrs(stat.S_IFREG | 0o400, len(self._content()))

    def handle(self, ops, flags, pid=0):
        return ContentHandle(self._content())


class EventsFile(ReadOnlyFile):
    def __init__(self, snap: Snapshot):
        self.snap, self.key = snap, ("events", snap)

    def attrs(self):
        return Attrs(stat.S_IFREG | 0o444)

    def handle(self, ops, flags, pid=0):
        return EventsHandle(self.snap, flags, ops.waiters, pid)


class ControlFile(Entry):
    """0600, and the request's uid is checked too (CAP_DAC_OVERRIDE passes the mode)."""

    key = ("control",)

    def attrs(self):
        return Attrs(stat.S_IFREG | 0o600)

    async def open(self, ops, flags, ctx):
        if ctx.uid not in (0, ops.owner[0]):
            raise SnapfsError(errno.EACCES, "only root or the mount's owner may send commands")
        return ControlHandle(ops.registry, View.of_pid(ctx.pid))


# ----- the inode table and Operations -------------------------------------------------

@dataclass
class OpenFile:
    """A device or image file open: its path in the mount, and the pid and command
    that opened it (FUSE's request context; the loop device's ``losetup``, say)."""

    path: str
    pid: int
    comm: str

    def __str__(self) -> str:
        return f"{self.path} (opened by pid {self.pid} {self.comm})"


@dataclass(eq=False)
class Node:
    inode: int
    entry: Entry
    parent: int
    name: str
    lookups: int = 0
    ctime_ns: int = field(default_factory=time.time_ns)


class Operations(BaseOperations):
    """pyfuse3 handlers: look up entries, open handles, dispatch. Also the registry's
    listener: wakes event readers, drops cached image pages at destroy. Keeps who has
    device and image files open (``data_files``), which a stop waits for; once
    ``stopping`` is set, new opens of them get ESHUTDOWN."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, owner_uid: int, owner_gid: int, invalidate=pyfuse3.invalidate_inode,
                 image_group: int | None = None, invalidate_entry=pyfuse3.invalidate_entry_async):
        super().__init__()
        self._invalidate = invalidate     # tests without a mount pass recorders
        self._invalidate_entry = invalidate_entry
        self.registry: Registry | None = None
        self.owner = (owner_uid, owner_gid)
        self.image_group = image_group    # --image-group: images and CBT files readable by it
        self.waiters = Waiters()
        self._nodes: dict[int, Node] = {ROOT: Node(ROOT, RootDir(), ROOT, "")}
        self._by_key: dict[tuple, int] = {RootDir.key: ROOT}
        self._next_inode = ROOT + 1
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.data_files: dict[int, OpenFile] = {}
        self.stopping = False
        self._data_closed = trio.Event()

    def show(self, registry: Registry) -> "Operations":
        """Show ``registry`` (built with this object as its listener); returns self."""
        self.registry = registry
        return self

    # ----- the registry's listener -----------------------------------------------------

    def events_changed(self) -> None:
        self.waiters.wake()

    async def snapshot_destroyed(self, snap: Snapshot) -> None:
        """Let go of the snapshot (``_let_go``: its directory snapshots/ID), then drop
        the kernel's cached pages of its images, so an open image handle cannot read
        them after destroy (in a thread: the kernel may wait for a read of that image,
        which this loop must answer)."""
        for inode in self._let_go(snap, "snapdir").get("image", ()):
            try:
                await workers.run(self._invalidate, inode)
            except OSError as exc:     # ENOENT: the kernel never looked it up
                log.debug("invalidating image inode %d: %s", inode, exc)

    def device_detached(self, tracker: Tracker) -> None:
        """Let go of the device (``_let_go``: devices/NAME and cbt/NAME)."""
        self._let_go(tracker, "device", "cbtdir")

    def _let_go(self, obj, *dropped: str) -> dict[str, list[int]]:
        """The nodes showing ``obj`` become ``Gone`` (they held it, and with it its maps,
        until the kernel's FORGET, which it sends only when it evicts the inode), and
        the kernel is asked to drop the entries of the kinds ``dropped``, so that it
        forgets them. Returns the inodes let go, by kind."""
        by_kind: dict[str, list[int]] = {}
        for key, inode in [(k, i) for k, i in self._by_key.items() if len(k) > 1 and k[1] is obj]:
            node = self._nodes[inode]
            del self._by_key[key]
            node.entry = Gone(inode)
            self._by_key[node.entry.key] = inode
            by_kind.setdefault(key[0], []).append(inode)
            if key[0] in dropped:
                self._invalidate_entry(node.parent, node.name.encode("utf-8", "surrogateescape"),
                                       ignore_enoent=True)
        return by_kind

    # ----- the inode table -------------------------------------------------------------

    def _node_for(self, entry: Entry, parent: int, name: str) -> Node:
        inode = self._by_key.get(entry.key)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._by_key[entry.key] = inode
            self._nodes[inode] = Node(inode, entry, parent, name)
        return self._nodes[inode]

    def _alive(self, node: Node) -> bool:
        while node.inode != ROOT:
            parent = self._nodes.get(node.parent)
            child = parent.entry.children(self.registry).get(node.name) if parent else None
            if child is None or child.key != node.entry.key:
                return False
            node = parent
        return True

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None or not self._alive(node):
            raise SnapfsError(errno.ENOENT, f"inode {inode} is gone")
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        spec = node.entry.attrs()
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode, a.st_size = spec.mode, spec.size
        a.st_uid, a.st_gid = spec.owner or self.owner
        if spec.backup and self.image_group is not None:   # read, never write: not the source's group
            a.st_gid, a.st_mode = self.image_group, (a.st_mode & ~stat.S_IWGRP) | stat.S_IRGRP
        a.st_nlink = 2 if stat.S_ISDIR(spec.mode) else 1
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.ctime_ns
        a.st_blksize = BLKSIZE
        a.st_blocks = -(-spec.size // 512)
        a.entry_timeout = a.attr_timeout = 1 if spec.cache else 0
        return a

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise SnapfsError(errno.EBADF, "unknown file handle") from None

    # ----- handlers --------------------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        entry = parent.entry.children(self.registry).get(text)
        if entry is None:
            raise SnapfsError(errno.ENOENT, f"no entry {text[:80]!r}")
        node = self._node_for(entry, parent.inode, text)
        node.entry = entry
        node.lookups += 1
        return self._attrs(node)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            node = self._nodes.get(inode)
            if node is None or inode == ROOT:
                continue
            node.lookups = max(0, node.lookups - count)
            if node.lookups == 0 and not self._alive(node):
                del self._nodes[inode]
                self._by_key.pop(node.entry.key, None)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode))

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size and attr.st_size != node.entry.attrs().size \
                and not isinstance(node.entry, ControlFile):
            raise SnapfsError(errno.EPERM, "device and image sizes are fixed")
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise SnapfsError(errno.EPERM, "modes and owners follow the source")
        return self._attrs(node)

    @_fuse_errors
    async def opendir(self, inode, ctx):
        if not isinstance(self._node(inode).entry, Dir):
            raise SnapfsError(errno.ENOTDIR, "not a directory")
        return inode

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        node = self._node(fh)
        entries = sorted(node.entry.children(self.registry).items())
        for i, (name, entry) in enumerate(entries[start_id:], start_id + 1):
            child = self._node_for(entry, node.inode, name)
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(child), i):
                break
            child.lookups += 1

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        data = isinstance(node.entry, (DeviceFile, ImageFile))
        if data and self.stopping:
            raise SnapfsError(errno.ESHUTDOWN, "the mount is stopping: no new device or image opens")
        handle = await node.entry.open(self, flags, ctx)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._handles[fh] = handle
        if data:
            self.data_files[fh] = OpenFile(self._path(node), ctx.pid, procs.comm(ctx.pid))
        return pyfuse3.FileInfo(fh=fh, direct_io=handle.direct_io, keep_cache=False)

    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.release()
        if self.data_files.pop(fh, None) is not None:
            self._data_closed.set()
            self._data_closed = trio.Event()

    async def data_file_closed(self) -> None:
        """Returns at the next release of a device or image file."""
        await self._data_closed.wait()

    def _path(self, node: Node) -> str:
        parts = []
        while node is not None and node.inode != ROOT:
            parts.append(node.name)
            node = self._nodes.get(node.parent)
        return "/".join(reversed(parts))

    async def flush(self, fh):
        pass

    @_fuse_errors
    async def fsync(self, fh, datasync):
        await self._handle(fh).fsync()

    @_fuse_errors
    async def read(self, fh, off, size):
        return await self._handle(fh).read(off, size)

    @_fuse_errors
    async def write(self, fh, off, buf):
        return await self._handle(fh).write(off, buf)

    @_fuse_errors
    async def poll(self, inode, fh, poll_handle, ctx):
        return self._handle(fh).poll(poll_handle)
