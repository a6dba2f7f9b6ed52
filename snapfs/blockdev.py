"""Block devices as sysfs and the loop ioctl describe them, read in one place: a
device number's sysfs directory, a partition's whole disk and start, a loop device's
backing file, the loop devices over given files, a disk's partitions.

Only sysfs and ``/dev/loopN`` are read, never the paths a device was set up with
(they may lie in another mount namespace or inside the FUSE mount that asks). Every
call blocks: in the daemon, run it in a worker thread.
"""

import errno
import fcntl
import os
import struct

from .errors import SnapfsError
from .params import SECTOR

LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232


def read(path: str, strict: bool = False) -> str:
    """A sysfs attribute without its newline; "" if unreadable, or with ``strict`` a
    SnapfsError with the OS errno."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        if strict:
            raise SnapfsError.from_oserror(exc, f"reading {path}") from None
        return ""


def sysfs_dir(dev: int) -> str | None:
    """``/sys/devices/...`` of block device number ``dev``, or None (no block device:
    tmpfs, FUSE, btrfs subvolumes, ...)."""
    path = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    return os.path.realpath(path) if os.path.exists(path) else None


def dev_of(sysdir: str) -> int | None:
    """The device number a sysfs block directory names, or None."""
    major, _, minor = read(os.path.join(sysdir, "dev")).partition(":")
    return os.makedev(int(major), int(minor)) if minor else None


def whole_disk(sysdir: str) -> tuple[str, int] | None:
    """For a partition's sysfs directory: its disk's directory and the partition's
    start in bytes; None for a whole disk."""
    if not os.path.exists(os.path.join(sysdir, "partition")):
        return None
    return os.path.dirname(sysdir), int(read(os.path.join(sysdir, "start"), strict=True)) * SECTOR


def loop_status(name: str) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, rdev) of the file behind loop device ``name`` (rdev is 0 for a
    regular file), None if unbound or unreadable. Never a path lookup."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
        finally:
            os.close(fd)
    except OSError:
        return None
    dev, ino, rdev = struct.unpack_from("QQQ", buf)
    return (dev, ino, rdev) if ino else None


def loop_backing(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file behind loop device ``name``, or None."""
    status = loop_status(name)
    return status[:2] if status else None


def loops_backed_by(files: set[tuple[int, int]]) -> list[str]:
    """Names of loop devices (``loop3``) whose backing file is one of ``files``,
    given as (st_dev, st_ino) pairs."""
    return [name for name in sorted(os.listdir("/sys/block"))
            if name.startswith("loop") and os.path.exists(f"/sys/block/{name}/loop")
            and loop_backing(name) in files]


def disk_numbers(disk: str) -> set[int]:
    """Device numbers of disk ``disk`` (``loop3``) and of its partitions."""
    base = f"/sys/block/{disk}"
    entries = [base] + [f"{base}/{p}" for p in os.listdir(base) if p.startswith(disk + "p")]
    return {d for d in map(dev_of, entries) if d is not None}


def in_use(name: str) -> bool:
    """Block device ``name`` (or a partition of it) is claimed: a mount or an O_EXCL
    user."""
    try:
        os.close(os.open(f"/dev/{name}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno == errno.EBUSY
    return False
