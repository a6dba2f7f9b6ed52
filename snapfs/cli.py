"""``snapfs``: the command-line front end.

``snapfs mount`` runs a mount (mount.py). Every other command is a line written to
the control file of a running mount and its JSON reply, printed readably (or raw
with ``--json``); the exit status is 0 on success, 1 with the error on stderr.
"""

import argparse
import contextlib
import errno
import json
import logging
import os
import shlex
import subprocess
import sys
import time

from . import __version__, mountinfo
from .control import MAX_LINE, MAX_TIMEOUT_MS
from .errors import SnapfsError
from .params import SECTOR, Params, parse_number, parse_size
from .state import default_state_dir

FSTYPE = "fuse.snapfs"


# ----- talking to a mount ------------------------------------------------------------

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


def send(mount: str, line: str) -> dict:
    """Write one command to MOUNT/control, read the JSON reply on the same handle."""
    path = os.path.join(mount, "control")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"opening {path}") from None
    try:
        with contextlib.suppress(OSError):   # a failed command: the reply says why
            os.write(fd, line.encode() + b"\n")
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    finally:
        os.close(fd)
    if not data:
        raise SnapfsError(errno.EIO, "no reply from the mount")
    return json.loads(data)


def command(mount: str, line: str) -> dict:
    """``send`` and raise SnapfsError for a failed command."""
    reply = send(mount, line)
    if not reply.get("ok"):
        code = getattr(errno, reply.get("errno", ""), errno.EIO)
        raise SnapfsError(code, reply.get("error", "failed"))
    return reply


def quote(word: str) -> str:
    return shlex.quote(word)


# ----- output ----------------------------------------------------------------------

