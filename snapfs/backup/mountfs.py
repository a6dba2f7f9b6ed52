"""``backup mount``: a read-only pyfuse3 filesystem of a repository.

    MNT/POINT/NAME     device NAME as of point POINT: a file of the device's size

Reads decompress the chunks they touch on demand in worker threads (each chunk checked
as restore checks it) and keep the last ``cache_chunks`` of them (an LRU), so
``losetup -r`` + ``mount -o ro`` on a file gives file-level restore from any point
without restoring the image. Points made while mounted appear at the next listing;
a point pruned while mounted answers EIO on read (gc does not wait for the mount).

One small class per kind of entry (``RootDir``, ``PointDir``, ``DeviceFile``), as in
fs.py; ``BackupFS`` only dispatches to them. Errors become FUSEError in one place
(``_fuse_errors``, fusecommon.py): a damaged chunk is EIO and a log line naming point,
device and offset; anything unexpected is logged and EIO.
"""

import errno
import logging
import os
import signal
import stat
from collections import OrderedDict

import pyfuse3
import trio

from ..detach import detach
from ..errors import SnapfsError
from ..fusecommon import BaseOperations, fuse_errors
from .chunks import ChunkStore, digest_of
from .repo import DIGEST_SIZE, ZERO, Damaged, Repo

log = logging.getLogger(__name__)
ROOT = pyfuse3.ROOT_INODE


_fuse_errors = fuse_errors(log, loud=(Damaged,))   # the one place where errors become errnos


class OpenDevice:
    """An open POINT/NAME: its index (checked once at open)."""

    def __init__(self, point: str, name: str, size: int, digests: bytes):
        self.point, self.name, self.size, self.digests = point, name, size, digests


# ----- one small class per kind of entry (as in fs.py) ------------------------------------

class Entry:
    """One name in the mount. ``key`` identifies it (an inode number per key, never
    reused); the manifests it reads are the mount's current ones (``BackupFS.manifests``),
    so an entry whose point was pruned is no longer ``alive``."""

    key: tuple = ()

    def alive(self, fs: "BackupFS") -> bool:
        return True

    def fill(self, fs: "BackupFS", a: pyfuse3.EntryAttributes) -> None:
        """Mode, links, size and times."""
        raise NotImplementedError

    def children(self, fs: "BackupFS") -> "list[Entry]":
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def open(self, fs: "BackupFS", flags: int) -> OpenDevice:
        raise pyfuse3.FUSEError(errno.EISDIR)


def _times(a: pyfuse3.EntryAttributes, manifest: dict | None) -> None:
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = int((manifest["unix_time"] if manifest else 0) * 1e9)


class RootDir(Entry):
    """MNT: one directory per point."""

    def fill(self, fs, a):
        a.st_mode, a.st_nlink = stat.S_IFDIR | 0o500, 2
        _times(a, None)

    def children(self, fs):
        return [PointDir(p) for p in sorted(fs.manifests)]


class PointDir(Entry):
    """MNT/POINT: one file per device of the point."""

    def __init__(self, point: str):
        self.point, self.key = point, (point,)

    def alive(self, fs):
        return self.point in fs.manifests

    def fill(self, fs, a):
        a.st_mode, a.st_nlink = stat.S_IFDIR | 0o500, 2
        _times(a, fs.manifests[self.point])

    def children(self, fs):
        return [DeviceFile(self.point, n) for n in sorted(fs.manifests[self.point]["devices"])]


