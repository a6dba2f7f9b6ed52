"""The control file's verbs: one command line in, one JSON reply out.

``handle`` takes the bytes of one write; the line and its arguments are checked by
the command table (commands.py: names, ASCII numbers within range, absolute paths),
then this module runs the verb on the registry and builds the reply. Knows nothing
of FUSE (``fs.py`` hands it the bytes).

Every input gets a reply: SnapfsError becomes its errno; anything else is a bug,
logged once with its traceback and answered with EIO (errors.py states the rule).
"""

import errno
import json
import logging
from collections.abc import Awaitable, Callable

from . import __version__, procs
from .commands import COMMANDS, command_line, parse_range, split
from .errors import SnapfsError
from .namespace import SAME, View
from .registry import Registry

log = logging.getLogger(__name__)


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
    command, words = split(line)
    if registry.stopping and not command.while_stopping:
        raise SnapfsError(errno.ESHUTDOWN, "the mount is stopping")
    values = command.check(words)
    run = VERBS[command.name]
    if command.view:
        return await run(registry, *values, view=view)
    return await run(registry, *values)


# ----- the verbs ------------------------------------------------------------------------

async def _version(reg: Registry) -> dict:
    return {"version": __version__}


async def _status(reg: Registry) -> dict:
    return reg.status()


async def _attach(reg: Registry, name: str, path: str, view: View) -> dict:
    tracker = await reg.attach(name, path, view)
    return {"name": name, "size": tracker.capacity}


async def _detach(reg: Registry, name: str) -> dict:
    reg.detach(name)
    return {}


async def _cbtinfo(reg: Registry, name: str) -> dict:
    return reg.device(name).cbt.info()


async def _markdirtyblock(reg: Registry, name: str, ranges: list[str]) -> dict:
    capacity = reg.device(name).capacity
    reg.mark_dirty(name, [parse_range(r, capacity) for r in ranges])
    return {"ranges": len(ranges)}


async def _protect(reg: Registry, name: str, action: str, ranges: list[str]) -> dict:
    tracker = reg.device(name)
    whole = [(0, tracker.capacity)] if ranges == ["all"] else None
    reg.protect(tracker, action, whole or [parse_range(r, tracker.capacity) for r in ranges])
    return {"protected": tracker.protected()}


async def _unprotect(reg: Registry, name: str, ranges: list[str]) -> dict:
    tracker = reg.device(name)
    reg.unprotect(tracker, [parse_range(r, tracker.capacity) for r in ranges] if ranges else None)
    return {"protected": tracker.protected()}


async def _snapshot_create(reg: Registry, storage: str, limit: int, names: list[str], view: View) -> dict:
    snap = await reg.create(storage, limit, names, view)
    return {"id": snap.id}


async def _snapshot_add(reg: Registry, snap_id: str, name: str) -> dict:
    await reg.add(snap_id, name)
    return {}


async def _snapshot_take(reg: Registry, snap_id: str, nofreeze: bool) -> dict:
    frozen = await reg.take(snap_id, nofreeze=nofreeze)
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


async def _snapshot_waitevent(reg: Registry, snap_id: str, timeout_ms: int, view: View) -> dict:
    """Ends with EINTR once the sender has a signal pending (the kernel would hold a
    killed sender until the reply)."""
    reg.snapshot(snap_id)
    return {"event": await reg.wait_event(snap_id, timeout_ms / 1000, lambda: procs.signal_pending(view.pid))}


async def _migrate_start(reg: Registry, name: str, target: str, rate: list[int], view: View) -> dict:
    migration = await reg.migrate_start(name, target, rate[0] if rate else 0, view)
    return {"name": name, "target": migration.target.path, "total": migration.total}


async def _migrate_info(reg: Registry, name: str) -> dict:
    return reg.migration(name).info()


async def _migrate_complete(reg: Registry, name: str) -> dict:
    await reg.migrate_complete(name)
    return {"source": reg.device(name).source.path}


async def _migrate_cancel(reg: Registry, name: str) -> dict:
    await reg.migrate_cancel(name)
    return {}


async def _cdp_start(reg: Registry, name: str, storage: str, limit: int, retain: int | None,
                     view: View) -> dict:
    rec = await reg.cdp_start(name, storage, limit, retain, view)
    return {"name": name, "storage": rec.directory, "oldest": rec.info()["oldest"]}


async def _cdp_stop(reg: Registry, name: str) -> dict:
    await reg.cdp_stop(name)
    return {}


async def _cdp_info(reg: Registry, name: str) -> dict:
    return reg.recorder(name).info()


async def _cdp_mark(reg: Registry, name: str, label: str, nofreeze: bool) -> dict:
    instant, frozen = await reg.cdp_mark(name, label, nofreeze)
    return {"label": label, "instant": instant / 1e9, "frozen": frozen}


async def _cdp_view(reg: Registry, name: str, when: str) -> dict:
    view = await reg.cdp_view(name, when)
    return {"id": view.id, "image": f"snapshots/{view.id}/{name}", "instant": view.instant_ns / 1e9,
            "mark": view.label}


async def _stop(reg: Registry, force: bool) -> dict:
    reg.request_stop(force)
    return {}


# the coroutine of each verb in commands.COMMANDS: (registry, *checked arguments) -> reply
# fields; a Command with ``view`` also gets ``view=`` (the sender: namespace.py, its pid)
VERBS: dict[str, Callable[..., Awaitable[dict]]] = {
    "version": _version, "status": _status, "attach": _attach, "detach": _detach, "cbtinfo": _cbtinfo,
    "markdirtyblock": _markdirtyblock, "protect": _protect, "unprotect": _unprotect,
    "snapshot_create": _snapshot_create, "snapshot_add": _snapshot_add,
    "snapshot_take": _snapshot_take, "snapshot_destroy": _snapshot_destroy,
    "snapshot_collect": _snapshot_collect, "snapshot_info": _snapshot_info,
    "snapshot_waitevent": _snapshot_waitevent, "migrate_start": _migrate_start,
    "migrate_info": _migrate_info, "migrate_complete": _migrate_complete, "migrate_cancel": _migrate_cancel,
    "cdp_start": _cdp_start, "cdp_stop": _cdp_stop, "cdp_info": _cdp_info, "cdp_mark": _cdp_mark,
    "cdp_view": _cdp_view, "stop": _stop,
}
assert VERBS.keys() == COMMANDS.keys()
