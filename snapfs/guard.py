"""What a file or a block device rests on, and which of those a mount must refuse.

A filesystem lives on a block device (``st_dev``); a partition on its whole disk; a
loop device on a backing file, which lives on a filesystem again (or is a block
device node), to any depth; a device-mapper or md device on its ``slaves``.
``layers`` walks that chain down from a device number, using only sysfs and the
loop ioctl (never the paths in between, which may lie in another mount namespace or
inside the very FUSE mount that is asking).

``Guard.why_not`` is the one rule that keeps the data path from waiting on itself:
a difference storage or a source must not rest on this mount (a copy would be a
request to the thread that is making it: recursion, and with freeze a deadlock), nor
on a device source (it would write that source behind the tracker), and a storage
must not be on any snapfs mount (two daemons can then wait on each other). Calls
here block (sysfs reads, opening ``/dev/loopN``): run them in a worker thread.
"""

import os
import stat
from dataclasses import dataclass, field

from . import blockdev, mountinfo
from .commands import FSTYPE

MAX_DEPTH = 16
# kernel interfaces, not storage: a "file" there may be /proc/self/mem
PSEUDO_FSTYPES = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                  "configfs", "fusectl", "devpts", "mqueue", "bpf", "pstore", "efivarfs",
                  "binfmt_misc", "nsfs", "autofs", "rpc_pipefs", "hugetlbfs"}


@dataclass(frozen=True)
class Layer:
    """One device in a chain: its number, its name (``loop3``, ``sda1``, ``0:45`` for a
    device with no block device behind it) and, for a loop device, the (st_dev, st_ino)
    and path of its backing file, and the device number behind it when that file is a
    block device node."""

    dev: int
    name: str
    backing: tuple[int, int] | None = None
    backing_path: str = ""
    backing_rdev: int = 0


def _device_layers(dev: int) -> tuple[list[Layer], list[int]]:
    """``dev`` and, for a partition, its whole disk (with the loop backing); and the
    device numbers below: the loop's backing filesystem or block device, and the
    ``slaves`` of a device-mapper or md device (LVM, LUKS, RAID)."""
    sysdir = blockdev.sysfs_dir(dev)
    if sysdir is None:
        return [Layer(dev, f"{os.major(dev)}:{os.minor(dev)}")], []
    found = []
    if os.path.exists(os.path.join(sysdir, "partition")):
        found.append(Layer(dev, os.path.basename(sysdir)))
        sysdir = os.path.dirname(sysdir)
        dev = blockdev.dev_of(sysdir) or dev
    name = os.path.basename(sysdir)
    status = blockdev.loop_status(name) if os.path.isdir(os.path.join(sysdir, "loop")) else None
    path = blockdev.read(os.path.join(sysdir, "loop", "backing_file")) if status else ""
    found.append(Layer(dev, name, status[:2] if status else None, path, status[2] if status else 0))
    below = [status[2] or status[0]] if status else []
    slaves = os.path.join(sysdir, "slaves")
    if os.path.isdir(slaves):
        numbers = (blockdev.dev_of(os.path.join(slaves, s)) for s in sorted(os.listdir(slaves)))
        below += [d for d in numbers if d]
    return found, below


def layers(dev: int) -> list[Layer]:
    """Every device below device number ``dev`` (a walk through partitions, loop
    devices and their backing files or block devices, and device-mapper/md slaves),
    top first, at most MAX_DEPTH devices."""
    chain: list[Layer] = []
    todo, seen = [dev], set()
    while todo and len(seen) < MAX_DEPTH:
        dev = todo.pop(0)
        if dev in seen:
            continue
        seen.add(dev)
        found, below = _device_layers(dev)
        chain += found
        todo += below
    return chain


@dataclass
class Guard:
    """What the data path of one mount rests on: the mount's device number and the
    device sources (regular files by (st_dev, st_ino), block devices by rdev), each
    mapped to its device name. Built on the trio thread, used in a worker thread."""

    mount_dev: int | None
    files: dict[tuple[int, int], str] = field(default_factory=dict)
    bdevs: dict[int, str] = field(default_factory=dict)
    # filesystem types of mounts this process cannot see (a command sender's
    # namespace, namespace.View.fstypes), by device number
    elsewhere: dict[int, str] = field(default_factory=dict)

    def why_not(self, st: os.stat_result, storage: bool) -> str | None:
        """Why a storage (``storage``) or a source with stat ``st`` must be refused,
        or None. For a directory, ``st`` is the directory a new file goes into."""
        if storage:
            same = self._same_source(st)
            if same:
                return same
        is_bdev = stat.S_ISBLK(st.st_mode)
        fstypes = self.elsewhere | {m.dev: m.fstype for m in mountinfo.mounts()}
        for i, layer in enumerate(layers(st.st_rdev if is_bdev else st.st_dev)):
            reason = self._layer_reason(layer, fstypes, storage, own=i == 0 and is_bdev)
            if reason:
                return reason
        return None

    def add(self, name: str, st: os.stat_result) -> "Guard":
        """Guard the source of device ``name`` (its stat)."""
        if stat.S_ISBLK(st.st_mode):
            self.bdevs[st.st_rdev] = name
        else:
            self.files[st.st_dev, st.st_ino] = name
        return self

    def source_name(self, st: os.stat_result) -> str | None:
        """The device whose source ``st`` is, or None."""
        if stat.S_ISBLK(st.st_mode):
            return self.bdevs.get(st.st_rdev)
        return self.files.get((st.st_dev, st.st_ino)) if stat.S_ISREG(st.st_mode) else None

    def _same_source(self, st: os.stat_result) -> str | None:
        name = self.source_name(st)
        return f"is the source of device {name}" if name is not None else None

    def _layer_reason(self, layer: Layer, fstypes: dict[int, str], storage: bool,
                      own: bool) -> str | None:
        if self.mount_dev is not None and layer.dev == self.mount_dev:
            return "is inside this snapfs mount"
        if storage and fstypes.get(layer.dev) == FSTYPE:
            return "is on a snapfs mount (two daemons could wait on each other)"
        if storage and fstypes.get(layer.dev) in PSEUDO_FSTYPES:
            return f"is on a {fstypes[layer.dev]} filesystem, not storage"
        if layer.dev in self.bdevs and not own:
            return f"rests on {layer.name}, the source of device {self.bdevs[layer.dev]}"
        if layer.backing_rdev in self.bdevs:
            return (f"rests on {layer.name}, a loop device over the source of device "
                    f"{self.bdevs[layer.backing_rdev]}")
        if layer.backing in self.files:
            return (f"rests on {layer.name}, a loop device over the source of device "
                    f"{self.files[layer.backing]}")
        if layer.backing and self.mount_dev is not None and layer.backing[0] == self.mount_dev:
            where = layer.backing_path or "a file"
            return f"rests on {layer.name}, a loop device over {where} in this snapfs mount"
        return None
