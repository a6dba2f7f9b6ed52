"""``snapfs``: the command-line front end.

``snapfs mount`` runs a mount (mount.py). Every other command is a line written to
the control file of a running mount and its JSON reply, printed readably (or raw
with ``--json``); the exit status is 0 on success, 1 with the error on stderr.
"""

import argparse
import dataclasses
import errno
import json
import os
import select
import subprocess
import sys
import time

from . import __version__, mountinfo
from .backup.output import DefaultsHelp, Output, arg_type
from .client import (
    batched_lines,
    command,
    find_mount,
    mount_holders,
    quote,
    read_cbt,
    read_status,
    send,
    snapfs_mounts,
    source_released,
)
from .commands import COMMANDS, NAME, RATE, Command, format_line, parse_timeout
from .errors import SnapfsError
from .params import SECTOR, Params, default_state_dir, human, parse_size, size_text

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
    for name, mg in status.get("migrations", {}).items():
        print(f"\nmigration of {name} to {mg['target']}: {mg['state']}, copied {human(mg['copied'])} "
              f"of {human(mg['total'])}" + (f", {mg['errno']}: {mg['error']}" if "errno" in mg else ""))
    for name, j in status.get("cdp", {}).items():
        print(f"\ncdp {name}  {j['state']}  {j['storage']}: used {human(j['used'])} of {human(j['limit'])}, "
              f"{j['writes']} writes, oldest {j['oldest']:.6f}, marks {' '.join(j['marks']) or '-'}")
    for sid, s in status["snapshots"].items():
        print(f"\nsnapshot {sid}  {s['state']}  storage {s['storage']}: "
              f"used {human(s['used'])} of {human(s['size'])}, limit {human(s['limit'])}")
        for name, a in s["devices"].items():
            err = a.get("error_code", 0)
            print(f"  {name:14} {a.get('state', '-'):10} chunk {human(a['chunk_size'])}"
                  f"  copied {a.get('chunks_copied', 0)}" + (f"  error {err}" if err else ""))


# ----- commands ----------------------------------------------------------------------

def cmd_mount(args) -> int:
    from . import mount

    params = Params(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Params)}).validate()
    config = mount.MountConfig(args.mountpoint, args.sources, params,
                               args.state_dir or default_state_dir(), args.allow_other,
                               args.read_ahead_kb, args.image_group)
    if args.daemon:
        return mount.run_daemon(config, args.log_level, args.log_file)
    mount.setup_logging(args.log_level, args.log_file)
    return mount.run(config)


def cmd_umount(args) -> int:
    """Refuse, before touching anything, while another mount namespace holds the mount
    (``--wait`` for them to go; ``--force`` goes on); unmount here (refused while files
    are open, unless ``--force``: then the daemon is told ``stop force``); then wait
    until the daemon has saved the CBT and let go of its sources (their locks are
    free), which holds across pid namespaces."""
    mountpoint = os.path.realpath(args.mountpoint)
    if mountpoint not in snapfs_mounts():
        raise SnapfsError(errno.EINVAL, f"{mountpoint} is not a snapfs mount")
    status = read_status(mountpoint)
    sources = [(d["path"], d["kind"]) for d in status["devices"].values()]
    here = mountinfo.at(mountpoint)
    holders = wait_unheld(here, args.wait)
    if holders and not args.force:
        raise SnapfsError(errno.EBUSY, f"{mountpoint} is also mounted in other mount namespaces that "
                          f"an unmount here would not reach: {'; '.join(holders)}. Nothing was changed; "
                          "unmount it there first, or --wait SECONDS for them, or --force to unmount "
                          "here anyway (the daemon keeps serving them)")
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0 and not args.force:
        raise SnapfsError(errno.EBUSY, f"{mountpoint} is busy (files open or a process inside it); "
                          f"see 'fuser -vm {mountpoint}'. Nothing was changed; --force stops the daemon "
                          "anyway (users of open device and image files get I/O errors)")
    if result.returncode != 0:
        command(mountpoint, "stop force")
    elif holders:
        print(f"snapfs: unmounted here; the daemon keeps serving {'; '.join(holders)}", file=sys.stderr)
        return 0
    held = wait_released(sources, args.timeout)
    if held:
        holders = mount_holders(here.dev)
        where = (f"held by {'; '.join(holders)}" if holders else
                 "not one this process can see: a container's bind?")
        raise SnapfsError(errno.EBUSY, f"{mountpoint} is unmounted here, but its daemon still holds "
                          f"{held} after {args.timeout:g} s: the mount lives on in another mount "
                          f"namespace ({where}), or the daemon is stuck; its CBT is saved when it "
                          "stops (or use 'snapfs umount' where it is still mounted)")
    return 0


