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
import struct

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232


def loop_devices_backed_by(files: set[tuple[int, int]]) -> list[str]:
    """Names of loop devices (``loop3``) whose backing file is one of ``files``,
    given as (st_dev, st_ino) pairs."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith("loop") or not os.path.exists(f"/sys/block/{name}/loop"):
            continue
        try:
            fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                buf = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
            finally:
                os.close(fd)
        except OSError:
            continue
        dev, ino = struct.unpack_from("QQ", buf)
        if (dev, ino) in files:
            found.append(name)
    return found


def _block_numbers(loop: str) -> set[str]:
    """``maj:min`` of the loop device and of its partitions."""
    base = f"/sys/block/{loop}"
    numbers = set()
    for entry in [base] + [f"{base}/{p}" for p in os.listdir(base) if p.startswith(loop + "p")]:
        try:
            with open(f"{entry}/dev") as f:
                numbers.add(f.read().strip())
        except OSError:
            pass
    return numbers


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts_of(numbers: set[str]) -> list[str]:
    """One mount point per filesystem (by ``maj:min``) among ``numbers``."""
    seen, points = set(), []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] in numbers and fields[2] not in seen:
                seen.add(fields[2])
                points.append(_unescape(fields[4]))
    return points


def stacked_mounts(files: set[tuple[int, int]]) -> list[str]:
    """Mount points of filesystems stacked on the given device files."""
    numbers: set[str] = set()
    for loop in loop_devices_backed_by(files):
        numbers |= _block_numbers(loop)
    return mounts_of(numbers) if numbers else []


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
