"""Finding filesystems stacked on device files through loop devices, and freezing them.

A loop device bound to ``MOUNT/devices/NAME`` reports the backing file's (st_dev,
st_ino) through LOOP_GET_STATUS64; its mounts (and its partitions' mounts) are in
/proc/self/mountinfo by major:minor. FIFREEZE makes the kernel flush the filesystem
through the loop device into the FUSE mount, so every call here is blocking and must
run in a worker thread while the FUSE loop keeps serving.
"""

import errno
import fcntl
import logging
import os

from . import mountinfo
from .stack import loop_backing

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def loop_devices_backed_by(files: set[tuple[int, int]]) -> list[str]:
    """Names of loop devices (``loop3``) whose backing file is one of ``files``,
    given as (st_dev, st_ino) pairs."""
    return [name for name in sorted(os.listdir("/sys/block"))
            if name.startswith("loop") and os.path.exists(f"/sys/block/{name}/loop")
            and loop_backing(name) in files]


def _block_numbers(loop: str) -> set[int]:
    """Device numbers of the loop device and of its partitions."""
    base = f"/sys/block/{loop}"
    numbers = set()
    for entry in [base] + [f"{base}/{p}" for p in os.listdir(base) if p.startswith(loop + "p")]:
        try:
            with open(f"{entry}/dev") as f:
                major, minor = f.read().strip().split(":")
            numbers.add(os.makedev(int(major), int(minor)))
        except (OSError, ValueError):
            pass
    return numbers


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
    for loop in loop_devices_backed_by(files):
        found = mounts_of(_block_numbers(loop))
        if found:
            points += found
        elif _in_use(loop):
            hidden.append(loop)
    return points, hidden


def _in_use(loop: str) -> bool:
    """The loop device (or a partition of it) is claimed: a mount or an O_EXCL user."""
    try:
        os.close(os.open(f"/dev/{loop}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno == errno.EBUSY
    return False


def freeze(mountpoints: list[str]) -> list[tuple[str, int]]:
    """FIFREEZE each mount point; return (mountpoint, fd) of those frozen by us.

    A filesystem already frozen (EBUSY) or unable to freeze (EOPNOTSUPP...) is
    logged and skipped; on any other failure everything frozen so far is thawed and
    the error propagates.
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
