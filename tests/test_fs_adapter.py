"""The FUSE adapter in-process, without a mount or root: ``fs.Operations`` over a real
registry of small device files, its handlers called directly (as borg tests its FUSE
layer over a fake VFS). Covers the inode table (stable numbers, never reused,
``forget``), per-kind modes, the open checks, the errno mapping and the destroy hook."""

import errno
import logging
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
from helpers import MiB, make_device

from snapfs import control
from snapfs.errors import SnapfsError
from snapfs.fs import ROOT, Operations
from snapfs.params import KiB, Params
from snapfs.registry import Registry
from snapfs.source import Source

PARAMS = Params(chunk_minimum=64 * KiB, diff_storage_minimum=8 * MiB)
OWNER = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)


class Env:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.invalidated: list[int] = []
        self.entries_dropped: list[tuple[int, bytes]] = []
        dropped = self.entries_dropped
        self.ops = Operations(0, 0, invalidate=self.invalidated.append,
                              invalidate_entry=lambda parent, name, **_: dropped.append((parent, name)))
        self.reg = Registry(PARAMS, listener=self.ops)
        self.ops.show(self.reg)
        self.data = make_device(tmp_path / "d0.img", MiB, seed=3)
        os.chmod(tmp_path / "d0.img", 0o640)
        self.reg.add_device("d0", Source.open(str(tmp_path / "d0.img")))
        (tmp_path / "store").mkdir()

    async def lookup(self, *path: str) -> int:
        inode = ROOT
        for name in path:
            inode = (await self.ops.lookup(inode, name.encode(), OWNER)).st_ino
        return inode

    async def mode(self, *path: str) -> int:
        return (await self.ops.getattr(await self.lookup(*path), OWNER)).st_mode

    async def execute(self, line: str) -> dict:
        return await control.execute(self.reg, line)


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


