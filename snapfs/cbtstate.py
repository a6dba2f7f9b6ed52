"""The on-disk state format: persisted CBT, protected ranges and the record of
migrated sources, defined and commented in this one place.

Layout::

    STATE_DIR/cbt/<key>.cbt      key = sha256 of the source's real path, 32 hex digits
    STATE_DIR/moved/<key>.json   key = the same, of a source a device migrated away from

One file per device source, written only at a clean stop, atomically (write to a
temporary file, fsync, rename, fsync the directory). Contents::

    line 1   JSON header, UTF-8, ending in "\\n":
             format        "snapfs-cbt"        (anything else: ignored)
             version       1
             source        {path, dev, ino, size, mtime_ns, kind}: the source's
                           identity at the stop (source.Identity)
             block_size    tracking block size in bytes
             block_count   number of blocks = bytes in each map
             generation_id UUID string
             changes_number, active   0..255, 1..255 (cbt.py)
             sha256        hex digest of the two maps that follow
             protect       optional (absent in files of snapfs before it, and
                           ignored by them): the protected ranges, a list of
                           [action, first sector, sector count], action "deny"
                           or "audit" (protect.py)
    then     write_map     block_count bytes
    then     read_map      block_count bytes

Clean-stop rule: a file is consumed (removed) as soon as the mount that loaded it is
running. So a file exists only if the last mount of that source stopped cleanly;
after a crash there is none and the device starts a new generation. A file whose
source identity (path, inode, size, mtime; for block devices path, rdev and size),
block size, digest or header does not match is ignored with a warning: never trust
a CBT that could hide a write. Protected ranges are kept whenever the header is
readable, names this source's path and size, and every range lies inside it (they
say where writes must not go, which a changed content does not change); else they
are dropped with a warning.

Moved sources (``migrate_complete``, issue 23): written, atomically as above, during
the pivot, after the target was made durable and before the device is switched to it;
removed when a device migrates back onto that source. One JSON object::

    format "snapfs-moved", version 1, name (the device), source (the old path),
    target (the new path), time (unix seconds)

A mount or attach naming a source with a record is refused (ESTALE) with a message
naming the target: after a crash past the pivot the old source is stale, and serving
it would silently drop every write since. Removing the file is how to serve it again.
"""

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from typing import NamedTuple

from .cbt import CBT
from .osutil import fsync_dir, replace_file
from .params import SECTOR, Params, tracking_block_size
from .protect import ACTIONS
from .source import Identity, Source

log = logging.getLogger(__name__)

FORMAT = "snapfs-cbt"
VERSION = 1
MOVED_FORMAT = "snapfs-moved"


class Restored(NamedTuple):
    """What a state file kept of a source: its CBT (None: a new generation) and its
    protected ranges (action, first sector, sector count)."""

    cbt: CBT | None
    rules: list[tuple[str, int, int]]


