"""``snapfs backup VERB``: the argparse tree of the backup verbs and their output.

Heavy modules (zstandard, blake3, pyfuse3) are imported inside the verbs, so
``snapfs`` without ``backup`` stays cheap. Exit codes: output.py.
"""

import argparse
import errno
import functools
import json
import os
import signal
import sys
import time

from ..errors import SnapfsError
from ..params import human, parse_size
from . import output
from .output import DefaultsHelp, Output, arg_type, table
from .pace import PRIORITIES

SIZE = arg_type(parse_size)


def _exit_codes(func):
    """Damaged (a chunk, index or manifest that fails its checks) exits 3; an OSError
    (a full disk, a vanished file) becomes a one-line SnapfsError (exit 1)."""
    @functools.wraps(func)
    def wrapper(args) -> int:
        from .repo import Damaged
        try:
            return func(args)
        except Damaged as exc:
            print(f"snapfs backup: DAMAGED: {exc.message}", file=sys.stderr)
            return output.DAMAGED
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise SnapfsError(exc.errno or errno.EIO, f"{exc.strerror or exc}{where}") from None
    return wrapper


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def emit(args, data, text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


# ----- verbs -------------------------------------------------------------------------

@_exit_codes
def cmd_init(args) -> int:
    from .repo import Repo
    repo = Repo.init(args.repo, args.chunk_size, args.zstd_level)
    emit(args, {"repo": repo.path, "config": repo.config},
         f"initialized backup repository {repo.path} (chunk size {human(repo.chunk_size)}, zstd)")
    return output.OK


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@_exit_codes
def cmd_create(args) -> int:
    from ..client import find_mount
    from .create import CreateOptions, create
    from .repo import Repo
    signal.signal(signal.SIGTERM, _raise_interrupt)      # so the snapshot is destroyed
    repo, mount = Repo(args.repo), os.path.abspath(find_mount(args.mount))
    opts = CreateOptions(storage=args.storage, storage_limit=args.storage_limit, freeze=not args.nofreeze,
                         full=args.full, audit=args.cbt_audit, workers=args.workers,
                         io_priority=args.io_priority, rate_limit=args.rate_limit, at=args.at)
    out = Output(args.json)
    manifest = create(repo, args.names, mount, opts, out)
    devices = manifest["devices"]
    took = manifest["stats"]["duration"]
    lines = [f"point {manifest['point']} ({manifest['consistency']}) in {took:.1f} s"]
    for name, d in devices.items():
        lines.append(f"  {name}: {d['mode']}, read {human(d['bytes_read'])} of {human(d['size'])} "
                     f"(and {human(d['repo_bytes_read'])} of the repository: {d['chunks_rebuilt']} "
                     f"chunks rebuilt), new {human(d['bytes_new'])} ({d['chunks_new']} chunks)"
                     + (f" -- {d['reason']}" if d["reason"] else ""))
    emit(args, manifest, "\n".join(lines))
    mismatched = any(d["audit"] and d["audit"]["mismatches"] for d in devices.values())
    return output.AUDIT_MISMATCH if mismatched else output.OK


def point_row(m: dict) -> list:
    devices = m["devices"].values()
    modes = {d["mode"] for d in devices}
    return [m["point"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["unix_time"])),
            ",".join(sorted(m["devices"])), human(sum(d["size"] for d in devices)),
            human(m["stats"]["bytes_read"]), human(m["stats"].get("repo_bytes_read", 0)),
            human(m["stats"]["bytes_new"]),
            f"{m['stats']['duration']:.1f}s", "/".join(sorted(modes)), m["consistency"]]


@_exit_codes
def cmd_list(args) -> int:
    from .repo import Repo
    points = Repo(args.repo).points()
    if args.json:
        emit(args, [{k: m[k] for k in ("point", "time", "consistency", "stats")}
                    | {"devices": {n: {k: d.get(k, 0) for k in ("size", "mode", "reason", "bytes_read",
                                                                "repo_bytes_read", "bytes_new")}
                                   for n, d in m["devices"].items()}} for m in points], "")
        return output.OK
    print(table(["POINT", "TIME", "DEVICES", "SIZE", "READ", "REPO READ", "NEW", "TOOK", "MODE",
                 "CONSISTENCY"], [point_row(m) for m in points], right={3, 4, 5, 6, 7}))
    return output.OK