async def fuse_errno(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def test_modes_follow_the_kind_of_file(env):
    assert await env.mode("devices", "d0") == stat.S_IFREG | 0o640
    assert await env.mode("cbt", "d0", "map") == stat.S_IFREG | 0o440
    assert await env.mode("cbt", "d0", "info") == stat.S_IFREG | 0o440
    assert await env.mode("status") == stat.S_IFREG | 0o400
    assert await env.mode("control") == stat.S_IFREG | 0o600
    assert stat.S_ISDIR(await env.mode("cbt", "d0"))
    snap = (await env.execute(f"snapshot_create {env.tmp}/store 16M d0"))["id"]
    await env.execute(f"snapshot_take {snap} nofreeze")
    assert await env.mode("snapshots", snap, "d0") == stat.S_IFREG | 0o640
    assert await env.mode("snapshots", snap, "info") == stat.S_IFREG | 0o400
    assert await env.mode("snapshots", snap, "events") == stat.S_IFREG | 0o444
    await env.execute(f"snapshot_destroy {snap}")


async def test_inodes_are_stable_never_reused_and_forgotten(env):
    first = await env.lookup("devices", "d0")
    assert await env.lookup("devices", "d0") == first
    await env.execute("detach d0")
    assert await fuse_errno(env.ops.getattr(first, OWNER)) == errno.ENOENT
    assert await fuse_errno(env.ops.lookup(await env.lookup("devices"), b"d0", OWNER)) == errno.ENOENT
    await env.ops.forget([(first, 2)])                 # both lookups
    assert first not in env.ops._nodes
    await env.execute(f"attach d0 {env.tmp}/d0.img")
    again = await env.lookup("devices", "d0")
    assert again != first                              # a new object gets a new inode
    await env.ops.forget([(again, 1)])
    assert again in env.ops._nodes                     # alive: kept for the next lookup


async def test_open_checks_uid_and_read_only_files(env):
    other = SimpleNamespace(uid=1000, gid=1000, pid=2, umask=0o022)
    control_inode = await env.lookup("control")
    assert await fuse_errno(env.ops.open(control_inode, os.O_RDWR, other)) == errno.EACCES
    assert await fuse_errno(env.ops.open(await env.lookup("status"), os.O_WRONLY, OWNER)) == errno.EACCES
    assert await fuse_errno(env.ops.opendir(await env.lookup("status"), OWNER)) == errno.ENOTDIR
    fh = (await env.ops.open(control_inode, os.O_RDWR, OWNER)).fh
    assert await fuse_errno(env.ops.write(fh, 0, b"detach nosuch\n")) == errno.ENOENT
    assert b'"errno": "ENOENT"' in await env.ops.read(fh, 0, 4096)
    assert await env.ops.write(fh, 0, b"version\n") == 8
    assert b'"ok": true' in await env.ops.read(fh, 0, 4096)
    assert await env.ops.read(fh, 0, 4096) == b""      # the reply is read once
    await env.ops.release(fh)
    assert await fuse_errno(env.ops.read(fh, 0, 1)) == errno.EBADF


@pytest.mark.parametrize(("raised", "code"), [
    (SnapfsError(errno.ENOSPC, "full"), errno.ENOSPC),
    (OSError(errno.ENXIO, "gone"), errno.ENXIO),
    (ValueError("a bug"), errno.EIO),
])
async def test_errors_become_errnos_in_one_place(env, caplog, raised, code):
    fh = (await env.ops.open(await env.lookup("devices", "d0"), os.O_RDONLY, OWNER)).fh
    assert await env.ops.read(fh, 0, 16) == env.data[:16]

    def fail(offset, size):
        raise raised

    env.reg.devices["d0"].read = fail
    caplog.set_level(logging.DEBUG, logger="snapfs.fs")
    assert await fuse_errno(env.ops.read(fh, 0, 16)) == code
    assert ("internal error in read" in caplog.text) == (code == errno.EIO)
    assert caplog.text.count("Traceback") == (1 if code == errno.EIO else 0)
    await env.ops.release(fh)
    assert env.reg.devices["d0"].open_handles == 0


async def test_destroy_invalidates_the_images_the_kernel_looked_up(env):
    snap = (await env.execute(f"snapshot_create {env.tmp}/store 16M d0"))["id"]
    await env.execute(f"snapshot_take {snap} nofreeze")
    image = await env.lookup("snapshots", snap, "d0")
    fh = (await env.ops.open(image, os.O_RDONLY, OWNER)).fh
    assert await env.ops.read(fh, 4096, 100) == env.data[4096:4196]
    await env.execute(f"snapshot_destroy {snap}")
    assert env.invalidated == [image]
    assert await fuse_errno(env.ops.read(fh, 4096, 100)) == errno.EIO
    assert await fuse_errno(env.ops.getattr(image, OWNER)) == errno.ENOENT


async def test_destroy_lets_go_of_the_snapshot(env):
    """The inode table keeps nodes the kernel still knows, but no destroyed snapshot
    (its maps would stay in memory for as long as the kernel keeps the dentries: the
    RSS of a daemon taking a snapshot a minute grew by the maps of each); the kernel is
    asked to drop snapshots/ID, and its FORGET then frees the nodes."""
    import gc
    import weakref

    snap = (await env.execute(f"snapshot_create {env.tmp}/store 16M d0"))["id"]
    await env.execute(f"snapshot_take {snap} nofreeze")
    snapdir = await env.lookup("snapshots", snap)
    image = await env.lookup("snapshots", snap, "d0")
    info = await env.lookup("snapshots", snap, "info")
    events = await env.lookup("snapshots", snap, "events")
    ref = weakref.ref(env.reg.snapshots[snap])
    await env.execute(f"snapshot_destroy {snap}")
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    assert env.entries_dropped == [(await env.lookup("snapshots"), snap.encode())]
    for inode in (snapdir, image, info, events):
        assert await fuse_errno(env.ops.getattr(inode, OWNER)) == errno.ENOENT
    assert await fuse_errno(env.lookup("snapshots", snap)) == errno.ENOENT
    before = len(env.ops._nodes)
    await env.ops.forget([(image, 9), (info, 9), (events, 9), (snapdir, 9)])   # every lookup
    assert len(env.ops._nodes) == before - 4
    assert not [k for k in env.ops._by_key if k[0] == "gone"]


async def test_image_group_reads_images_and_cbt_but_never_writes(tmp_path):
    """--image-group gives images and CBT files to a backup group to *read*: a source
    writable by its own group (0660 root:disk, usual for block devices) must not make
    the images writable by the backup group; device files keep the source's group."""
    ops = Operations(0, 0, invalidate=lambda inode: None, image_group=64123)
    reg = Registry(PARAMS, listener=ops)
    ops.show(reg)
    make_device(tmp_path / "d0.img", MiB, seed=3)
    os.chmod(tmp_path / "d0.img", 0o660)
    reg.add_device("d0", Source.open(str(tmp_path / "d0.img")))
    (tmp_path / "store").mkdir()

    async def attrs(*path):
        inode = ROOT
        for name in path:
            inode = (await ops.lookup(inode, name.encode(), OWNER)).st_ino
        a = await ops.getattr(inode, OWNER)
        return a.st_gid, stat.S_IMODE(a.st_mode)

    snap = (await control.execute(reg, f"snapshot_create {tmp_path}/store 16M d0"))["id"]
    await control.execute(reg, f"snapshot_take {snap} nofreeze")
    assert await attrs("snapshots", snap, "d0") == (64123, 0o640)
    assert await attrs("cbt", "d0", "map") == (64123, 0o440)
    assert await attrs("devices", "d0") == (os.stat(tmp_path / "d0.img").st_gid, 0o660)
    await control.execute(reg, f"snapshot_destroy {snap}")
    reg.close_sources()


async def test_detach_lets_go_of_the_device(env):
    """As for a destroyed snapshot: a detached device's nodes keep no reference to its
    tracker (CBT maps, source), and the kernel is asked to drop devices/NAME and
    cbt/NAME."""
    import gc
    import weakref

    dev = await env.lookup("devices", "d0")
    cbtmap = await env.lookup("cbt", "d0", "map")
    ref = weakref.ref(env.reg.devices["d0"])
    await env.execute("detach d0")
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    assert sorted(env.entries_dropped) == sorted([(await env.lookup("devices"), b"d0"),
                                                  (await env.lookup("cbt"), b"d0")])
    for inode in (dev, cbtmap):
        assert await fuse_errno(env.ops.getattr(inode, OWNER)) == errno.ENOENT
