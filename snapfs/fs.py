"""The pyfuse3 adapter: inode table, open handles, and handlers that translate and
call down into the core. Errors become ``FUSEError`` in one place (``_fuse_errors``):
a pyfuse3 handler raising anything else would end the mount.

Tree (DESIGN.md section 2): ``control``, ``status``, ``devices/NAME``,
``snapshots/ID/{NAME,info,events}``, ``cbt/NAME/{info,map}``. Children are computed
from the controller's registry on every lookup; inode numbers are handed out once per
(kind, object) and never reused. A node whose object is gone answers ENOENT, and is
dropped from the table when the kernel forgets it.
"""

import errno
import functools
import json
import logging
import os
import select
import stat
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from .control import Controller
from .diffarea import DiffArea
from .errors import SnapfsError

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
STATIC_DIRS = ("devices", "snapshots", "cbt")


def _fuse_errors(handler):
    """The one place where errors become errnos. SnapfsError and OSError map to their
    errno; anything else is a bug: logged with its traceback and answered with EIO so
    that the workload's device keeps working."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SnapfsError as exc:
            log.debug("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(eq=False)
class Node:
    inode: int
    key: tuple          # (kind, *objects): identifies what the node shows
    parent: int
    name: str
    lookups: int = 0
    ctime_ns: int = field(default_factory=time.time_ns)

    @property
    def kind(self) -> str:
        return self.key[0]


@dataclass(eq=False)
class Handle:
    node: Node
    flags: int
    uid: int = 0
    content: bytes = b""        # status/info: JSON frozen at open
    reply: bytes = b""          # control: the pending reply
    area: DiffArea | None = None
    position: int = 0           # events: end of the last read, for poll
    poll_handle: object = None


def _err(code: int, message: str) -> SnapfsError:
    return SnapfsError(code, message)


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a Controller."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, controller: Controller, owner_uid: int, owner_gid: int):
        super().__init__()
        self.ctl = controller
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid
        self._nodes: dict[int, Node] = {ROOT: Node(ROOT, ("root",), ROOT, "")}
        self._by_key: dict[tuple, int] = {("root",): ROOT}
        self._next_inode = ROOT + 1
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._events_changed = trio.Event()
        controller.inode_of_device = self._device_inode
        controller.event_listener = self.events_changed
        controller.on_destroyed = self.snapshot_destroyed

    # ----- the tree -----------------------------------------------------------------

    def _children(self, node: Node) -> dict[str, tuple]:
        kind, ctl = node.kind, self.ctl
        if kind == "root":
            return {"control": ("control",), "status": ("status",),
                    **{d: (d,) for d in STATIC_DIRS}}
        if kind == "devices":
            return {n: ("device", t) for n, t in ctl.devices.items()}
        if kind == "snapshots":
            return {sid: ("snapdir", s) for sid, s in ctl.snapshots.items()}
        if kind == "snapdir":
            snap = node.key[1]
            images = {n: ("image", snap, n) for n in snap.areas} if snap.taken else {}
            return {"info": ("info", snap), "events": ("events", snap), **images}
        if kind == "cbt":
            return {n: ("cbtdir", t) for n, t in ctl.devices.items()}
        if kind == "cbtdir":
            return {"info": ("cbtinfo", node.key[1]), "map": ("cbtmap", node.key[1])}
        return {}

    def _device_inode(self, tracker) -> int:
        devices = self._node_for(("devices",), ROOT, "devices")
        return self._node_for(("device", tracker), devices.inode, tracker.name).inode

    def _node_for(self, key: tuple, parent: int, name: str) -> Node:
        inode = self._by_key.get(key)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._by_key[key] = inode
            self._nodes[inode] = Node(inode, key, parent, name)
        return self._nodes[inode]

    def _alive(self, node: Node) -> bool:
        while node.inode != ROOT:
            parent = self._nodes.get(node.parent)
            if parent is None or self._children(parent).get(node.name) != node.key:
                return False
            node = parent
        return True

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None or not self._alive(node):
            raise _err(errno.ENOENT, f"inode {inode} is gone")
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_uid, a.st_gid = self.owner_uid, self.owner_gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.ctime_ns
        a.st_blksize = 128 * 1024
        a.entry_timeout = a.attr_timeout = 0
        kind, size = node.kind, 0
        if kind in ("root", "snapdir", "cbtdir") or kind in STATIC_DIRS:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        elif kind in ("device", "image"):
            tracker = node.key[1] if kind == "device" else node.key[1].trackers[node.key[2]]
            src = tracker.source.st
            perm = src.st_mode & 0o777 if kind == "device" else src.st_mode & 0o775
            a.st_mode, a.st_uid, a.st_gid = stat.S_IFREG | perm, src.st_uid, src.st_gid
            size = tracker.capacity
            a.entry_timeout = a.attr_timeout = 1
        elif kind == "control":
            a.st_mode = stat.S_IFREG | 0o600
        elif kind in ("status", "info"):         # they name sources and storage: owner only
            a.st_mode = stat.S_IFREG | 0o400
        elif kind in ("cbtinfo", "cbtmap"):      # who changed what when: as private as the data
            src = node.key[1].source.st
            a.st_mode, a.st_uid, a.st_gid = stat.S_IFREG | src.st_mode & 0o444, src.st_uid, src.st_gid
            size = node.key[1].cbt.block_count if kind == "cbtmap" else 0
        else:
            a.st_mode = stat.S_IFREG | 0o444
        a.st_size = size
        a.st_blocks = -(-size // 512)
        a.st_nlink = a.st_nlink or 1
        return a

    # ----- lookup / attributes --------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        key = self._children(parent).get(text)
        if key is None:
            raise _err(errno.ENOENT, f"no entry {text!r}")
        node = self._node_for(key, parent.inode, text)
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
                self._by_key.pop(node.key, None)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode))

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size:
            size = self._attrs(node).st_size
            if node.kind != "control" and attr.st_size != size:
                raise _err(errno.EPERM, "device and image sizes are fixed")
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise _err(errno.EPERM, "modes and owners follow the source")
        return self._attrs(node)

    @_fuse_errors
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not stat.S_ISDIR(self._attrs(node).st_mode):
            raise _err(errno.ENOTDIR, "not a directory")
        return inode

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        node = self._node(fh)
        entries = sorted(self._children(node).items())
        for i, (name, key) in enumerate(entries[start_id:], start_id + 1):
            child = self._node_for(key, node.inode, name)
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(child), i):
                break
            child.lookups += 1

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # ----- open / release -------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        handle = Handle(node, flags, uid=ctx.uid)
        kind = node.kind
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        direct = True
        if kind == "control":
            if ctx.uid not in (0, self.owner_uid):
                raise _err(errno.EACCES, "only root or the mount's owner may send commands")
        elif kind == "device":
            node.key[1].open_handles += 1
            direct = False
        elif kind == "image":
            snap, name = node.key[1], node.key[2]
            handle.area = snap.areas[name]
            direct = False
        elif writing:
            raise _err(errno.EACCES, "read-only file")
        elif kind == "status":
            handle.content = _json(self.ctl.status())
        elif kind == "info":
            handle.content = _json(node.key[1].info())
        elif kind == "cbtinfo":
            handle.content = _json(node.key[1].cbt.info())
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=False)

    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.node.kind == "device":
            handle.node.key[1].open_handles -= 1

    async def flush(self, fh):
        pass

    @_fuse_errors
    async def fsync(self, fh, datasync):
        handle = self._handle(fh)
        if handle.node.kind == "device":
            await trio.to_thread.run_sync(handle.node.key[1].source.fsync)
        elif handle.area is not None and not handle.area.closed:
            await trio.to_thread.run_sync(os.fsync, handle.area.storage.fd)

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise _err(errno.EBADF, "unknown file handle") from None

    # ----- read / write ---------------------------------------------------------------

    @_fuse_errors
    async def read(self, fh, off, size):
        handle = self._handle(fh)
        kind = handle.node.kind
        if kind == "device":
            tracker = handle.node.key[1]
            if tracker.detached:
                raise _err(errno.EIO, f"device {tracker.name} was detached")
            return tracker.read(off, size)
        if kind == "image":
            return handle.area.read(off, size)
        if kind == "control":
            data, handle.reply = handle.reply[:size], handle.reply[size:]
            return data
        if kind == "events":
            return await self._read_events(handle, off, size)
        if kind == "cbtmap":
            return bytes(handle.node.key[1].cbt.read_map[off : off + size])
        return handle.content[off : off + size]

    async def _read_events(self, handle: Handle, off: int, size: int) -> bytes:
        log_ = handle.node.key[1].events
        while True:
            data = log_.read(off, size)
            if data or log_.closed:
                handle.position = off + len(data)
                return data
            if handle.flags & os.O_NONBLOCK:
                raise _err(errno.EAGAIN, "no new event")
            await self._wait_events()

    async def _wait_events(self) -> None:
        await self._events_changed.wait()

    def events_changed(self) -> None:
        """Listener for every snapshot's EventLog: wake blocked readers and pollers."""
        self._events_changed.set()
        self._events_changed = trio.Event()
        for handle in self._handles.values():
            if handle.poll_handle is not None:
                handle.poll_handle.notify()
                handle.poll_handle = None

    @_fuse_errors
    async def write(self, fh, off, buf):
        handle = self._handle(fh)
        kind = handle.node.kind
        if kind == "device":
            tracker = handle.node.key[1]
            if tracker.detached:
                raise _err(errno.EIO, f"device {tracker.name} was detached")
            return await tracker.write(off, buf)
        if kind == "image":
            snap, name = handle.node.key[1], handle.node.key[2]
            return snap.trackers[name].image_write(handle.area, off, buf)
        if kind == "control":
            return await self._command(handle, buf)
        raise _err(errno.EBADF, "read-only file")

    async def _command(self, handle: Handle, buf: bytes) -> int:
        """One command per write; the JSON reply waits on the handle, the write fails
        with the command's errno."""
        code, handle.reply = await self.ctl.handle(buf)
        if code:
            raise pyfuse3.FUSEError(code)
        return len(buf)

    async def snapshot_destroyed(self, snap) -> None:
        """Destroy hook: drop the kernel's cached pages of the snapshot's images, so an
        open image handle cannot read them after destroy (in a thread: the kernel may
        wait for a read of that image that this loop must answer)."""
        inodes = [inode for key, inode in self._by_key.items() if key[0] == "image" and key[1] is snap]
        for inode in inodes:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
            except OSError as exc:     # ENOENT: the kernel never looked it up
                log.debug("invalidating image inode %d: %s", inode, exc)

    @_fuse_errors
    async def poll(self, inode, fh, poll_handle, ctx):
        handle = self._handle(fh)
        if handle.node.kind != "events":
            return select.POLLIN | select.POLLOUT
        events = handle.node.key[1].events
        if len(events.text) > handle.position or events.closed:
            return select.POLLIN
        handle.poll_handle = poll_handle
        return 0


def _json(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()
