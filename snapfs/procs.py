"""Other processes, as /proc and /sys show them: a process's name, whether a signal
is pending for it, who holds files under a path (open descriptors, loop devices).

Reading /proc and /sys never touches a FUSE mount (links are read, never followed),
so ``comm`` and ``signal_pending`` are safe on the thread that serves the mount; the
scans (``holders``) read every process's descriptors: run them in a worker thread.
A pid FUSE reports is one of the daemon's pid namespace; when /proc shows another
(namespace.proc_is_own), it would name another process, so nothing is looked up.
"""

import functools
import os

from .namespace import proc_is_own


@functools.cache
def _own() -> bool:
    return proc_is_own()


def comm(pid: int) -> str:
    """The command name of ``pid``, or ``?`` when it cannot be seen."""
    if pid <= 0 or not _own():
        return "?"
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def signal_pending(pid: int) -> bool:
    """Whether thread ``pid`` or its process has a signal pending that it does not
    block (SIGKILL cannot be blocked): a reader blocked in a FUSE request stays in the
    kernel with it pending until the request is answered."""
    if pid <= 0 or not _own():
        return False
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("SigPnd", "ShdPnd", "SigBlk"):
                    fields[key] = int(value, 16)
    except (OSError, ValueError):
        return False
    pending = fields.get("SigPnd", 0) | fields.get("ShdPnd", 0)
    return bool(pending & ~fields.get("SigBlk", 0))


def holder_signalled(suffix: str) -> bool:
    """Whether a process with a descriptor whose path ends with ``suffix`` (seen from
    any mount namespace: a snapshot's events file) has a signal pending. Blocking: a
    worker thread."""
    return _own() and any(target.endswith(suffix) and signal_pending(pid)
                          for pid, target in _descriptors())


def holders(prefixes: tuple[str, ...]) -> list[str]:
    """Who holds a file whose path starts with one of ``prefixes`` (as this process
    sees paths): ``pid N (COMM) has PATH`` for each open descriptor, ``loopN has
    PATH`` for each loop device backed by one. Blocking: a worker thread."""
    found = [f"pid {pid} ({comm(pid)}) has {target}" for pid, target in _descriptors()
             if target.startswith(prefixes)]
    for loop in sorted(_listdir("/sys/block")):
        try:
            with open(f"/sys/block/{loop}/loop/backing_file") as f:
                target = f.read().strip()
        except OSError:
            continue
        if target.startswith(prefixes):
            found.append(f"{loop} has {target}")
    return found


def _descriptors():
    """(pid, path) of every open descriptor of every process this one can read."""
    for name in sorted((n for n in _listdir("/proc") if n.isdigit()), key=int):
        for fd in _listdir(f"/proc/{name}/fd"):
            try:
                yield int(name), os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