class StateStore:
    """Loads CBT at mount, consumes the files once running, saves at clean stop."""

    def __init__(self, state_dir: str, params: Params):
        self.dir = os.path.join(state_dir, "cbt")
        self.params = params
        self._loaded: list[str] = []
        self.running = False

    def path_for(self, source: Source) -> str:
        return os.path.join(self.dir, _key(source.path) + ".cbt")

    def _moved_path(self, path: str) -> str:
        return os.path.join(os.path.dirname(self.dir), "moved", _key(path) + ".json")

    def moved(self, source: Source) -> str | None:
        """Why ``source`` must not be served: a device migrated away from it (the
        message names the target and the record), or None."""
        record = self._moved_path(source.path)
        try:
            with open(record, "rb") as f:
                moved = json.loads(f.read())
            if moved.get("format") != MOVED_FORMAT or moved.get("source") != source.path:
                return None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            return f"{source.path} has an unreadable migration record {record} ({exc})"
        return (f"{source.path} is stale: device {moved.get('name')} was migrated from it to "
                f"{moved.get('target')}; serve {moved.get('target')} instead (or remove {record} "
                f"to serve {source.path} again)")

    def record_move(self, name: str, old: str, new: str) -> None:
        """Blocking, durable: device ``name`` moved from source ``old`` to ``new``
        (a record for ``new``, from an earlier move away from it, is removed)."""
        directory = os.path.dirname(self._moved_path(old))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        record = {"format": MOVED_FORMAT, "version": VERSION, "name": name, "source": old,
                  "target": new, "time": round(time.time(), 3)}
        path = self._moved_path(old)
        replace_file(path, [json.dumps(record).encode() + b"\n"], path + ".tmp", sync_dir=False, mode=0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._moved_path(new))
        fsync_dir(directory)

    def load(self, source: Source) -> CBT | None:
        """The persisted CBT of ``source`` if it is trustworthy, else None (new
        generation). Never raises for bad files: they are logged and ignored."""
        return self.restore(source).cbt

    def restore(self, source: Source) -> Restored:
        """The persisted CBT of ``source`` if it is trustworthy, else None (new
        generation), and its protected ranges (module docstring). Never raises for
        bad files: they are logged and ignored."""
        path = self.path_for(source)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            log.info("no saved CBT for %s (first mount or unclean stop): new generation",
                     source.path)
            return Restored(None, [])
        except OSError as exc:
            log.warning("cannot read CBT state %s: %s", path, exc)
            return Restored(None, [])
        self._loaded.append(path)
        if self.running:       # a run-time attach: the file is consumed at once
            self.consume()
        rules = _decode_rules(data, source, path)
        try:
            return Restored(self._decode(data, source), rules)
        except Exception as exc:   # any malformed file: never trust it, never crash
            log.warning("ignoring CBT state %s for %s: %s: %s; new generation",
                        path, source.path, type(exc).__name__, exc)
            return Restored(None, rules)

    def _decode(self, data: bytes, source: Source) -> CBT:
        header_end = data.index(b"\n")
        h = json.loads(data[:header_end])
        if not isinstance(h, dict) or h.get("format") != FORMAT or h.get("version") != VERSION:
            raise ValueError("unknown format")
        if not isinstance(h.get("source"), dict):
            raise ValueError("no source identity")
        if not _same_identity(h["source"], source.identity()):
            raise ValueError("source changed since the clean stop")
        count, block_size = int(h["block_count"]), int(h["block_size"])
        maps = data[header_end + 1 :]
        if len(maps) != 2 * count or hashlib.sha256(maps).hexdigest() != h["sha256"]:
            raise ValueError("truncated or corrupted maps")
        if block_size != tracking_block_size(source.size, self.params):
            raise ValueError("tracking block size changed")
        cbt = CBT(source.size, block_size)
        if cbt.block_count != count:
            raise ValueError("block count mismatch")
        active, number = int(h["active"]), int(h["changes_number"])
        if not (1 <= active <= 255 and 0 <= number < active):
            raise ValueError("bad numbers")
        cbt.write_map[:] = maps[:count]
        cbt.read_map[:] = maps[count:]
        cbt.generation_id, cbt.active, cbt.changes_number = str(h["generation_id"]), active, number
        log.info("restored CBT of %s: generation %s, changes_number %d",
                 source.path, cbt.generation_id, number)
        return cbt

    def consume(self) -> None:
        """Called once the mount runs: from now on only a clean stop leaves state.
        Files loaded later (run-time attach) are consumed as they are loaded."""
        self.running = True
        for path in self._loaded:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("cannot remove consumed CBT state %s: %s", path, exc)
        self._loaded.clear()

    def forget(self, source: Source) -> None:
        """Detach: the CBT history of ``source`` is gone, on disk too."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_for(source))

    def save(self, source: Source, cbt: CBT, rules: list[tuple[str, int, int]] = ()) -> None:
        """Write the CBT and protected ranges (action, first sector, sector count) of
        ``source`` atomically (after the source was fsynced)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        maps = bytes(cbt.write_map) + bytes(cbt.read_map)
        header = {
            "format": FORMAT, "version": VERSION,
            "source": asdict(source.identity()),
            "block_size": cbt.block_size, "block_count": cbt.block_count,
            "generation_id": cbt.generation_id,
            "changes_number": cbt.changes_number, "active": cbt.active,
            "sha256": hashlib.sha256(maps).hexdigest(),
        }
        if rules:
            header["protect"] = [list(rule) for rule in rules]
        path = self.path_for(source)
        replace_file(path, [json.dumps(header).encode() + b"\n", maps], path + ".tmp", mode=0o600)


def _decode_rules(data: bytes, source: Source, path: str) -> list[tuple[str, int, int]]:
    """The protected ranges of a state file's header (module docstring); [] when it
    has none or they cannot be trusted to fit this source (logged)."""
    try:
        h = json.loads(data[: data.index(b"\n")])
        saved = h.get("protect", [])
        if not saved:
            return []
        was = h["source"]
        if h.get("format") != FORMAT or (was["path"], was["size"]) != (source.path, source.size):
            raise ValueError("the header names another source or size")
        rules = [(str(a), int(first), int(count)) for a, first, count in saved]
        for action, first, count in rules:
            if action not in ACTIONS or first < 0 or count <= 0 or (first + count) * SECTOR > source.size:
                raise ValueError(f"bad range {action} {first}:{count}")
        return rules
    except Exception as exc:   # any malformed header: drop the rules, never crash
        log.warning("dropping the protected ranges saved in %s for %s: %s: %s",
                    path, source.path, type(exc).__name__, exc)
        return []


def _key(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:32]


def _same_identity(saved: dict, now: Identity) -> bool:
    if saved.get("kind") != now.kind or saved.get("path") != now.path:
        return False
    if saved.get("size") != now.size:
        return False
    if now.kind == "bdev":
        return True   # a block device has no trustworthy mtime; see README limits
    return (saved.get("dev"), saved.get("ino"), saved.get("mtime_ns")) == (now.dev, now.ino, now.mtime_ns)