class DeviceFile(Entry):
    """MNT/POINT/NAME: device NAME as of POINT, read-only, of the device's size."""

    def __init__(self, point: str, name: str):
        self.point, self.name, self.key = point, name, (point, name)

    def alive(self, fs):
        return self.point in fs.manifests and self.name in fs.manifests[self.point]["devices"]

    def fill(self, fs, a):
        manifest = fs.manifests[self.point]
        a.st_mode, a.st_nlink = stat.S_IFREG | 0o400, 1
        a.st_size = manifest["devices"][self.name]["size"]
        a.st_blocks = -(-a.st_size // 512)
        _times(a, manifest)

    async def open(self, fs, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        manifest = fs.manifests[self.point]
        digests = await trio.to_thread.run_sync(fs.repo.read_index, manifest, self.name, digest_of)
        return OpenDevice(self.point, self.name, manifest["devices"][self.name]["size"], digests)


class BackupFS(BaseOperations):
    """Dispatches to the entries (above) and the open devices; an inode table of
    entries by key, numbers handed out once per key and never reused. The root's
    getattr, lookup and opendir re-read the list of points."""

    def __init__(self, repo: Repo, cache_chunks: int = 16):
        super().__init__()
        self.repo, self.store = repo, ChunkStore(repo)
        self.cache: OrderedDict[bytes, bytes] = OrderedDict()
        self.cache_chunks = cache_chunks
        self.entries: dict[int, Entry] = {ROOT: RootDir()}
        self.inodes: dict[tuple, int] = {(): ROOT}
        self.manifests: dict[str, dict] = {}
        self.handles: dict[int, OpenDevice] = {}
        self.next_fh = 1
        self.uid, self.gid = os.geteuid(), os.getegid()

    def inode(self, entry: Entry) -> int:
        if entry.key not in self.inodes:
            number = len(self.entries) + ROOT
            self.inodes[entry.key], self.entries[number] = number, entry
        return self.inodes[entry.key]

    async def refresh(self) -> None:
        points = await trio.to_thread.run_sync(self.repo.points)
        self.manifests = {m["point"]: m for m in points}

    async def entry(self, inode: int) -> Entry:
        """The live entry of ``inode`` (ENOENT if gone); the root re-reads the points."""
        if inode == ROOT:
            await self.refresh()
        entry = self.entries.get(inode)
        if entry is None or not entry.alive(self):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def attrs(self, entry: Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.inode(entry)
        a.st_uid, a.st_gid = self.uid, self.gid
        a.entry_timeout = a.attr_timeout = 1.0
        a.st_blksize = 1 << 20
        entry.fill(self, a)
        return a

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        return self.attrs(await self.entry(inode))

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        wanted = os.fsdecode(name)
        for child in (await self.entry(parent_inode)).children(self):
            if child.key[-1] == wanted:
                return self.attrs(child)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_fuse_errors
    async def opendir(self, inode, ctx):
        (await self.entry(inode)).children(self)          # ENOTDIR for a file
        return inode

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        entry = self.entries[fh]
        if not entry.alive(self):
            raise pyfuse3.FUSEError(errno.ENOENT)
        entries = entry.children(self)
        for i, child in enumerate(entries[start_id:], start=start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(child.key[-1]), self.attrs(child), i + 1):
                break

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        device = await (await self.entry(inode)).open(self, flags)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = device
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_fuse_errors
    async def read(self, fh, offset, size):
        dev = self.handles[fh]
        end = min(offset + size, dev.size)
        parts, chunk_size = [], self.repo.chunk_size
        while offset < end:
            index, within = divmod(offset, chunk_size)
            length = min(chunk_size, dev.size - index * chunk_size)
            data = await self.chunk(dev, index, length)
            take = min(end - offset, length - within)
            parts.append(data[within:within + take])
            offset += take
        return b"".join(parts)

    async def chunk(self, dev: OpenDevice, index: int, length: int) -> bytes:
        """The plaintext of chunk ``index`` (checked), from the LRU cache if there."""
        digest = dev.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]
        if digest == ZERO:
            return bytes(length)
        if digest in self.cache:
            self.cache.move_to_end(digest)
            return self.cache[digest]
        try:
            data = await trio.to_thread.run_sync(self.store.get, digest, length)
        except Damaged as exc:
            raise Damaged(f"point {dev.point}, device {dev.name}, offset {index * self.repo.chunk_size}: "
                          f"{exc.message}") from None
        self.cache[digest] = data
        while len(self.cache) > self.cache_chunks:
            self.cache.popitem(last=False)
        return data

    async def release(self, fh):
        self.handles.pop(fh, None)


def run(repo: Repo, mountpoint: str, cache_chunks: int = 16, allow_other: bool = False,
        ready=None) -> int:
    """Mount read-only and serve until unmounted (fusermount3 -u) or SIGINT/SIGTERM;
    ``ready()`` is called once requests are served."""
    if not os.path.isdir(mountpoint) or os.listdir(mountpoint):
        raise SnapfsError(errno.EINVAL, f"{mountpoint} must be an empty directory")
    ops = BackupFS(repo, cache_chunks)
    options = set(pyfuse3.default_options) | {"fsname=snapfs-backup", "subtype=snapfs-backup", "ro"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        raise SnapfsError(errno.EIO, f"mounting {mountpoint} failed: {exc}") from None
    try:
        trio.run(_serve, ready)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=True)
    return 0


async def _serve(ready) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals)
        if ready is not None:
            nursery.start_soon(trio.to_thread.run_sync, ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def run_daemon(serve, log_file: str) -> int:
    """``backup mount --daemon``: fork; the child logs to ``log_file``, runs
    ``serve(ready)`` and reports readiness (or its error) through a pipe; the parent
    returns only then (0 ready, 1 failed)."""
    def setup_logging() -> None:
        logging.basicConfig(filename=log_file, level=logging.INFO, force=True,
                            format="%(asctime)s snapfs backup mount: %(message)s")

    return detach(serve, setup_logging, "snapfs backup mount")