def wait_unheld(here: mountinfo.Mount, seconds: float) -> list[str]:
    """Other mount namespaces holding the mount ``here`` (client.mount_holders), after
    waiting up to ``seconds`` for them to let go."""
    deadline = time.monotonic() + seconds
    while True:
        holders = mount_holders(here.dev, peers=here.tags)
        if not holders or time.monotonic() >= deadline:
            return holders
        time.sleep(0.1)


def wait_released(sources: list[tuple[str, str]], timeout: float) -> str | None:
    """Wait until no source is held by a daemon; the first one still held, or None."""
    deadline = time.monotonic() + timeout
    for path, kind in sources:
        while not source_released(path, kind):
            if time.monotonic() > deadline:
                return path
            time.sleep(0.05)
    return None


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
    deadline = parse_timeout(args.timeout_ms)
    mount, snap_id = find_mount(args.mount), args.id
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


def cmd_control(args) -> int:
    """Any control command: the checked arguments are sent as one line."""
    spec = COMMANDS[args.command]
    words = []
    for arg in spec.args:
        value = getattr(args, arg.dest)
        if arg.option:
            words += [arg.option] if value else []
        elif arg.many:
            words += value or []
        elif value is not None:
            words.append(value)
    reply = command(find_mount(args.mount), format_line(spec.name, *words))
    print_reply(reply, args.json)
    return 0


def cmd_markdirtyblock(args) -> int:
    """markdirtyblock NAME SECTOR:COUNT... or --file PATH."""
    if (args.file is None) == (args.name is None or not args.ranges):
        raise SnapfsError(errno.EINVAL, "markdirtyblock takes either --file PATH or NAME SECTOR:COUNT...")
    return cmd_markdirty_file(args) if args.file else cmd_control(args)


MIGRATE_POLL = 0.25     # seconds between migrate_info calls


def cmd_migrate(args) -> int:
    """``snapfs migrate NAME TARGET``: migrate_start, progress until ready (a bar on a
    terminal, plain lines otherwise), then migrate_complete unless --no-complete.
    Exits non-zero when the migration fails; Ctrl-C cancels it."""
    mount, name, target = find_mount(args.mount), args.name, os.path.abspath(args.target)
    out = Output(args.json)
    started = command(mount, format_line("migrate_start", name, target, args.rate_limit))
    progress = out.progress(started["total"], f"{name} -> {target}")
    try:
        info = _migrate_until_ready(mount, name, progress)
    except KeyboardInterrupt:
        send(mount, format_line("migrate_cancel", name))
        out.warn(f"migration of {name} cancelled; it stays on its source")
        raise
    finally:
        progress.close()
    if not args.no_complete:
        command(mount, format_line("migrate_complete", name))
        info = command(mount, format_line("migrate_info", name))
    info.pop("ok", None)
    if args.json:
        print(json.dumps(info))
    else:
        later = "; migrate_complete switches to it" if args.no_complete else ""
        held = f", writes held {info['write_block_ms']} ms" if info.get("write_block_ms") is not None else ""
        out.say(f"{name}: {info['state']} ({human(info['total'])} copied to {info['target']} in "
                f"{info['ready_seconds']} s{held}){later}")
    return 0


def _migrate_until_ready(mount: str, name: str, progress) -> dict:
    """Poll migrate_info until ``ready``; SnapfsError when it fails or is cancelled."""
    while True:
        info = command(mount, format_line("migrate_info", name))
        progress.update(info["copied"] - progress.done)
        if info["state"] == "ready":
            return info
        if info["state"] != "running":
            code = getattr(errno, info.get("errno", ""), errno.ECANCELED)
            why = f"migration of {name} {info['state']}: {info.get('error', '')}"
            raise SnapfsError(code, why.rstrip(": "))
        time.sleep(MIGRATE_POLL)


def cmd_watch(args) -> int:
    """Follow snapshots/ID/events until the snapshot is destroyed: non-blocking reads
    and poll(), so Ctrl-C or any signal ends it at once (a blocking read would hold
    the process in the kernel until the daemon answers). ``--audit``: follow the
    audit log instead (``watch_audit``)."""
    if args.audit == bool(args.id):
        raise SnapfsError(errno.EINVAL, "watch takes either a snapshot ID or --audit")
    mount = find_mount(args.mount)
    if args.audit:
        return watch_audit(mount, args.json)
    path = os.path.join(mount, "snapshots", args.id, "events")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"snapshot {args.id}") from None
    buf = b""
    try:
        for chunk in follow(fd):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                print(format_event(json.loads(line)) if not args.json else line.decode(), flush=True)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, path) from None
    finally:
        os.close(fd)
    print(f"snapshot {args.id} destroyed", flush=True)
    return 0