@_exit_codes
def cmd_info(args) -> int:
    from .repo import Repo
    m = Repo(args.repo).resolve(args.point)
    if args.json:
        emit(args, m, "")
        return output.OK
    print(f"point {m['point']}  {m['time']}  {m['consistency']}"
          + (f" (froze {', '.join(m['frozen'])})" if m["frozen"] else "")
          + f"  snapfs {m['tool_version']}, chunk {human(m['chunk_size'])}, "
          f"took {m['stats']['duration']:.1f} s")
    rows = [[n, human(d["size"]), d["mode"], d["parent"] or "-", human(d["bytes_read"]),
             human(d.get("repo_bytes_read", 0)), d.get("chunks_rebuilt", 0), human(d["bytes_new"]),
             d["chunks"], d["zero_chunks"], f"{d['cbt']['generation_id'][:8]}/{d['cbt']['changes_number']}",
             d["reason"] or ""] for n, d in sorted(m["devices"].items())]
    print(table(["DEVICE", "SIZE", "MODE", "PARENT", "READ", "REPO READ", "REBUILT", "NEW", "CHUNKS",
                 "ZERO", "CBT", "WHY FULL"], rows, right={1, 4, 5, 6, 7, 8, 9}))
    for n, d in sorted(m["devices"].items()):
        if d.get("seconds"):
            print(f"{n}: worker seconds: " + ", ".join(f"{k} {d['seconds'].get(k, 0):.1f}"
                                                      for k in ("image", "repository", "hash", "store")))
    return output.OK


@_exit_codes
def cmd_restore(args) -> int:
    from .repo import Repo
    from .restore import restore
    result = restore(Repo(args.repo), args.point, args.name, os.path.abspath(args.target), Output(args.json),
                     delta=args.delta, force=args.force, workers=args.workers)
    emit(args, result, f"restored {result['device']} of point {result['point']} to {result['target']}: "
         f"wrote {human(result['bytes_written'])}, skipped {human(result['bytes_unchanged'])} "
         "(zeros left as holes, or already equal with --delta)")
    return output.OK


@_exit_codes
def cmd_verify(args) -> int:
    from .repo import Repo
    from .verify import verify
    report = verify(Repo(args.repo), Output(args.json), args.point, workers=args.workers)
    lines = [f"checked {report['chunks']} chunks of {report['points']} points"]
    for d in report["damaged"]:
        used = "; ".join(f"point {u['point']} device {u['device']} at offset(s) "
                         + ",".join(str(o) for o in u["offsets"][:4]) for u in d["used_by"])
        lines.append(f"DAMAGED chunk {d['chunk'][:16]}: {d['error']} -- breaks {used}")
    for b in report["broken_indexes"]:
        lines.append(f"DAMAGED index of point {b['point']} device {b['device']}: {b['error']}")
    lines.append("OK" if report["ok"] else
                 "BROKEN: " + ", ".join(f"{b['point']}/{b['device']}" for b in report["broken"]))
    emit(args, report, "\n".join(lines))
    return output.OK if report["ok"] else output.DAMAGED


@_exit_codes
def cmd_prune(args) -> int:
    from .prune import prune
    from .repo import Repo
    keep = {"last": args.keep_last, "daily": args.keep_daily, "weekly": args.keep_weekly,
            "monthly": args.keep_monthly}
    result = prune(Repo(args.repo), keep, Output(args.json), dry_run=args.dry_run)
    text = f"kept {plural(len(result['kept']), 'point')}, removed {len(result['removed'])}"
    if "gc" in result:
        text += (f"; gc removed {result['gc']['chunks_removed']} chunks "
                 f"({human(result['gc']['bytes_freed'])})")
    emit(args, result, text)
    return output.OK


@_exit_codes
def cmd_gc(args) -> int:
    from .prune import gc
    from .repo import Repo
    result = gc(Repo(args.repo))
    emit(args, result, f"removed {result['chunks_removed']} unreferenced chunks "
         f"({human(result['bytes_freed'])}); {result['chunks_kept']} chunks in use "
         f"({human(result['bytes_kept'])})")
    return output.OK


@_exit_codes
def cmd_mount(args) -> int:
    import logging

    from . import mountfs
    from .repo import Repo
    repo, mountpoint = Repo(args.repo), os.path.abspath(args.mountpoint)

    def serve(ready=None) -> int:
        return mountfs.run(repo, mountpoint, args.cache_chunks, allow_other="allow_other" in args.options,
                           ready=ready)
    if args.daemon:
        status = mountfs.run_daemon(serve, os.path.abspath(args.log_file))
        if status == output.OK:
            emit(args, {"repo": repo.path, "mountpoint": mountpoint, "log_file": args.log_file},
                 f"mounted {repo.path} read-only at {mountpoint} (fusermount3 -u {mountpoint} ends it)")
        return status
    logging.basicConfig(level=logging.INFO, format="snapfs backup mount: %(message)s")
    return serve()


