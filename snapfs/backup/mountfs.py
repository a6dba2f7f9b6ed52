"""``backup mount``: a read-only pyfuse3 filesystem of a repository.

    MNT/POINT/NAME     device NAME as of point POINT: a file of the device's size

Reads decompress the chunks they touch on demand in worker threads (each chunk checked
as restore checks it) and keep the last ``cache_chunks`` of them (an LRU), so
``losetup -r`` + ``mount -o ro`` on a file gives file-level restore from any point
without restoring the image. Points made while mounted appear at the next listing;
a point pruned while mounted answers EIO on read (gc does not wait for the mount).

Errors become FUSEError in one place (``_fuse_errors``): a damaged chunk is EIO and a
log line naming point, device and offset; anything unexpected is logged and EIO.
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


class BackupFS(BaseOperations):
    """Inodes: ROOT, one per point directory, one per (point, device) file; numbers are
    handed out once per key and never reused."""

    def __init__(self, repo: Repo, cache_chunks: int = 16):
        super().__init__()
        self.repo, self.store = repo, ChunkStore(repo)
        self.cache: OrderedDict[bytes, bytes] = OrderedDict()
        self.cache_chunks = cache_chunks
        self.keys: dict[int, tuple] = {ROOT: ()}
        self.inodes: dict[tuple, int] = {(): ROOT}
        self.manifests: dict[str, dict] = {}
        self.handles: dict[int, OpenDevice] = {}
        self.next_fh = 1
        self.uid, self.gid = os.geteuid(), os.getegid()

    def inode(self, key: tuple) -> int:
        if key not in self.inodes:
            number = len(self.keys) + ROOT
            self.inodes[key], self.keys[number] = number, key
        return self.inodes[key]

    async def refresh(self) -> None:
        points = await trio.to_thread.run_sync(self.repo.points)
        self.manifests = {m["point"]: m for m in points}

    def key_of(self, inode: int) -> tuple:
        key = self.keys.get(inode)
        if key is None or (key and key[0] not in self.manifests):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if len(key) == 2 and key[1] not in self.manifests[key[0]]["devices"]:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return key

    def attrs(self, key: tuple) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.inode(key)
        a.st_uid, a.st_gid = self.uid, self.gid
        a.entry_timeout = a.attr_timeout = 1.0
        a.st_blksize = 1 << 20
        if len(key) == 2:
            manifest = self.manifests[key[0]]
            a.st_mode, a.st_nlink = stat.S_IFREG | 0o400, 1
            a.st_size = manifest["devices"][key[1]]["size"]
            a.st_blocks = -(-a.st_size // 512)
        else:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o500, 2
            manifest = self.manifests.get(key[0]) if key else None
        when = int((manifest["unix_time"] if manifest else 0) * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = when
        return a

    def children(self, key: tuple) -> list[tuple]:
        if not key:
            return [(p,) for p in sorted(self.manifests)]
        if len(key) == 1:
            return [(key[0], n) for n in sorted(self.manifests[key[0]]["devices"])]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        if inode == ROOT:
            await self.refresh()
        return self.attrs(self.key_of(inode))

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        key = self.key_of(parent_inode)
        if not key:
            await self.refresh()
        wanted = (*key, os.fsdecode(name))
        if wanted not in self.children(key):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(wanted)

    @_fuse_errors
    async def opendir(self, inode, ctx):
        if inode == ROOT:
            await self.refresh()
        if len(self.key_of(inode)) == 2:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        entries = self.children(self.key_of(fh))
        for i, key in enumerate(entries[start_id:], start=start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(key[-1]), self.attrs(key), i + 1):
                break

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        key = self.key_of(inode)
        if len(key) != 2:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        manifest = self.manifests[key[0]]
        digests = await trio.to_thread.run_sync(self.repo.read_index, manifest, key[1], digest_of)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = OpenDevice(key[0], key[1], manifest["devices"][key[1]]["size"], digests)
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