AUDIT_POLL = 0.25     # seconds between looks at MOUNT/audit once at its end


def watch_audit(mount: str, as_json: bool) -> int:
    """Follow MOUNT/audit as ``tail -F`` does, from its start, across rotations (a
    rotated file keeps its bytes under a new name and the new file has a new inode:
    read the old one to its end, then open the new one), until the mount goes away."""
    path = os.path.join(mount, "audit")
    fd, inode = -1, None              # the inode as of the stat before the open: a
    try:                              # rotated file's own stat fails (ENOENT)
        while True:
            try:
                st = os.stat(path)
            except OSError:
                return 0                  # the mount is gone
            if st.st_ino == inode:
                time.sleep(AUDIT_POLL)
            if fd >= 0:
                print_lines(fd, as_json)  # to its end; a rotated file grows no more
            if st.st_ino != inode:
                if fd >= 0:
                    os.close(fd)
                fd, inode = os.open(path, os.O_RDONLY | os.O_CLOEXEC), st.st_ino
                print_lines(fd, as_json)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, path) from None
    finally:
        if fd >= 0:
            os.close(fd)


def print_lines(fd: int, as_json: bool) -> None:
    """The whole lines of an audit file from its offset to its end (a partial line
    stays unread: the file offset is moved back to its start)."""
    while chunk := os.read(fd, 65536):
        whole = chunk[: chunk.rfind(b"\n") + 1]
        if len(whole) < len(chunk):
            os.lseek(fd, len(whole) - len(chunk), os.SEEK_CUR)
        for line in whole.splitlines():
            print(line.decode() if as_json else format_audit(json.loads(line)), flush=True)
        if not whole:
            return


def format_audit(line: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(line["time"] / 1e9))
    return (f"{when} {line['device']} sectors {line['sector']}:{line['count']} "
            f"pid {line['pid']} uid {line['uid']}")


def follow(fd: int):
    """The chunks of a non-blocking events file until EOF; poll() waits between them."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            poller.poll(1000)
        else:
            if not chunk:
                return
            yield chunk


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


class OptionWord(argparse.Action):
    """An option word given as a positional (``ID nofreeze``): True when it is there,
    and it keeps a True set by its flag (``--nofreeze``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, bool(getattr(namespace, self.dest, False) or values))


def add_command_arguments(parser: argparse.ArgumentParser, spec: Command, optional: bool = False) -> None:
    """The arguments of a control command (commands.COMMANDS) as argparse sees them:
    an option word is accepted as the line has it (``ID nofreeze``) or as a flag
    (``--nofreeze``); paths are made absolute here. ``optional``: every typed argument
    may be left out (the command has another form)."""
    for arg in spec.args:
        if arg.option:
            parser.add_argument(arg.dest, nargs="?", choices=[arg.option], metavar=arg.option,
                                action=OptionWord, help=arg.help)
            parser.add_argument("--" + arg.option, dest=arg.dest, action="store_true", help="the same")
            continue
        loose = optional or arg.optional
        nargs = ("*" if loose else "+") if arg.many else ("?" if loose else None)
        kind = os.path.abspath if arg.kind.path else arg_type(arg.kind.check, keep_text=True)
        parser.add_argument(arg.dest, metavar=arg.kind.metavar, nargs=nargs, type=kind, help=arg.help or None)


def add_control_parsers(sub, common: argparse.ArgumentParser) -> None:
    """One subcommand per control command but ``status`` (its own, a table)."""
    for name, spec in COMMANDS.items():
        if name == "status":
            continue
        local = LOCAL.get(name)
        c = sub.add_parser(name, parents=[common], help=f"{spec.usage}: {spec.help}" if spec.usage
                           else spec.help, description=spec.help, formatter_class=DefaultsHelp)
        add_command_arguments(c, spec, optional=bool(local and local[1]))
        if local and local[1]:
            c.add_argument(*local[1][0], **local[1][1])
        c.set_defaults(func=local[0] if local else cmd_control, command=name)


