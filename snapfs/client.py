"""Talking to a running mount from another process: find it, send a command line to
its control file and read the JSON reply, read its status and CBT files.

The CLI, the tests and backup tools use this module; it never imports the daemon's
modules (trio, pyfuse3), so it is cheap to import.
"""

import contextlib
import errno
import fcntl
import json
import os
import shlex

from . import mountinfo
from .commands import FSTYPE, MAX_LINE
from .errors import SnapfsError


def snapfs_mounts() -> list[str]:
    """Mount points of snapfs mounts visible to this process."""
    return [m.mountpoint for m in mountinfo.mounts() if m.fstype == FSTYPE]


def find_mount(explicit: str | None) -> str:
    if explicit:
        return explicit
    mounts = snapfs_mounts()
    if len(mounts) == 1:
        return mounts[0]
    if not mounts:
        raise SnapfsError(errno.ENOENT, "no snapfs mount found (start one with 'snapfs mount')")
    raise SnapfsError(errno.EINVAL, f"several snapfs mounts ({', '.join(mounts)}): use -m MOUNT")


class Connection:
    """One open handle on MOUNT/control, reused for many commands. Each command is one
    write; its JSON reply is read on the same handle (docs/design.md section 3: reads ignore offsets)."""

    def __init__(self, mount: str):
        path = os.path.join(mount, "control")
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise mount_error(exc, mount, f"opening {path}") from None

    def send(self, line: str) -> dict:
        """The reply to ``line``, whether the command succeeded or not."""
        with contextlib.suppress(OSError):   # a failed command: the reply says why
            os.write(self.fd, line.encode() + b"\n")
        data = b""
        while chunk := os.read(self.fd, 1 << 20):
            data += chunk
        if not data:
            raise SnapfsError(errno.EIO, "no reply from the mount")
        return json.loads(data)

    def command(self, line: str) -> dict:
        """``send``, raising SnapfsError (the reply's errno and message) on failure."""
        reply = self.send(line)
        if not reply.get("ok"):
            raise SnapfsError(getattr(errno, reply.get("errno", ""), errno.EIO), reply.get("error", "failed"))
        return reply

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send(mount: str, line: str) -> dict:
    """Write one command to MOUNT/control, read the JSON reply on the same handle."""
    with Connection(mount) as conn:
        return conn.send(line)


def command(mount: str, line: str) -> dict:
    """``send`` and raise SnapfsError for a failed command."""
    with Connection(mount) as conn:
        return conn.command(line)


def quote(word: str) -> str:
    return shlex.quote(word)


def read_status(mount: str) -> dict:
    """MOUNT/status as JSON: a read, so it never waits behind a command that holds
    the control file (the kernel runs one write to it at a time)."""
    path = os.path.join(mount, "status")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as exc:
        raise mount_error(exc, mount, f"reading {path}") from None


def mount_error(exc: OSError, mount: str, what: str) -> SnapfsError:
    """An OSError from a mount's files; a dead mount (its daemon gone) says how to
    clear it."""
    if exc.errno == errno.ENOTCONN:
        return SnapfsError(errno.ENOTCONN, f"{mount} is a dead snapfs mount (its daemon is gone); "
                           f"clear it with 'fusermount3 -u -z {mount}' and mount again")
    return SnapfsError.from_oserror(exc, what)


def read_cbt(mount: str, name: str) -> tuple[dict, bytes]:
    """cbt/NAME/info and cbt/NAME/map read consistently (retried if a take happened
    between the two reads)."""
    base = os.path.join(mount, "cbt", name)
    for _ in range(10):
        try:
            with open(os.path.join(base, "info"), "rb") as f:
                info = json.loads(f.read())
            with open(os.path.join(base, "map"), "rb") as f:
                cbt_map = f.read()
            with open(os.path.join(base, "info"), "rb") as f:
                again = json.loads(f.read())
        except FileNotFoundError:
            raise SnapfsError(errno.ENOENT, f"no device named {name!r}") from None
        if info == again and len(cbt_map) == info["block_count"]:
            return info, cbt_map
    raise SnapfsError(errno.EAGAIN, "the CBT kept changing while it was read; try again")


def batched_lines(head: str, words: list[str]) -> list[str]:
    """``head word word ...`` lines of at most MAX_LINE bytes with every word once."""
    lines, line = [], head
    for word in words:
        if len(line) + 1 + len(word) >= MAX_LINE and line != head:
            lines.append(line)
            line = head
        line += " " + word
    return [*lines, line]


def mount_holders(dev: int, limit: int = 3, peers: tuple[str, ...] = ()) -> list[str]:
    """Who has a mount of device ``dev`` (a FUSE connection) in a mount namespace other
    than this process's that an unmount here does not reach: ``pid N (COMM) at PATH``,
    one per namespace, at most ``limit``. ``peers``: the propagation tags of the mount
    here (mountinfo.Mount.tags); one tagged ``shared:N`` or ``master:N`` with the N of
    our ``shared:N`` is unmounted with ours. Only processes visible and readable here
    (root: every one in this pid namespace); /proc is read, no mount is touched."""
    groups = {t.partition(":")[2] for t in peers if t.startswith("shared:")}

    def reached(m: mountinfo.Mount) -> bool:
        return any(t.partition(":")[2] in groups for t in m.tags if t.startswith(("shared:", "master:")))

    found: list[str] = []
    seen = {_ns_ident("self")}
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not name.isdigit():
            continue
        try:
            ident = _ns_ident(name)
            if ident in seen:
                continue
            seen.add(ident)
            with open(f"/proc/{name}/mountinfo", "rb") as f:
                where = [m.mountpoint for m in mountinfo.parse(f.read()) if m.dev == dev and not reached(m)]
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if where:
            found.append(f"pid {name} ({comm}) at {where[0]}")
            if len(found) == limit:
                break
    return found


def _ns_ident(pid: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/mnt")
    return st.st_dev, st.st_ino


def source_released(path: str, kind: str) -> bool:
    """True when no daemon holds ``path``: a file's flock can be had, a block device
    opens O_EXCL (snapfs holds both for as long as it serves the source)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_EXCL if kind == "bdev" else 0))
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise SnapfsError.from_oserror(exc, f"checking {path}") from None
    try:
        if kind != "bdev":
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