def print_reply(reply: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(reply))
        return
    for key, value in reply.items():
        if key == "ok":
            continue
        if isinstance(value, list):
            print(f"{key}=" + " ".join(str(v) for v in value))
        elif isinstance(value, dict):
            print(f"{key}: " + " ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"{key}={value}")


def print_status(status: dict) -> None:
    print(f"snapfs {status['version']} at {status['mountpoint']} (pid {status['pid']})")
    print(f"{'DEVICE':16} {'SIZE':>10} {'WRITTEN':>10} {'COW':>7} {'CBT GEN':10} {'NUM':>4}  SNAPSHOT")
    for name, d in status["devices"].items():
        cbt = d["cbt"]
        print(f"{name:16} {human(d['size']):>10} {human(d['bytes_written']):>10} "
              f"{d['cow_copies']:>7} {cbt['generation_id'][:8]:10} {cbt['changes_number']:>4}  "
              f"{d['snapshot'] or '-'}")
    for sid, s in status["snapshots"].items():
        print(f"\nsnapshot {sid}  {s['state']}  storage {s['storage']}: "
              f"used {human(s['used'])} of {human(s['size'])}, limit {human(s['limit'])}")
        for name, a in s["devices"].items():
            err = a.get("error_code", 0)
            print(f"  {name:14} {a.get('state', '-'):10} chunk {human(a['chunk_size'])}"
                  f"  copied {a.get('chunks_copied', 0)}" + (f"  error {err}" if err else ""))


def human(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# ----- commands ----------------------------------------------------------------------

def cmd_mount(args) -> int:
    from . import mount

    params = Params(
        chunk_minimum=args.chunk_minimum,
        chunk_maximum_count_shift=args.chunk_maximum_count_shift,
        tracking_block_minimum=args.tracking_block_minimum,
        tracking_block_maximum_count=args.tracking_block_maximum_count,
        diff_storage_minimum=args.diff_storage_minimum,
    ).validate()
    config = mount.MountConfig(args.mountpoint, args.sources, params,
                               args.state_dir or default_state_dir(), args.allow_other)
    if args.daemon:
        return daemonize(config, args)
    setup_logging(args.log_level, args.log_file)
    return mount.run(config)


def daemonize(config, args) -> int:
    """Fork; the child mounts and reports readiness (or its error) through a pipe;
    the parent returns only then."""
    from . import mount

    mount.check_mountpoint(config.mountpoint)
    config.state_dir = mount.check_state_dir(config.state_dir)
    log_file = os.path.abspath(args.log_file or os.path.join(config.state_dir, "snapfs.log"))
    try:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        with open(log_file, "a"):
            pass
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"log file {log_file}") from None
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
        if message.startswith("ready"):
            return 0
        print(f"snapfs: {message.strip() or 'the daemon died before the mount was ready'}",
              file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    setup_logging(args.log_level, log_file)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def ready():
        os.write(write_end, b"ready\n")
        os.close(write_end)

    try:
        status = mount.run(config, ready)
    except SnapfsError as exc:
        os.write(write_end, str(exc).encode())
        os._exit(1)
    except BaseException:
        logging.getLogger("snapfs").exception("daemon failed")
        os._exit(1)
    os._exit(status)


def setup_logging(level: str, log_file: str | None) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def read_status(mount: str) -> dict:
    """MOUNT/status as JSON: a read, so it never waits behind a command that holds
    the control file (the kernel runs one write to it at a time)."""
    path = os.path.join(mount, "status")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"reading {path}") from None


def cmd_umount(args) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if mountpoint not in snapfs_mounts():
        raise SnapfsError(errno.EINVAL, f"{mountpoint} is not a snapfs mount")
    pid = read_status(mountpoint).get("pid")
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise SnapfsError(errno.EBUSY, f"{mountpoint} is busy (files open or a process inside it); "
                          f"see 'fuser -vm {mountpoint}'. Nothing was changed.")
    wait_exit(pid, 60)
    return 0


def wait_exit(pid: int | None, timeout: float) -> None:
    """Wait for the daemon to finish saving CBT and exit."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)


def cmd_status(args) -> int:
    reply = command(find_mount(args.mount), "status")
    if args.json:
        print(json.dumps(reply))
    else:
        print_status(reply)
    return 0


WAIT_SLICE_MS = 200


def cmd_waitevent(args) -> int:
    """snapshot_waitevent in short slices: the kernel runs one write to ``control`` at a
    time, so one long wait would hold up every other command on the mount."""
    if len(args.words) != 2:
        raise SnapfsError(errno.EINVAL, "usage: snapshot_waitevent ID TIMEOUT_MS")
    deadline = parse_number(args.words[1], "timeout (milliseconds)", MAX_TIMEOUT_MS)
    mount, snap_id = find_mount(args.mount), args.words[0]
    end = time.monotonic() + deadline / 1000
    while True:
        left = max(0, round((end - time.monotonic()) * 1000))
        reply = send(mount, f"snapshot_waitevent {quote(snap_id)} {min(left, WAIT_SLICE_MS)}")
        if reply.get("ok") or reply.get("errno") != "ETIMEDOUT" or left <= WAIT_SLICE_MS:
            break
    if not reply.get("ok"):
        raise SnapfsError(getattr(errno, reply["errno"], errno.EIO), reply["error"])
    print_reply(reply, args.json)
    return 0


def cmd_markdirty_file(args) -> int:
    """markdirtyblock --file PATH: mark the blocks of a file that lives in a filesystem
    stacked on a snapfs device (through a loop device), found with FIEMAP."""
    from .fiemap import backing_device_file, file_extents

    backing, fs_offset = backing_device_file(args.file)
    devices_dir, name = os.path.split(os.path.realpath(backing))
    mount = os.path.dirname(devices_dir)
    if os.path.basename(devices_dir) != "devices" or mount not in snapfs_mounts():
        raise SnapfsError(errno.EINVAL, f"{args.file} is not on a snapfs device (its loop device "
                          f"is backed by {backing})")
    ranges = []
    for physical, length in file_extents(args.file):
        start = (fs_offset + physical) // SECTOR
        end = -(-(fs_offset + physical + length) // SECTOR)
        ranges.append(f"{start}:{end - start}")
    for line in batched_lines(f"markdirtyblock {quote(name)}", ranges):
        command(mount, line)
    print_reply({"device": name, "ranges": len(ranges)}, args.json)
    return 0


def batched_lines(head: str, words: list[str]) -> list[str]:
    """``head word word ...`` lines of at most MAX_LINE bytes with every word once."""
    lines, line = [], head
    for word in words:
        if len(line) + 1 + len(word) >= MAX_LINE and line != head:
            lines.append(line)
            line = head
        line += " " + word
    return [*lines, line]


# the words of these commands that are paths: sent absolute (the daemon has its own cwd)
PATH_WORDS = {"attach": 1, "snapshot_create": 0}


def cmd_control(args) -> int:
    """Any control command: the words are sent as one line."""
    if getattr(args, "file", None):
        if args.words:
            raise SnapfsError(errno.EINVAL, "markdirtyblock takes either --file PATH or NAME RANGES")
        return cmd_markdirty_file(args)
    index = PATH_WORDS.get(args.command)
    if index is not None and len(args.words) > index:
        args.words[index] = os.path.abspath(args.words[index])
    words = [args.command, *args.words]
    if getattr(args, "nofreeze", False):
        words.append("nofreeze")
    reply = command(find_mount(args.mount), " ".join(quote(w) for w in words))
    print_reply(reply, args.json)
    return 0


def cmd_watch(args) -> int:
    """Follow snapshots/ID/events until the snapshot is destroyed."""
    mount = find_mount(args.mount)
    path = os.path.join(mount, "snapshots", args.id, "events")
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"snapshot {args.id}") from None
    with f:
        buf = b""
        while chunk := f.read(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                print(format_event(json.loads(line)) if not args.json else line.decode(), flush=True)
    print(f"snapshot {args.id} destroyed", flush=True)
    return 0


def format_event(ev: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["time"] / 1e9))
    if ev["event"] == "corrupted":
        return (f"{when} corrupted: image of {ev['device']} is unusable "
                f"({errno.errorcode.get(ev['error_code'], ev['error_code'])}: "
                f"{os.strerror(ev['error_code'])})")
    if ev["event"] == "no_space":
        return (f"{when} no_space: storage reached its limit "
                f"({human(ev['requested_bytes'])}); the next chunk that needs a slot corrupts its image")
    return f"{when} {ev}"


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


def cmd_cbt_changes(args) -> int:
    """Changed byte ranges since a previous backup's (generation_id, changes_number)."""
    from .cbt import changed_runs

    info, cbt_map = read_cbt(find_mount(args.mount), args.name)
    result = {"generation_id": info["generation_id"], "changes_number": info["changes_number"]}
    if info["generation_id"] != args.generation_id:
        result |= {"full_backup": True, "reason": "generation changed: all history is lost"}
    else:
        runs = list(changed_runs(cbt_map, args.changes_number, info["block_size"],
                                 info["device_capacity"]))
        result |= {"full_backup": False, "ranges": runs, "bytes": sum(n for _, n in runs)}
    if args.json:
        print(json.dumps(result))
    elif result["full_backup"]:
        print(f"full backup needed: {result['reason']} (now {info['generation_id']})")
    else:
        for offset, length in result["ranges"]:
            print(offset, length)
        print(f"# {len(result['ranges'])} ranges, {result['bytes']} bytes changed since "
              f"{args.changes_number}; now changes_number={info['changes_number']}", file=sys.stderr)
    return 0


CONTROL_COMMANDS = {
    "version": "print the daemon's version",
    "attach": "NAME PATH: add a device at run time",
    "detach": "NAME: remove a device (its CBT history is lost)",
    "cbtinfo": "NAME: CBT block size, count, generation, changes number",
    "markdirtyblock": "NAME SECTOR:COUNT...: mark 512-byte sector ranges changed",
    "snapshot_create": "STORAGE LIMIT [NAME...]: new snapshot, prints its id",
    "snapshot_add": "ID NAME: add a device before take",
    "snapshot_take": "ID [--nofreeze]: the point in time",
    "snapshot_destroy": "ID: remove images, free the storage",
    "snapshot_collect": "list snapshot ids",
    "snapshot_info": "NAME: snapshot id, image path and error code of a device",
    "snapshot_waitevent": "ID TIMEOUT_MS: pop the next event",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapfs", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"snapfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p.add_argument("-m", "--mount", help="mount point (default: the only snapfs mount)")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    # the same options after the command; SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-m", "--mount", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    m = sub.add_parser("mount", help="mount snapfs over devices (foreground unless --daemon)")
    m.add_argument("mountpoint")
    m.add_argument("sources", nargs="+", metavar="[NAME=]SOURCE")
    defaults = Params()
    m.add_argument("--chunk-minimum", type=_size, default=defaults.chunk_minimum)
    m.add_argument("--chunk-maximum-count-shift", type=int, default=defaults.chunk_maximum_count_shift)
    m.add_argument("--tracking-block-minimum", type=_size, default=defaults.tracking_block_minimum)
    m.add_argument("--tracking-block-maximum-count", type=int,
                   default=defaults.tracking_block_maximum_count)
    m.add_argument("--diff-storage-minimum", type=_size, default=defaults.diff_storage_minimum)
    m.add_argument("--state-dir", help=f"where CBT is kept (default {default_state_dir()})")
    m.add_argument("-o", dest="fuse_options", action="append", default=[],
                   help="FUSE option; only allow_other is accepted")
    m.add_argument("--daemon", action="store_true", help="detach once the mount is ready")
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    m.add_argument("--log-file", help="log here (default: stderr, or STATE_DIR/snapfs.log with --daemon)")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="clean stop: persists CBT; refuses while files are open")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_umount)

    s = sub.add_parser("status", parents=[common], help="devices, snapshots, storage use")
    s.set_defaults(func=cmd_status)

    w = sub.add_parser("watch", parents=[common], help="follow a snapshot's events until destroy")
    w.add_argument("id")
    w.set_defaults(func=cmd_watch)

    cc = sub.add_parser("cbt-changes", parents=[common],
                        help="changed byte ranges since a backup's generation_id and changes_number")
    cc.add_argument("name")
    cc.add_argument("generation_id")
    cc.add_argument("changes_number", type=int)
    cc.set_defaults(func=cmd_cbt_changes)

    for name, text in CONTROL_COMMANDS.items():
        c = sub.add_parser(name, parents=[common], help=text)
        c.add_argument("words", nargs="*")
        if name == "markdirtyblock":
            c.add_argument("--file", help="mark the blocks of this file (in a filesystem stacked "
                           "on a snapfs device through a loop device)")
        if name == "snapshot_take":
            c.add_argument("--nofreeze", action="store_true",
                           help="do not freeze filesystems stacked on the devices")
        c.set_defaults(func=cmd_waitevent if name == "snapshot_waitevent" else cmd_control,
                       command=name)
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SnapfsError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "mount":
        bad = [o for opt in args.fuse_options for o in opt.split(",") if o != "allow_other"]
        if bad:
            print(f"snapfs: unsupported -o option(s): {', '.join(bad)}", file=sys.stderr)
            return 2
        args.allow_other = bool(args.fuse_options)
    try:
        return args.func(args)
    except SnapfsError as exc:
        print(f"snapfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