# control commands the CLI runs its own way: handler, and an extra option (whose
# presence makes the command's own arguments optional)
LOCAL = {
    "snapshot_waitevent": (cmd_waitevent, None),
    "markdirtyblock": (cmd_markdirtyblock, (("--file",), {
        "help": "mark the blocks of this file (in a filesystem stacked on a snapfs device through "
                "a loop device)"})),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapfs", description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=DefaultsHelp)
    p.add_argument("--version", action="version", version=f"snapfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p.add_argument("-m", "--mount", help="mount point (default: the only snapfs mount)")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    # the same options after the command; SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-m", "--mount", default=argparse.SUPPRESS,
                        help="mount point (default: the only snapfs mount)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of text")

    m = sub.add_parser("mount", help="mount snapfs over devices (foreground unless --daemon)",
                       formatter_class=DefaultsHelp)
    m.add_argument("mountpoint")
    m.add_argument("sources", nargs="+", metavar="[NAME=]SOURCE")
    for f in dataclasses.fields(Params):
        size = f.name.endswith(("_minimum", "_size"))
        m.add_argument("--" + f.name.replace("_", "-"), type=arg_type(parse_size) if size else int,
                       default=f.default,
                       help=f"{PARAM_HELP[f.name]} (default: {size_text(f.default) if size else f.default})")
    m.add_argument("--state-dir", help=f"where CBT is kept (default {default_state_dir()})")
    m.add_argument("--read-ahead-kb", type=int, default=4096,
                   help="kernel read-ahead on the mount's files (default 4096)")
    m.add_argument("--image-group", type=_group, metavar="GROUP",
                   help="snapshot images and CBT files belong to this group (name or number) "
                   "and are readable by it: grants a backup uid without changing the sources")
    m.add_argument("-o", dest="fuse_options", action="append", default=[],
                   help="FUSE option; only allow_other is accepted")
    m.add_argument("--daemon", action="store_true", help="detach once the mount is ready")
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="what to log")
    m.add_argument("--log-file", help="log here (default: stderr, or STATE_DIR/snapfs.log with --daemon)")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="clean stop: persists CBT; refuses while files are open or "
                       "another mount namespace holds the mount", formatter_class=DefaultsHelp)
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the daemon to save CBT and let go (default: %(default)s)")
    u.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for other mount namespaces holding the mount to let go "
                   "(default: %(default)s, refuse at once)")
    u.add_argument("--force", action="store_true",
                   help="unmount here even if other mount namespaces hold the mount (the daemon keeps "
                   "serving them); with files open here, stop the daemon anyway: DATA-LOSING for "
                   "their users, who get I/O errors")
    u.set_defaults(func=cmd_umount)

    s = sub.add_parser("status", parents=[common], help="devices, snapshots, storage use",
                       formatter_class=DefaultsHelp)
    s.set_defaults(func=cmd_status)

    w = sub.add_parser("watch", parents=[common], help="follow a snapshot's events until destroy, "
                       "or with --audit the audit log of protected ranges", formatter_class=DefaultsHelp)
    w.add_argument("id", nargs="?", help="snapshot id")
    w.add_argument("--audit", action="store_true", help="follow MOUNT/audit (from its start) instead")
    w.set_defaults(func=cmd_watch)

    cc = sub.add_parser("cbt-changes", parents=[common], formatter_class=DefaultsHelp,
                        help="changed byte ranges since a backup's generation_id and changes_number")
    cc.add_argument("name")
    cc.add_argument("generation_id")
    cc.add_argument("changes_number", type=int)
    cc.set_defaults(func=cmd_cbt_changes)

    mg = sub.add_parser("migrate", parents=[common], formatter_class=DefaultsHelp,
                        help="move a device to a new file or block device while it is in use")
    mg.add_argument("name", type=arg_type(NAME.check))
    mg.add_argument("target", help="a new file (created sparse) or a block device at least as large")
    mg.add_argument("--no-complete", action="store_true",
                    help="stop at ready (every write mirrored); migrate_complete switches later")
    mg.add_argument("--rate-limit", type=arg_type(RATE.check, keep_text=True), default="0", metavar="MiB/s",
                    help="at most this many MiB/s of copying (0: no limit)")
    mg.set_defaults(func=cmd_migrate)

    from .backup.cli import add_parser as add_backup_parser
    add_backup_parser(sub, common)

    add_control_parsers(sub, common)
    return p


PARAM_HELP = {
    "chunk_minimum": "smallest copy-before-write chunk (a power of two, 4K-64M)",
    "chunk_maximum_count_shift": "at most 2^N chunks per device: larger devices get larger chunks",
    "tracking_block_minimum": "smallest CBT tracking block (a power of two, 4K-64M)",
    "tracking_block_maximum_count": "at most this many CBT blocks per device: larger devices get "
                                    "larger blocks",
    "diff_storage_minimum": "difference storage grows in steps of this size",
    "audit_file_size": "MOUNT/audit is rotated to MOUNT/audit.1 when it would grow past this size",
}


def _group(text: str) -> int:
    """A group name or number -> its gid."""
    if text.isdigit():
        return int(text)
    import grp
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


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
