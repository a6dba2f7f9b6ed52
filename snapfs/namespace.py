"""Paths in the caller's view: a control command that names a path (``attach PATH``,
``snapshot_create STORAGE``) is resolved in the mount namespace and root of the
process that opened the control handle, not in the daemon's.

``View.of_pid(pid)`` is taken when the control file is opened (pyfuse3 gives the
request's pid to ``open``, not to ``write``; as with the uid check, the opener's view
is the handle's). The pid is the opening thread's id in the daemon's pid namespace, or
0 when that thread is in a pid namespace the daemon's cannot see.

- Same mount namespace and root as the daemon: paths are used as they are.
- Another namespace or root: the opener's root is pinned at open by an O_PATH fd of
  ``/proc/PID/root`` (a pid reused later cannot change it), and each path is resolved
  beneath it with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``: symlinks,
  absolute or relative, and ``..`` stay inside the caller's root, and /proc magic
  links are refused. The daemon then opens the object itself as ``/proc/self/fd/N``
  (no second path walk), and the guards (guard.py) judge what was opened by its
  device and inode numbers, which mean the same in every namespace. A new storage
  file is created there (O_EXCL) and unlinked at once, as in the daemon's own view.
  The guards' filesystem types (a storage on a pseudo filesystem or on a snapfs
  mount is refused) come from mountinfo, so the opener's mount table is read too
  (``fstypes``), from ``/proc/PID/mountinfo`` opened at open (it keeps that
  namespace, whatever happens to the pid).
- The opener cannot be seen (pid 0, its /proc entry unreadable, or the daemon's
  /proc is not of its own pid namespace, so the pid would name another process
  there): every path is refused with EXDEV, saying why and what to do; commands
  without paths work.

Calls here block briefly on /proc; ``resolve`` may touch any filesystem: run it in a
worker thread.
"""

import ctypes
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from . import mountinfo
from .errors import SnapfsError
from .osutil import LIBC

SYS_OPENAT2 = 437                # the same number on every architecture since 5.6
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]




