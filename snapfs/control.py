"""The control file's language: one command line in, one JSON reply out.

``handle`` takes the bytes of one write, checks and splits the line, validates every
argument (names, ASCII numbers within range, absolute paths), calls the registry and
builds the reply. ``COMMANDS`` is the one command table: the CLI builds its
subcommands and help from it. Knows nothing of FUSE (``fs.py`` hands it the bytes).

Every input gets a reply: SnapfsError becomes its errno; anything else is a bug,
logged once with its traceback and answered with EIO (errors.py states the rule).
"""

import errno
import json
import logging
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import __version__, procs
from .errors import SnapfsError
from .namespace import SAME, View
from .params import SECTOR, parse_number, parse_size
from .registry import Registry

log = logging.getLogger(__name__)

MAX_LINE = 8192                 # bytes in one command: parsing stays within ~2 ms
# snapshot_waitevent: the kernel runs one write to the control file at a time, so a
# waiting command holds up every other one (destroy too) until it returns
MAX_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class Command:
    """One verb: its usage, a one-line help, its argument count range, and the coroutine
    that runs it (registry, *words) -> reply fields; with ``paths``, it also gets
    ``view=`` (the sender: where it sees paths, namespace.py, and its pid)."""

    usage: str
    help: str
    low: int
    high: int
    run: Callable[..., Awaitable[dict]]
    paths: bool = False


async def handle(registry: Registry, data: bytes, view: View = SAME) -> tuple[int, bytes]:
    """One write to the control file -> (errno, or 0 on success; the JSON reply line).
    ``view``: where the handle's opener sees paths (namespace.py)."""
    try:
        reply = {"ok": True} | await execute(registry, command_line(data), view)
        code = 0
    except SnapfsError as exc:
        reply = {"ok": False, "errno": exc.errno_name, "error": exc.message}
        code = exc.errno
    except Exception:
        log.exception("internal error in command %r", bytes(data[:200]))
        reply = {"ok": False, "errno": "EIO", "error": "internal error (see the log)"}
        code = errno.EIO
    return code, (json.dumps(reply) + "\n").encode()


