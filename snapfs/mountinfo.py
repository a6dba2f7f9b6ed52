"""The mount table of this process (``/proc/self/mountinfo``), parsed in one place.

The kernel escapes space, tab, newline and backslash in paths as octal (``\\040``,
``\\011``, ``\\012``, ``\\134``); every path here is unescaped once, from bytes, so
``/mnt/snap shots`` and non-ASCII names compare equal to what ``os`` functions return.
Reading the table never touches a mounted filesystem, so it is safe on the thread that
serves a FUSE mount.
"""

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: the filesystem's device number, where it is mounted,
    its type (``ext4``, ``fuse.snapfs``) and source (``/dev/loop0``), and its
    propagation tags (``shared:N``, ``master:N``: an unmount of a mount in peer group
    N reaches every mount tagged with N)."""

    dev: int
    root: str
    mountpoint: str
    fstype: str
    source: str
    tags: tuple[str, ...] = ()


def unescape(field: bytes) -> str:
    """Undo the kernel's octal escapes; decode as the filesystem encoding."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_line(line: bytes) -> Mount:
    left, _, right = line.rstrip(b"\n").partition(b" - ")
    fields, tail = left.split(b" "), right.split(b" ")
    major, minor = fields[2].split(b":")
    return Mount(os.makedev(int(major), int(minor)), unescape(fields[3]), unescape(fields[4]),
                 unescape(tail[0]), unescape(tail[1]) if len(tail) > 1 else "",
                 tuple(f.decode() for f in fields[6:]))


def mounts(path: str = MOUNTINFO) -> list[Mount]:
    """Every mount visible to this process, in mountinfo order."""
    with open(path, "rb") as f:
        return parse(f.read())


def parse(data: bytes) -> list[Mount]:
    """The mounts of a whole mountinfo text (any process's)."""
    return [parse_line(line) for line in data.splitlines() if line.strip()]


def at(mountpoint: str) -> Mount | None:
    """The topmost mount at ``mountpoint`` (an absolute, unescaped path), or None."""
    found = None
    for m in mounts():
        if m.mountpoint == mountpoint:
            found = m
    return found