def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = _RESOLVE) -> int:
    """openat2(2): an fd, or OSError."""
    how = _OpenHow(flags, mode, resolve)
    fd = LIBC.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), os.fsencode(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


@dataclass
class Resolved:
    """A path ready for the daemon to open: ``path`` (the caller's own, or
    ``/proc/self/fd/N``), ``shown`` (what messages and status say; "" for the
    caller's own path), and the fds to close once it has been opened."""

    path: str
    shown: str = ""
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def proc_is_own() -> bool:
    """Whether /proc shows this process's pid namespace, the one FUSE reports pids in
    (``unshare --pid --fork`` without ``--mount-proc`` keeps the parent's /proc, where
    the same number is another process). /proc/self's NSpid then lists one pid."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return len(line.split()) == 2
    except OSError:
        return False
    return True     # no NSpid line (kernels before 4.1): nothing to compare


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class View:
    """Where the process that opened a control handle sees paths (module docstring).
    ``root_fd`` is None in the daemon's own view; ``refusal`` says why paths cannot
    be resolved at all."""

    def __init__(self, pid: int, root_fd: int | None = None, refusal: str = "",
                 mounts_fd: int | None = None):
        self.pid, self.root_fd, self.refusal, self.mounts_fd = pid, root_fd, refusal, mounts_fd

    @classmethod
    def of_pid(cls, pid: int) -> "View":
        """The view of thread ``pid`` (a FUSE request's pid: a thread id, or 0)."""
        if pid <= 0:
            return cls(0, refusal="the process that opened the control file is in a pid "
                       "namespace the daemon cannot see (is snapfs running in a container?)")
        if not proc_is_own():
            return cls(pid, refusal="the daemon's /proc belongs to another pid namespace than its "
                       f"own, so pid {pid} cannot be looked up there (give the daemon a /proc of "
                       "its own pid namespace: unshare --mount-proc, a container's own /proc)")
        try:
            fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return cls(pid, refusal=f"its root (/proc/{pid}/root) cannot be opened ({exc.strerror})")
        try:
            same = (_ident(os.stat(f"/proc/{pid}/ns/mnt")) == _ident(os.stat("/proc/self/ns/mnt"))
                    and _ident(os.fstat(fd)) == _ident(os.stat("/")))
        except OSError as exc:
            os.close(fd)
            return cls(pid, refusal=f"its mount namespace cannot be read ({exc.strerror})")
        if same:
            os.close(fd)
            return cls(pid)
        try:
            mounts_fd = os.open(f"/proc/{pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(fd)
            return cls(pid, refusal=f"its mount table cannot be read ({exc.strerror})")
        return cls(pid, fd, mounts_fd=mounts_fd)

    @property
    def foreign(self) -> bool:
        return self.root_fd is not None or bool(self.refusal)

    def close(self) -> None:
        for fd in (self.root_fd, self.mounts_fd):
            if fd is not None:
                os.close(fd)
        self.root_fd = self.mounts_fd = None

    def fstypes(self) -> dict[int, str]:
        """Filesystem type by device number of the mounts in this view's namespace
        ({} in the daemon's own view: the guards read that themselves). Blocking."""
        if self.mounts_fd is None:
            return {}
        data = b""
        try:
            os.lseek(self.mounts_fd, 0, os.SEEK_SET)
            while chunk := os.read(self.mounts_fd, 1 << 16):
                data += chunk
        except OSError as exc:
            raise SnapfsError(errno.EXDEV, f"the mount table of pid {self.pid} cannot be read "
                              f"({exc.strerror}): paths it names cannot be checked") from None
        return {m.dev: m.fstype for m in mountinfo.parse(data)}

    def resolve(self, path: str, create_in: Callable[[os.stat_result], str | None] | None = None
                ) -> Resolved:
        """``path`` (absolute) in this view. ``create_in``: when nothing is there,
        create a new file (0600) and unlink it at once, after asking ``create_in``
        (given the stat of the directory) for a reason to refuse it. SnapfsError:
        EXDEV no view; ENOENT/EACCES/ELOOP from the walk; EINVAL refused."""
        if self.refusal:
            raise SnapfsError(errno.EXDEV, f"{path} cannot be resolved where you see it: "
                              f"{self.refusal}; snapfs resolves paths in the mount namespace of "
                              "the process that opens the control file, so send commands that "
                              "name paths from the daemon's namespace (nsenter -t DAEMON_PID -m -p, "
                              "docker exec)")
        if self.root_fd is None:
            return Resolved(path)
        shown = f"{path} (in the mount namespace of pid {self.pid})"
        try:
            fd = openat2(self.root_fd, path, os.O_PATH | os.O_CLOEXEC)
            return Resolved(f"/proc/self/fd/{fd}", shown, [fd])
        except FileNotFoundError:
            if create_in is None:
                raise SnapfsError(errno.ENOENT, f"{shown}: no such file or directory") from None
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, shown) from None
        return self._create(path, shown, create_in)

    def _create(self, path: str, shown: str, check: Callable[[os.stat_result], str | None]) -> Resolved:
        parent, _, name = path.rstrip("/").rpartition("/")
        if name in ("", ".", ".."):
            raise SnapfsError(errno.EINVAL, f"{shown}: not a file name")
        try:
            dirfd = openat2(self.root_fd, parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, shown) from None
        try:
            reason = check(os.fstat(dirfd))
            if reason:
                raise SnapfsError(errno.EINVAL, f"storage {shown}: {reason}")
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=dirfd)
            try:
                os.unlink(name, dir_fd=dirfd)   # a crash leaves nothing behind
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, shown) from None
        finally:
            os.close(dirfd)
        return Resolved(f"/proc/self/fd/{fd}", f"{shown} (unlinked)", [fd])


SAME = View(0)      # the daemon's own view: in-process callers and tests
