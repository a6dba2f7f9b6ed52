"""Where a file's bytes physically are: FIEMAP extents, and the file behind a loop device.

``file_extents(path)`` asks the filesystem holding ``path`` for the physical byte
ranges of its data (the FS_IOC_FIEMAP ioctl, with FIEMAP_FLAG_SYNC so that delayed
allocation is resolved first). ``backing_device_file(path)`` says on which file, and at
which byte offset, that filesystem lives when its block device is a loop device (or a
partition of one). Together they locate a file's bytes inside a disk image:
byte ``physical`` of an extent is at ``offset + physical`` in the backing file.

Rules of ``file_extents``:
    * Extents come in logical order; a hole has no extent, so the lengths add up to
      less than the file size for a sparse file (callers needing every byte check the
      sum). Physically contiguous neighbours are merged.
    * Extents are clipped to the file size: the lengths are the file's bytes, not the
      filesystem blocks holding them; space allocated past the end is left out.
    * Unwritten (preallocated) extents are included: the space belongs to the file,
      although a read through the filesystem returns zeros there.
    * An extent whose physical place is unknown (delayed allocation, even after the
      sync), encoded (compressed, encrypted), or not aligned to 512 bytes (inline or
      tail-packed data) has no usable physical address: SnapfsError(EINVAL).
    * OS errors (no FIEMAP support, e.g. tmpfs: EOPNOTSUPP) become SnapfsError with the
      OS errno.

Both functions block (ioctl, sysfs reads): call them from a worker thread when a FUSE
loop is running.
"""

import errno
import fcntl
import os
import stat
import struct

from . import blockdev
from .errors import SnapfsError
from .params import SECTOR

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_MAX_OFFSET = 2**64 - 1
FIEMAP_FLAG_SYNC = 0x0001

FIEMAP_EXTENT_LAST = 0x0001
FIEMAP_EXTENT_UNKNOWN = 0x0002
FIEMAP_EXTENT_DELALLOC = 0x0004          # always with UNKNOWN
FIEMAP_EXTENT_ENCODED = 0x0008
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x0080    # always with ENCODED
FIEMAP_EXTENT_NOT_ALIGNED = 0x0100
FIEMAP_EXTENT_DATA_INLINE = 0x0200       # always with NOT_ALIGNED
FIEMAP_EXTENT_DATA_TAIL = 0x0400         # always with NOT_ALIGNED
FIEMAP_EXTENT_UNWRITTEN = 0x0800

_UNUSABLE = {
    FIEMAP_EXTENT_UNKNOWN: "of unknown location",
    FIEMAP_EXTENT_ENCODED: "encoded (compressed or encrypted)",
    FIEMAP_EXTENT_NOT_ALIGNED: "not aligned to 512 bytes",
}

# struct fiemap: fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count,
# fm_reserved (32 bytes), then fm_extent_count struct fiemap_extent: fe_logical,
# fe_physical, fe_length, fe_reserved64[2], fe_flags, fe_reserved[3] (56 bytes each).
_FIEMAP = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQ16xI12x")
assert _FIEMAP.size == 32 and _EXTENT.size == 56

EXTENTS_PER_CALL = 256   # one ioctl returns at most this many; more calls follow


def file_extents(path: str) -> list[tuple[int, int]]:
    """The physical byte extents ``(physical offset, length)`` of the regular file
    ``path``, in logical order (see the module docstring for holes and clipping).

    Raises SnapfsError: EINVAL not a regular file or an extent without a usable
    physical address; the OS errno when the file cannot be opened or its filesystem
    does not support FIEMAP.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"opening {path}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapfsError(errno.EINVAL, f"{path} is not a regular file")
        return _extents(fd, path, st.st_size)
    finally:
        os.close(fd)


def _extents(fd: int, path: str, size: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []        # [logical, physical, length], merged
    start = 0
    count = EXTENTS_PER_CALL
    while start < size:
        buf = bytearray(_FIEMAP.size + count * _EXTENT.size)
        _FIEMAP.pack_into(buf, 0, start, FIEMAP_MAX_OFFSET, FIEMAP_FLAG_SYNC, 0, count, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"FIEMAP of {path}") from None
        mapped = _FIEMAP.unpack_from(buf, 0)[3]
        if mapped == 0:
            break                    # nothing allocated from ``start`` on
        last = False
        end = start
        for i in range(min(mapped, count)):
            logical, physical, length, flags = _EXTENT.unpack_from(buf, _FIEMAP.size + i * _EXTENT.size)
            _check(path, logical, physical, length, flags)
            last = bool(flags & FIEMAP_EXTENT_LAST)
            end = max(end, logical + length)
            length = min(length, size - logical)
            if length <= 0:
                continue             # allocated past the end of the file
            if out and out[-1][0] + out[-1][2] == logical and out[-1][1] + out[-1][2] == physical:
                out[-1][2] += length
            else:
                out.append([logical, physical, length])
        if last:
            break
        if end <= start:
            raise SnapfsError(errno.EIO, f"FIEMAP of {path} made no progress at {start}")
        start = end
    return [(physical, length) for _, physical, length in out]


def _check(path: str, logical: int, physical: int, length: int, flags: int) -> None:
    for flag, why in _UNUSABLE.items():
        if flags & flag:
            raise SnapfsError(errno.EINVAL, f"{path}: the extent at byte {logical} is {why}")
    if (logical | physical | length) % SECTOR:
        raise SnapfsError(errno.EINVAL, f"{path}: the extent at byte {logical} is not aligned "
                                        f"to 512 bytes (physical {physical}, length {length})")


def backing_device_file(path: str) -> tuple[str, int]:
    """(backing file, byte offset of the filesystem in it) for a file whose filesystem
    lives on a loop device, directly or on one of its partitions. The offset adds the
    loop device's own offset (``losetup -o``) and the partition's start.

    Raises SnapfsError: the OS errno if ``path`` cannot be stat'ed; EINVAL when its
    filesystem is not on a loop device (a disk, device-mapper, btrfs, tmpfs, ...);
    ENOENT when the loop device's backing file was deleted.
    """
    try:
        dev = os.stat(path).st_dev
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"stat of {path}") from None
    sysdir = blockdev.sysfs_dir(dev)
    if sysdir is None:
        raise SnapfsError(errno.EINVAL, f"{path} is not on a block device "
                                        f"(device {os.major(dev)}:{os.minor(dev)})")
    sysdir, offset = blockdev.whole_disk(sysdir) or (sysdir, 0)   # .../loop0/loop0p1 -> .../loop0
    loopdir = os.path.join(sysdir, "loop")
    if not os.path.isdir(loopdir):
        raise SnapfsError(errno.EINVAL, f"{path} is on /dev/{os.path.basename(sysdir)}, "
                                        "not on a loop device")
    backing = blockdev.read(os.path.join(loopdir, "backing_file"), strict=True)
    offset += int(blockdev.read(os.path.join(loopdir, "offset"), strict=True))
    if backing.endswith(" (deleted)") and not os.path.exists(backing):
        raise SnapfsError(errno.ENOENT, f"the backing file of /dev/{os.path.basename(sysdir)} "
                                        f"was deleted: {backing}")
    return backing, offset

