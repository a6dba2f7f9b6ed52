"""Finding filesystems stacked on device files through loop devices, and freezing them.

A loop device bound to ``MOUNT/devices/NAME`` reports the backing file's (st_dev,
st_ino) through LOOP_GET_STATUS64; its mounts (and its partitions' mounts) are in
/proc/self/mountinfo by major:minor. FIFREEZE makes the kernel flush the filesystem
through the loop device into the FUSE mount, so every call here is blocking and must
run in a worker thread while the FUSE loop keeps serving.
"""

import fcntl
import logging
import os

from . import blockdev, mountinfo

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def mounts_of(numbers: set[int]) -> list[str]:
    """One mount point per filesystem (by device number) among ``numbers``."""
    seen, points = set(), []
    for m in mountinfo.mounts():
        if m.dev in numbers and m.dev not in seen:
            seen.add(m.dev)
            points.append(m.mountpoint)
    return points


def stacked_mounts(files: set[tuple[int, int]]) -> tuple[list[str], list[str]]:
    """Mount points of filesystems stacked on the given device files; and the loop
    devices over them that are in use but show no mount here (mounted in another
    mount namespace, or held by another program): they cannot be frozen."""
    points, hidden = [], []
    for loop in blockdev.loops_backed_by(files):
        found = mounts_of(blockdev.disk_numbers(loop))
        if found:
            points += found
        elif blockdev.in_use(loop):
            hidden.append(loop)
    return points, hidden


def freeze(mountpoints: list[str]) -> list[tuple[str, int]]:
    """FIFREEZE each mount point; return (mountpoint, fd) of those frozen by us.

    A filesystem whose FIFREEZE fails, whatever the errno (already frozen: EBUSY;
    cannot freeze: EOPNOTSUPP), is logged and skipped: the take goes on with it not
    frozen. When a mount point cannot be opened (OSError), or on cancellation,
    everything frozen so far is thawed and the exception propagates.
    """
    frozen: list[tuple[str, int]] = []
    try:
        for mp in mountpoints:
            fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as exc:
                os.close(fd)
                log.warning("not freezing %s: %s", mp, exc)
                continue
            frozen.append((mp, fd))
            log.info("froze %s", mp)
    except BaseException:
        thaw(frozen)
        raise
    return frozen


def thaw(frozen: list[tuple[str, int]]) -> None:
    """FITHAW and close everything ``freeze`` returned; never raises."""
    for mp, fd in frozen:
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            log.info("thawed %s", mp)
        except OSError as exc:
            log.error("thawing %s failed: %s", mp, exc)
        finally:
            os.close(fd)