async def execute(registry: Registry, line: str, view: View = SAME) -> dict:
    """Run one command line; return the reply fields (without "ok"). SnapfsError with
    the command's errno (EINVAL for malformed lines). Paths in it are resolved where
    ``view`` sees them (namespace.py)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise SnapfsError(errno.EINVAL, f"cannot parse command: {exc}") from None
    if not words:
        raise SnapfsError(errno.EINVAL, "empty command")
    command = COMMANDS.get(words[0])
    if command is None:
        raise SnapfsError(errno.EINVAL, f"unknown command {words[0][:64]!r}")
    if registry.stopping and words[0] not in ("version", "status", "stop"):
        raise SnapfsError(errno.ESHUTDOWN, "the mount is stopping")
    if not command.low <= len(words) - 1 <= command.high:
        raise SnapfsError(errno.EINVAL, f"usage: {words[0]} {command.usage}")
    if command.paths:
        return await command.run(registry, *words[1:], view=view)
    return await command.run(registry, *words[1:])


def command_line(data: bytes) -> str:
    """The one command line in one write: at most MAX_LINE bytes (E2BIG), UTF-8, no
    NUL, one line (a trailing newline is allowed) (EINVAL)."""
    if len(data) > MAX_LINE:
        raise SnapfsError(errno.E2BIG, f"command longer than {MAX_LINE} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise SnapfsError(errno.EINVAL, "command is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if "\n" in text or "\0" in text:
        raise SnapfsError(errno.EINVAL, "one command per write, one line, no NUL bytes")
    return text


# ----- argument checks ------------------------------------------------------------------

def absolute(path: str, what: str) -> str:
    """Paths in commands name files as the daemon sees them: relative ones would resolve
    against its working directory, so they are refused (the CLI sends absolute ones)."""
    if not path.startswith("/"):
        raise SnapfsError(errno.EINVAL, f"{what} path {path[:64]!r} is not absolute")
    return path


def parse_range(text: str, capacity: int) -> tuple[int, int]:
    """``SECTOR:COUNT`` (512-byte sectors) -> (offset, length) in bytes; EINVAL if
    malformed or outside the device."""
    sector, sep, count = text.partition(":")
    if not sep:
        raise SnapfsError(errno.EINVAL, f"bad range {text[:64]!r}: use SECTOR:COUNT")
    offset = parse_number(sector, "sector") * SECTOR
    length = parse_number(count, "sector count") * SECTOR
    if length == 0 or offset + length > capacity:
        raise SnapfsError(errno.EINVAL, f"range {text[:64]} is outside the device ({capacity} bytes)")
    return offset, length


# ----- the verbs ------------------------------------------------------------------------

async def _version(reg: Registry) -> dict:
    return {"version": __version__}


async def _status(reg: Registry) -> dict:
    return reg.status()


async def _attach(reg: Registry, name: str, path: str, view: View) -> dict:
    tracker = await reg.attach(name, absolute(path, "source"), view)
    return {"name": name, "size": tracker.capacity}


async def _detach(reg: Registry, name: str) -> dict:
    reg.detach(name)
    return {}


async def _cbtinfo(reg: Registry, name: str) -> dict:
    return reg.device(name).cbt.info()


async def _markdirtyblock(reg: Registry, name: str, *ranges: str) -> dict:
    capacity = reg.device(name).capacity
    reg.mark_dirty(name, [parse_range(r, capacity) for r in ranges])
    return {"ranges": len(ranges)}


async def _snapshot_create(reg: Registry, storage: str, limit: str, *names: str, view: View) -> dict:
    snap = await reg.create(absolute(storage, "storage"), parse_size(limit), list(names), view)
    return {"id": snap.id}


async def _snapshot_add(reg: Registry, snap_id: str, name: str) -> dict:
    await reg.add(snap_id, name)
    return {}


async def _snapshot_take(reg: Registry, snap_id: str, option: str = "") -> dict:
    if option not in ("", "nofreeze"):
        raise SnapfsError(errno.EINVAL, f"unknown take option {option[:64]!r} (only nofreeze)")
    frozen = await reg.take(snap_id, nofreeze=option == "nofreeze")
    snap = reg.snapshot(snap_id)
    block_ms = round(snap.last_take_block_ns / 1e6, 3)
    return {"id": snap_id, "frozen": frozen, "not_frozen": snap.not_frozen, "write_block_ms": block_ms}


async def _snapshot_destroy(reg: Registry, snap_id: str) -> dict:
    await reg.destroy(snap_id)
    return {}


async def _snapshot_collect(reg: Registry) -> dict:
    return {"ids": list(reg.snapshots)}


async def _snapshot_info(reg: Registry, name: str) -> dict:
    snap = reg.snapshot_of(name)
    return {"id": snap.id, "image": f"snapshots/{snap.id}/{name}", "error_code": snap.error_code(name)}


async def _snapshot_waitevent(reg: Registry, snap_id: str, timeout_ms: str, view: View) -> dict:
    """Ends with EINTR once the sender has a signal pending (the kernel would hold a
    killed sender until the reply)."""
    reg.snapshot(snap_id)
    timeout = parse_number(timeout_ms, "timeout (milliseconds)", MAX_TIMEOUT_MS)
    return {"event": await reg.wait_event(snap_id, timeout / 1000, lambda: procs.signal_pending(view.pid))}


async def _stop(reg: Registry, option: str = "") -> dict:
    if option not in ("", "force"):
        raise SnapfsError(errno.EINVAL, f"unknown stop option {option[:64]!r} (only force)")
    reg.request_stop(option == "force")
    return {}


COMMANDS: dict[str, Command] = {
    "version": Command("", "print the daemon's version", 0, 0, _version),
    "status": Command("", "devices, snapshots, storage use", 0, 0, _status),
    "attach": Command("NAME PATH", "add a device at run time", 2, 2, _attach, paths=True),
    "detach": Command("NAME", "remove a device (its CBT history is lost)", 1, 1, _detach),
    "cbtinfo": Command("NAME", "CBT block size, count, generation, changes number", 1, 1, _cbtinfo),
    "markdirtyblock": Command("NAME SECTOR:COUNT...", "mark 512-byte sector ranges changed",
                              2, 10_000, _markdirtyblock),
    "snapshot_create": Command("STORAGE LIMIT [NAME...]", "new snapshot, prints its id",
                               2, 1_000, _snapshot_create, paths=True),
    "snapshot_add": Command("ID NAME", "add a device before take", 2, 2, _snapshot_add),
    "snapshot_take": Command("ID [nofreeze]", "the point in time", 1, 2, _snapshot_take),
    "snapshot_destroy": Command("ID", "remove images, free the storage", 1, 1, _snapshot_destroy),
    "snapshot_collect": Command("", "list snapshot ids", 0, 0, _snapshot_collect),
    "snapshot_info": Command("NAME", "snapshot id, image path and error code of a device",
                             1, 1, _snapshot_info),
    "snapshot_waitevent": Command("ID TIMEOUT_MS", "pop the next event (at most 60000 ms)",
                                  2, 2, _snapshot_waitevent, paths=True),
    "stop": Command("[force]", "stop the daemon as SIGTERM does: once no device or image file is "
                    "open; force: at once (their users get I/O errors)", 0, 1, _stop),
}