# ----- the parser --------------------------------------------------------------------

def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """``snapfs backup VERB ...`` under the main parser's subcommands."""
    b = sub.add_parser("backup", help="back up snapfs devices into a repository; list, restore, "
                       "verify, prune, mount", formatter_class=DefaultsHelp)
    verbs = b.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func, help_text: str) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, parents=[common], help=help_text, description=help_text,
                             formatter_class=DefaultsHelp)
        v.add_argument("repo", metavar="REPO")
        v.set_defaults(func=func)
        return v

    v = verb("init", cmd_init, "create an empty repository (a plain directory tree)")
    v.add_argument("--chunk-size", type=SIZE, default=4 << 20,
                   help="chunk size, a power of two from 64K to 64M (default 4M)")
    v.add_argument("--zstd-level", type=int, default=3, help="zstd level (default 3)")

    v = verb("create", cmd_create, "back up devices of a snapfs mount at one point in time")
    v.add_argument("names", nargs="+", metavar="NAME")
    v.add_argument("--storage", default="/var/tmp", help="directory (or file) for the snapshot's "
                   "difference storage, not inside the mount (default /var/tmp)")
    v.add_argument("--storage-limit", type=SIZE, help="its limit (default: the devices' total size "
                   "plus 64M, the most copy-before-write can need)")
    v.add_argument("--nofreeze", action="store_true", help="do not freeze stacked filesystems")
    v.add_argument("--full", action="store_true", help="read every chunk even if CBT could vouch")
    v.add_argument("--cbt-audit", type=int, nargs="?", const=16, default=0, metavar="N",
                   help="check N (default 16) chunks CBT calls unchanged against the parent point")
    v.add_argument("--workers", type=int, default=4, help="reader/hasher threads (default 4)")
    v.add_argument("--io-priority", choices=sorted(PRIORITIES), default="idle",
                   help="I/O class of the whole run; snapfs gives the image reads it causes the "
                        "same class, and idle ones their turn only as if the devices were always "
                        "busy (default idle)")
    v.add_argument("--rate-limit", type=float, default=0.0, metavar="MIB_S",
                   help="read the images at most this many MiB/s (default 0: no limit)")
    v.add_argument("--at", metavar="WHEN", help="the devices as they were at WHEN (UNIX seconds, "
                   "ISO-8601 UTC such as 2026-12-03T07:00:00.25Z, or a cdp_mark label), read from "
                   "their CDP journals (cdp_start): no snapshot is taken")

    verb("list", cmd_list, "list the points")
    v = verb("info", cmd_info, "show one point: devices, sizes, bytes read and new, why full")
    v.add_argument("point", metavar="POINT", help="a point, a unique prefix of one, or 'latest'")

    v = verb("restore", cmd_restore, "restore one device of a point to a file or block device")
    v.add_argument("point", metavar="POINT")
    v.add_argument("name", metavar="NAME")
    v.add_argument("target", metavar="TARGET")
    v.add_argument("--delta", action="store_true", help="write only chunks that differ from TARGET")
    v.add_argument("--force", action="store_true", help="overwrite an existing file")
    v.add_argument("--workers", type=int, default=4, help="reader/writer threads")

    v = verb("verify", cmd_verify, "re-hash every chunk of a point (or all points)")
    v.add_argument("point", metavar="POINT", nargs="?")
    v.add_argument("--workers", type=int, default=4, help="hasher threads")

    v = verb("prune", cmd_prune, "delete points no --keep-* rule keeps, then gc")
    for rule, what in (("last", "newest points"), ("daily", "days (the newest point of each)"),
                       ("weekly", "ISO weeks (the newest point of each)"),
                       ("monthly", "months (the newest point of each)")):
        v.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N", help=f"keep the N {what}")
    v.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    verb("gc", cmd_gc, "remove chunks that no point references")

    v = verb("mount", cmd_mount, "mount the repository read-only: MNT/POINT/NAME (foreground unless "
             "--daemon; fusermount3 -u MNT ends it)")
    v.add_argument("--daemon", action="store_true", help="detach once the mount is ready")
    v.add_argument("--log-file", default="/var/tmp/snapfs-backup-mount.log",
                   help="log of --daemon (default /var/tmp/snapfs-backup-mount.log)")
    v.add_argument("mountpoint", metavar="MNT")
    v.add_argument("--cache-chunks", type=int, default=16, help="decompressed chunks kept (default 16)")
    v.add_argument("-o", dest="options", action="append", default=[], help="allow_other")
