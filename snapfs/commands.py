"""The control commands as data: each verb's name, typed arguments, limits, errnos and
help, and the checks of a command line that need no running mount.

Pure: only ``errors`` and ``params`` below it, no trio, pyfuse3 or daemon module, so
the client side (client.py, cli.py) reads the same table as the daemon (control.py)
and stays cheap to import. control.py runs a checked line; cli.py builds its parser
from ``COMMANDS``; docs/design.md section 3's table is ``doc_table()`` (a test holds
them equal).
"""

import calendar
import datetime
import errno
import re
import shlex
from dataclasses import dataclass

from .errors import SnapfsError
from .params import SECTOR, parse_number, parse_size

FSTYPE = "fuse.snapfs"          # a snapfs mount in mountinfo
MAX_LINE = 8192                 # bytes in one command: parsing stays well under a millisecond
# snapshot_waitevent: the kernel runs one write to the control file at a time, so a
# waiting command holds up every other one (destroy too) until it returns
MAX_TIMEOUT_MS = 60_000
MAX_RANGES = 10_000             # SECTOR:COUNT words in one markdirtyblock
MAX_NAMES = 998                 # device names in one snapshot_create
MAX_RATE = 1 << 20              # MiB/s: a migration's rate limit
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(name: str) -> str:
    """Device names: ``[A-Za-z0-9._-]{1,64}``, not ``.`` or ``..`` (EINVAL)."""
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise SnapfsError(errno.EINVAL, f"bad device name {name[:80]!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return name


def check_path(path: str, what: str) -> str:
    """Paths in commands name files as the daemon sees them: relative ones would resolve
    against its working directory, so they are refused (the CLI sends absolute ones)."""
    if not path.startswith("/"):
        raise SnapfsError(errno.EINVAL, f"{what} path {path[:64]!r} is not absolute")
    return path


def parse_range(text: str, capacity: int = 1 << 63) -> tuple[int, int]:
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


ACTIONS = ("deny", "audit")       # of a protected range (protect.py)


def parse_action(text: str) -> str:
    """``deny`` or ``audit`` (EINVAL)."""
    if text not in ACTIONS:
        raise SnapfsError(errno.EINVAL, f"bad action {text[:64]!r}: use deny or audit")
    return text


DURATION_RE = re.compile(r"([0-9]{1,12})([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
ISO_RE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z")
LABEL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9._:-]{0,63}")


def parse_retain(text: str) -> int:
    """RETAIN of cdp_start: seconds, or with a suffix s, m, h, d -> ns (EINVAL)."""
    m = DURATION_RE.fullmatch(text)
    if not m:
        raise SnapfsError(errno.EINVAL, f"bad retain time {text[:64]!r}: use seconds or a suffix s, m, h, d")
    return int(m.group(1)) * _UNIT[m.group(2)] * 1_000_000_000


def parse_instant(text: str) -> int | None:
    """An instant: UNIX seconds (fractions allowed) or ISO-8601 UTC (``...Z``, fractions
    to the nanosecond) -> ns since the epoch; None if it is neither."""
    if text.isascii() and text.replace(".", "", 1).isdigit():
        whole, _, frac = text.partition(".")
        return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    m = ISO_RE.fullmatch(text)
    if not m:
        return None
    try:
        day = datetime.date.fromisoformat(m.group(1))
    except ValueError:
        return None
    hour, minute, second = (int(m.group(k)) for k in (2, 3, 4))
    if hour > 23 or minute > 59 or second > 59:
        return None
    seconds = calendar.timegm((day.year, day.month, day.day, hour, minute, second))
    return seconds * 1_000_000_000 + int(((m.group(5) or "") + "000000000")[:9])


def check_label(label: str) -> str:
    """Mark labels: a letter or _ first (so never a time), then up to 63 of
    ``A-Za-z0-9._:-`` (EINVAL)."""
    if not LABEL_RE.fullmatch(label) or parse_instant(label) is not None:
        raise SnapfsError(errno.EINVAL, f"bad mark label {label[:80]!r}: a letter first, "
                          "then A-Z a-z 0-9 . _ : -")
    return label


def parse_timeout(text: str) -> int:
    """A snapshot_waitevent timeout: milliseconds, at most MAX_TIMEOUT_MS (EINVAL)."""
    return parse_number(text, "timeout (milliseconds)", MAX_TIMEOUT_MS)


@dataclass(frozen=True)
class Kind:
    """What one argument word accepts: ``check`` raises SnapfsError(EINVAL) for a bad
    word and returns its value; ``path``: the CLI makes it absolute before sending."""

    metavar: str
    check: object                  # Callable[[str], object]
    path: bool = False


NAME = Kind("NAME", check_name)
ID = Kind("ID", str)
SOURCE = Kind("PATH", lambda w: check_path(w, "source"), path=True)
STORAGE = Kind("STORAGE", lambda w: check_path(w, "storage"), path=True)
LIMIT = Kind("LIMIT", parse_size)
RANGE = Kind("SECTOR:COUNT", lambda w: (parse_range(w), w)[1])     # checked against the device later
TIMEOUT = Kind("TIMEOUT_MS", parse_timeout)
ACTION = Kind("ACTION", parse_action)
PROTECTED = Kind("RANGE", lambda w: w if w == "all" else (parse_range(w), w)[1])   # SECTOR:COUNT or all
TARGET = Kind("TARGET", lambda w: check_path(w, "target"), path=True)
RATE = Kind("RATE_MIB", lambda w: parse_number(w, "rate (MiB/s)", MAX_RATE))
JOURNAL = Kind("STORAGE", lambda w: check_path(w, "journal"), path=True)
RETAIN = Kind("RETAIN", parse_retain)
LABEL = Kind("LABEL", check_label)
WHEN = Kind("WHEN", str)               # a time or a mark's label: the daemon knows the marks


@dataclass(frozen=True)
class Arg:
    """One argument: a typed word (``kind``), ``many`` of them, or an ``option``: a
    literal word that may end the line (``nofreeze``, ``force``); the daemon gets
    True when it is there."""

    dest: str
    kind: Kind | None = None
    many: int = 0                  # at most this many words; 0: one word
    optional: bool = False         # none at all is fine (one word: None then)
    option: str = ""
    help: str = ""

    @property
    def usage(self) -> str:
        if self.option:
            return f"[{self.option}]"
        text = self.kind.metavar + ("..." if self.many > 1 else "")
        return f"[{text}]" if self.optional else text


@dataclass(frozen=True)
class Command:
    """One verb: its arguments, a one-line ``help``, what it ``does`` and its ``errors``
    (docs/design.md section 3), whether it gets the sender's ``view`` (it has paths, or
    watches the sender), and whether it still runs once a stop is under way."""

    name: str
    args: tuple[Arg, ...]
    help: str
    does: str
    errors: str = ""
    view: bool = False
    while_stopping: bool = False

    @property
    def usage(self) -> str:
        return " ".join(a.usage for a in self.args)

    def check(self, words: list[str]) -> list:
        """The arguments ``words`` (after the verb) checked and converted, one value per
        Arg (a list for ``many``, a bool for an option); EINVAL naming the usage."""
        values, rest = [], list(words)
        for arg in self.args:
            if arg.option:
                present = bool(rest) and rest[0] == arg.option
                if rest and not present:
                    raise SnapfsError(errno.EINVAL, f"unknown {self.name} option {rest[0][:64]!r} "
                                      f"(only {arg.option})")
                values.append(present)
                rest = rest[present:]
            elif arg.many:
                if len(rest) > arg.many or not (rest or arg.optional):
                    raise self.usage_error()
                values.append([arg.kind.check(w) for w in rest])
                rest = []
            elif rest:
                values.append(arg.kind.check(rest.pop(0)))
            elif arg.optional:             # a last word that may be left out: None
                values.append(None)
            else:
                raise self.usage_error()
        if rest:
            raise self.usage_error()
        return values

    def usage_error(self) -> SnapfsError:
        return SnapfsError(errno.EINVAL, f"usage: {self.name} {self.usage}".rstrip())


def _commands(*commands: Command) -> dict[str, Command]:
    return {c.name: c for c in commands}


COMMANDS: dict[str, Command] = _commands(
    Command("version", (), "print the daemon's version", '`{"version": "x.y.z"}`',
            while_stopping=True),
    Command("status", (), "devices, snapshots, storage use", "as `MOUNT/status`", while_stopping=True),
    Command("attach", (Arg("name", NAME), Arg("path", SOURCE)), "add a device at run time",
            "adds a device at run time (regular file or block device, whole 512-byte sectors)",
            "EEXIST name or source taken; EBUSY file in use by another snapfs or a storage; ENOENT/EACCES "
            "path; EXDEV sender's namespace unknown; EINVAL bad name, not file/bdev, odd size, relative "
            "path, a source the data path would wait on itself through, or one under a live snapshot's "
            "storage (§4 Guard)", view=True),
    Command("detach", (Arg("name", NAME),), "remove a device (its CBT history is lost)",
            "removes it; its CBT history is gone", "ENOENT; EBUSY in a snapshot or open"),
    Command("cbtinfo", (Arg("name", NAME),), "CBT block size, count, generation, changes number",
            "as `cbt/NAME/info`", "ENOENT"),
    Command("markdirtyblock", (Arg("name", NAME), Arg("ranges", RANGE, many=MAX_RANGES)),
            "mark 512-byte sector ranges changed",
            "marks 512-byte sector ranges changed in both CBT maps",
            "ENOENT; EINVAL malformed or outside the device"),
    Command("protect", (Arg("name", NAME), Arg("action", ACTION, help="deny or audit"),
                        Arg("ranges", PROTECTED, many=MAX_RANGES, help="SECTOR:COUNT..., or all")),
            "deny: writes overlapping the sector ranges fail with EPERM; audit: they are logged to "
            "MOUNT/audit",
            "ACTION `deny` or `audit` on 512-byte sector ranges, RANGE `SECTOR:COUNT` or `all` (the "
            "whole device) (§4 Protected ranges); `{\"protected\": [...]}`",
            "ENOENT device; EINVAL malformed, outside the device, bad action, ranges overlapping each "
            "other; EEXIST a range overlaps a rule; ENOSPC more than 65536 rules"),
    Command("unprotect", (Arg("name", NAME), Arg("ranges", RANGE, many=MAX_RANGES, optional=True)),
            "remove protected sector ranges (all without ranges)",
            "removes those sectors from the rules (a rule partly covered keeps the rest), or every rule",
            "ENOENT device, no rule, or a range touching none; EINVAL malformed or outside"),
    Command("snapshot_create", (Arg("storage", STORAGE), Arg("limit", LIMIT),
                                Arg("names", NAME, many=MAX_NAMES, optional=True)),
            "new snapshot, prints its id",
            'a new snapshot with its difference storage; `{"id": ...}`',
            "ENOENT device; EBUSY device in another snapshot or storage file in use; EXDEV sender's "
            "namespace unknown; EINVAL bad limit, relative path, storage refused (§4 Guard); ENOSPC "
            "existing storage bigger than LIMIT", view=True),
    Command("snapshot_add", (Arg("id", ID), Arg("name", NAME)), "add a device before take",
            "adds a device before take",
            "ESRCH; EALREADY in it; EBUSY in another, or taken, or being taken; EINVAL storage refused"),
    Command("snapshot_take", (Arg("id", ID), Arg("nofreeze", option="nofreeze",
                                                 help="do not freeze filesystems stacked on the devices")),
            "the point in time", "the point in time of all its devices (§5)",
            "ESRCH; EALREADY taken or being taken; ENODEV no devices; EINVAL storage refused"),
    Command("snapshot_destroy", (Arg("id", ID),), "remove images, free the storage",
            "removes images, stops COW, frees storage; tracking goes on", "ESRCH"),
    Command("snapshot_collect", (), "list snapshot ids", '`{"ids": [...]}`'),
    Command("snapshot_info", (Arg("name", NAME),), "snapshot id, image path and error code of a device",
            '`{"id", "image": "snapshots/ID/NAME", "error_code": 0 or -errno}`',
            "ENOENT; ESRCH not in a snapshot"),
    Command("snapshot_waitevent", (Arg("id", ID), Arg("timeout_ms", TIMEOUT)),
            f"pop the next event (at most {MAX_TIMEOUT_MS} ms)",
            f"pops the next unconsumed event (TIMEOUT_MS at most {MAX_TIMEOUT_MS})",
            "ETIMEDOUT; ESRCH (also when destroyed meanwhile); EINTR the sender has a signal pending; "
            "EINVAL timeout", view=True),
    Command("migrate_start", (Arg("name", NAME), Arg("target", TARGET),
                              Arg("rate", RATE, many=1, optional=True,
                                  help="the copy's MiB/s (0: no limit)")),
            "move a device to a new file or a block device while it is in use",
            "moves a device to TARGET while it is in use (§4 Migration); RATE_MIB: the copy's MiB/s, 0 no "
            'limit; `{"name", "target", "total"}`',
            "ENOENT device or TARGET's directory; EBUSY in a snapshot, migrating, or journaled (CDP); "
            "EEXIST TARGET an "
            "existing regular file; ENOSPC TARGET a block device smaller than the device; EINVAL relative "
            "path, TARGET refused (§4 Guard: inside this mount, a source, ...); EXDEV sender's namespace "
            "unknown", view=True),
    Command("migrate_info", (Arg("name", NAME),),
            "a migration's state, copied and total bytes, dirty bytes left",
            'the last migration of NAME: `{"state": "running"\\|"ready"\\|"completing"\\|"completed"\\|'
            '"cancelled"\\|"failed", "copied", "total", "dirty", "source", "target", "seconds", '
            '"ready_seconds", "write_block_ms"}` (how long the pivot held writes), with `errno` and '
            '`error` when failed', "ENOENT; ESRCH never migrated"),
    Command("migrate_complete", (Arg("name", NAME),), "switch a ready migration's device to its target",
            'the pivot (§4 Migration): NAME is backed by TARGET from now on; `{"source": TARGET}`',
            "EAGAIN not ready; ESRCH; the target's errno when its final fsync fails (the migration fails, "
            "the device stays)"),
    Command("migrate_cancel", (Arg("name", NAME),), "stop a migration: the device stays on its source",
            "ends a migration: the device stays on its source, a created TARGET is removed",
            "ESRCH; EBUSY completing"),
    Command("cdp_start", (Arg("name", NAME), Arg("storage", JOURNAL), Arg("limit", LIMIT),
                          Arg("retain", RETAIN, optional=True)),
            "journal every later write of NAME into the directory STORAGE, at most LIMIT bytes, "
            "keeping at least RETAIN (s, m, h, d)",
            "journal every later write of NAME into the directory STORAGE, at most LIMIT bytes, keeping "
            "at least RETAIN (seconds, or a suffix s, m, h, d; default: what LIMIT holds) (§9)",
            "ENOENT device; EBUSY journaled already, migrating, or STORAGE used by another journal; EINVAL "
            "limit below 4M, not a directory, refused (§4 Guard), bad RETAIN; EXDEV STORAGE named from "
            "another mount namespace", view=True),
    Command("cdp_stop", (Arg("name", NAME),), "end the journal of NAME (its views and files go)",
            "ends the journal: its views are destroyed, its files removed", "ENOENT; ESRCH no journal"),
    Command("cdp_info", (Arg("name", NAME),),
            "the journal of NAME: storage, used, limit, oldest, newest, marks",
            "JSON: storage, used, limit, retain, `oldest`, `newest` (UNIX seconds with fractions), writes, "
            "bytes_written, marks (label: instant), state (running/stopped), `stopped` (why), "
            "`history_reset` (why), views, index_bytes, window_hits", "ENOENT; ESRCH"),
    Command("cdp_mark", (Arg("name", NAME), Arg("label", LABEL),
                         Arg("nofreeze", option="nofreeze", help="do not freeze filesystems stacked on it")),
            "a named, application-consistent instant",
            "freezes the filesystems stacked on NAME as take does, records LABEL at the instant, thaws; "
            '`{"label", "instant", "frozen"}`',
            "ENOENT; ESRCH; EEXIST label taken; EINVAL label (a letter or _ first, then up to 63 of "
            "`A-Za-z0-9._:-`); EIO journal stopped"),
    Command("cdp_view", (Arg("name", NAME), Arg("when", WHEN)),
            "NAME as it was at WHEN (UNIX seconds, ISO-8601 UTC or a mark) under snapshots/ID/NAME",
            "NAME as it was at WHEN (UNIX seconds with fractions, ISO-8601 UTC `2026-12-03T07:00:00.25Z`, "
            'or a mark\'s label) as `snapshots/ID/NAME`; `{"id", "image", "instant", "mark"}`; '
            "`snapshot_destroy ID` ends it",
            "ENOENT; ESRCH; ERANGE before `oldest`; EINVAL in the future or not a time nor a mark; EIO "
            "journal stopped"),
    Command("stop", (Arg("force", option="force", help="at once: users of open device and image "
                         "files get I/O errors"),),
            "stop the daemon as SIGTERM does: once no device or image file is open",
            "a stop, as SIGTERM (§4 Stop); `force`: without waiting for open device and image files",
            "EINVAL option", while_stopping=True),
)


def split(line: str) -> tuple[Command, list]:
    """A command line -> its Command and checked arguments (Command.check); EINVAL for
    a malformed line or an unknown verb."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise SnapfsError(errno.EINVAL, f"cannot parse command: {exc}") from None
    if not words:
        raise SnapfsError(errno.EINVAL, "empty command")
    command = COMMANDS.get(words[0])
    if command is None:
        raise SnapfsError(errno.EINVAL, f"unknown command {words[0][:64]!r}")
    return command, words[1:]


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


def format_line(command: str, *words: str) -> str:
    """A command line as the daemon splits it: every word quoted."""
    return " ".join(shlex.quote(w) for w in (command, *words))


def doc_table() -> list[str]:
    """docs/design.md section 3's table rows, one per command."""
    return [f"| `{f'{c.name} {c.usage}'.rstrip()}` | {c.does} | {c.errors}{' ' * bool(c.errors)}|"
            for c in COMMANDS.values()]
