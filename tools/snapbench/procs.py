"""Processes, mounts, signals: starting and stopping daemons, (lazy) unmounts, polling."""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .common import BenchError


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the bench dies (snapfs and QSD unmount and
    quit on SIGTERM)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a daemon in its own session (a terminal Ctrl-C reaches only the bench,
    which then stops it in order), output to ``log_path``; ``env``: more environment
    variables (then it runs in the log's directory, so ``python -m`` does not import
    from the bench's working directory first)."""
    extra = {"env": {**os.environ, **env}, "cwd": log_path.parent} if env else {}
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, preexec_fn=_die_with_parent, **extra)


def finish_process(proc: subprocess.Popen | None, grace: float = 10) -> None:
    """Make sure ``proc`` has exited: wait, then SIGTERM, then SIGKILL."""
    if proc is None:
        return
    for action in (None, proc.terminate, proc.kill):
        if action is not None and proc.poll() is None:
            action()
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def mount_points() -> list[str]:
    """Mount points of this mount namespace (octal escapes decoded)."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f]


def is_mounted(path: Path | str) -> bool:
    """Whether ``path`` is a mount point."""
    return str(path) in mount_points()


def lazy_unmount(path: Path | str) -> None:
    """Detach a (FUSE) mount even if busy: fusermount3 -u -z, then umount -l."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True, check=False)


@contextlib.contextmanager
def shielded():
    """Ignore SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot leave a
    mount or a daemon behind."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def wait_until(probe: Callable[[], object], timeout: float, what: str):
    """Poll ``probe`` until it returns something truthy; BenchError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(0.05)
    raise BenchError(f"{what} not ready after {timeout:.0f} s")


def tail(path: Path, chars: int = 1500) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")
