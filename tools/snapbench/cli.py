"""Benchmark snapfs side by side with qemu-storage-daemon image fleecing and the raw file.

    .venv/bin/python tools/bench [--quick] [--rounds N] [--size SIZE] [--workdir DIR] [--json FILE]

Four tables: page-cached files (below), a real device (``realdev``), backup under
load (``underload``), ``snapfs backup`` (``backup``).

Contenders (DESIGN.md section 8), each on its own copy of one random source file:
    snapfs  a snapfs mount (--chunk-minimum 64K, difference storage in the scratch dir);
    qemu    qemu-storage-daemon: a raw node over the file, exported over FUSE; a snapshot
            slides a copy-before-write filter (sparse raw target, 64 KiB clusters) under
            it with blockdev-add + blockdev-reopen and exports a snapshot-access node
            over FUSE (docs/peers recipe B);
    raw     the source file itself, no FUSE: the physical reference.

Every workload is one fio job (--direct=1 --ioengine=psync, one job) run on snapfs,
qemu and raw in turn (A B R A B R ...), for --rounds rounds; the source is synced and
read into the page cache before each job. The table shows medians. Take latency and
memory are measured once per contender (see ``run_take_test``, ``run_memory_test``).

Real device (second table, ``realdev``; --no-real skips it): the three contenders take
turns on ONE uncached loop device (losetup --direct-io=on over a --real-size file of
random data; QEMU as a host_device node), page cache dropped before every job;
--real-rounds rounds of --real-runtime s jobs: 4 KiB O_DIRECT random reads with 1 and
16 jobs, a buffered 1 MiB sequential read and a ``cp`` of the device, a database's
commit (4 KiB O_DIRECT random writes, each followed by fsync, 1 and 4 jobs), a
buffered read of a snapshot image, 8-job 4 KiB random writes after take, and (snapfs
only) 16-job random reads with the source in the page cache; --real-only runs only it.

Interposition and backup under load (``interpose`` and ``underload``; --no-load skips
them, and they are skipped when PostgreSQL 15 is not installed): pgbench on ext4 over
the raw uncached loop device, a snapfs device on it and QEMU's export of it, no backup
(--interpose-runtime s each); then pgbench on ext4 over a snapfs device over a sparse
and a fully written uncached source, per second while ``cp`` copies a snapshot image,
while ``snapfs backup create`` runs and while ``cp`` copies as much plain data from
the same disk (--load-source picks one source); --load-rounds rounds; --load-only runs
only these.

CDP (fifth table, ``snapbench/cdp.py``; --no-cdp skips it, --cdp-only runs only it):
pgbench with a CDP journal off and on, journal bytes per byte written, a history of
--cdp-writes 4 KiB writes (RSS growth), ``cdp_view`` open time and sequential reads
of views against a snapshot image.

Backup (fourth table, ``snapbench/backup.py``; --no-backup skips it, --backup-only runs
only it): ``snapfs backup`` against ``borg create`` and ``dd`` on one uncached
--backup-size device of mixed data: full, 1% incremental, restore, verify, repository size.

Protected ranges (``snapbench/protect.py``; --no-protect skips it, --protect-only runs
only it): page-cached 4 KiB random writes on a device without rules, snapfs of this
checkout against --protect-baseline (default main) and with a rule elsewhere on the
device, --protect-rounds interleaved rounds of --runtime s jobs.

Migration under load (``snapbench/migration.py``; --no-migrate skips it, --migrate-only
runs only it, skipped without PostgreSQL 15): pgbench on ext4 over a --migrate-size
device on an uncached loop device, served by snapfs and by qemu-storage-daemon in
interleaved turns; per --migrate-rounds round the time and tps of a plain ``cp`` of
the device and of ``snapfs migrate`` / ``blockdev-mirror`` (write-blocking) to a new file.

Exit status: 0 table complete; 3 table printed but some measurements failed; 1 the
run could not start; 130 interrupted. Everything mounted or started is stopped and
the scratch directory removed on every path, Ctrl-C and SIGTERM included.
"""

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from snapfs.params import parse_size

from .backup import run_backup_bench
from .cdp import run_cdp_bench
from .common import CLUSTER, CONTENDERS, BenchError, Config, MiB, log
from .contenders import Contender, Raw, Snapfs
from .interpose import INTERPOSE_ROWS, run_interpose
from .memory import run_memory_test
from .migration import MIG_ROWS, run_migration_bench
from .pg import pg_available
from .protect import run_protect_bench
from .qemu import Qemu
from .realdev import run_real_device
from .report import REAL_ROWS, ROWS, Results, report
from .scratch import make_sources, scratch_dir
from .take import run_take_test
from .underload import LOAD_ROWS, run_under_load
from .workloads import run_round, start_all

EXIT_FAILURES, EXIT_ERROR, EXIT_INTERRUPTED = 3, 1, 130


# ----- configuration ----------------------------------------------------------------

QUICK = {"size": 64 * MiB, "rounds": 1, "runtime": 1, "takes": 3, "hold": 0.1, "scatter": 64 * MiB,
         "real_size": 256 * MiB, "real_rounds": 1, "real_runtime": 2, "load": False,
         "backup_size": 64 * MiB, "interpose_runtime": 5, "protect_rounds": 1,
         "protect_size": 64 * MiB, "migrate": False, "cdp_size": 16 * MiB, "cdp_writes": 4000}
NUMBERS = ("rounds", "size", "runtime", "takes", "scatter", "real_size", "real_rounds", "real_runtime",
           "load_size", "load_rounds", "backup_size", "interpose_runtime", "protect_rounds",
           "protect_baseline", "migrate_size", "migrate_rounds", "cdp_size", "cdp_writes")


def _size_arg(text: str) -> int:
    """argparse type: a size with K/M/G/T."""
    try:
        return parse_size(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    """The options."""
    p = argparse.ArgumentParser(prog="tools/bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="64 MiB devices, 1 round, 1 s jobs, 3 takes; real device 256 MiB, 2 s jobs "
                        "(smoke test, < 90 s)")
    p.add_argument("--rounds", type=int, help="rounds of every workload (default 3)")
    p.add_argument("--size", type=_size_arg, help="device size (default 1G)")
    p.add_argument("--runtime", type=int, help="seconds per random-I/O job (default 10)")
    p.add_argument("--takes", type=int, help="takes in the take-latency test (default 20)")
    p.add_argument("--scatter", type=_size_arg, help="scattered writes in the memory test (1G)")
    p.add_argument("--workdir", help="scratch parent directory (default /var/tmp)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")
    p.add_argument("--no-qemu", action="store_true", help="skip qemu-storage-daemon")
    p.add_argument("--real-size", type=_size_arg, help="loop device of the real-device table (2G)")
    p.add_argument("--real-rounds", type=int, help="rounds of the real-device table (default 3)")
    p.add_argument("--real-runtime", type=int, help="seconds per real-device job (default 8)")
    p.add_argument("--no-real", action="store_true", help="skip the real-device table")
    p.add_argument("--no-load", action="store_true", help="skip the backup-under-load table")
    p.add_argument("--load", action="store_true", help="with --quick: run the backup-under-load "
                   "table too (--quick skips it)")
    p.add_argument("--load-size", type=_size_arg, help="snapfs device under pgbench (default 2G)")
    p.add_argument("--load-rounds", type=int, help="rounds of the backup-under-load table (default 3)")
    p.add_argument("--interpose-runtime", type=int,
                   help="seconds of pgbench per contender in the interposition table (default 30)")
    p.add_argument("--load-source", choices=("sparse", "full", "both"), default="both",
                   help="source of the backup-under-load table: a sparse disk image, a fully "
                        "written one, or both (default)")
    p.add_argument("--backup-size", type=_size_arg, help="device of the backup table (default 4G)")
    p.add_argument("--no-backup", action="store_true", help="skip the backup table")
    p.add_argument("--backup-only", action="store_true", help="run only the backup table")
    p.add_argument("--load-only", action="store_true", help="run only the backup-under-load table")
    p.add_argument("--real-only", action="store_true", help="run only the real-device table")
    p.add_argument("--no-protect", action="store_true", help="skip the protected-ranges table")
    p.add_argument("--protect-only", action="store_true", help="run only the protected-ranges table")
    p.add_argument("--protect-rounds", type=int, help="rounds of the protected-ranges table (default 6)")
    p.add_argument("--protect-baseline", metavar="REV",
                   help="git revision the protected-ranges table compares against (default main)")
    p.add_argument("--no-migrate", action="store_true", help="skip the migration-under-load table")
    p.add_argument("--migrate-only", action="store_true", help="run only the migration-under-load table")
    p.add_argument("--migrate-size", type=_size_arg, help="device migrated under pgbench (default 2G)")
    p.add_argument("--migrate-rounds", type=int, help="rounds of the migration table (default 3)")
    p.add_argument("--no-cdp", action="store_true", help="skip the CDP table")
    p.add_argument("--cdp-only", action="store_true", help="run only the CDP table (pgbench with the "
                   "journal off and on, a history of --cdp-writes writes: memory, view open and read)")
    p.add_argument("--cdp-size", type=_size_arg, help="device of the CDP history (default 256M)")
    p.add_argument("--cdp-writes", type=int, help="4 KiB writes in the CDP history (default 1000000; "
                   "0: no history rows)")
    return p


def parse_args(argv: list[str] | None) -> Config:
    """Command line -> Config (quick defaults first, explicit options win)."""
    p = parser()
    a = p.parse_args(argv)
    only = ("backup" if a.backup_only else "load" if a.load_only else "real" if a.real_only
            else "protect" if a.protect_only
            else "migrate" if a.migrate_only else "cdp" if a.cdp_only else None)
    cfg = Config(quick=a.quick, qemu=not a.no_qemu, real=not a.no_real, workdir=a.workdir, json=a.json,
                 load=not a.no_load or a.load_only, backup=not a.no_backup or a.backup_only, only=only,
                 protect=not a.no_protect or a.protect_only, cdp=not a.no_cdp or a.cdp_only)
    cfg.migrate = not a.no_migrate
    if a.quick:
        for key, value in QUICK.items():
            setattr(cfg, key, value)
    for key in NUMBERS:
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    if (a.load and a.quick) or a.load_only or (a.cdp_only and not a.quick and not a.no_load):
        cfg.load = True
    if a.migrate_only:
        cfg.migrate = True
    cfg.load_kinds = ("sparse", "full") if a.load_source == "both" else (a.load_source,)
    sizes_ok = all(n >= 16 * CLUSTER and n % MiB == 0
                   for n in (cfg.size, cfg.real_size, cfg.load_size, cfg.backup_size, cfg.migrate_size))
    counts = (cfg.rounds, cfg.takes, cfg.real_rounds, cfg.real_runtime, cfg.load_rounds, cfg.migrate_rounds)
    if min(counts) < 1 or not sizes_ok:
        p.error("need rounds, takes and runtimes >= 1 and sizes that are multiples of 1 MiB")
    return cfg


def check_tools(cfg: Config) -> None:
    """fio and fusermount3 are required; qemu-storage-daemon is skipped in --quick."""
    tools = ("fio", "fusermount3", *(("losetup", "blockdev") if cfg.real else ()))
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: apt-get install -y fio fuse3 util-linux")
    if cfg.qemu and cfg.only not in ("backup", "protect") and not shutil.which("qemu-storage-daemon"):
        if not cfg.quick:
            raise BenchError("qemu-storage-daemon missing: apt-get install -y qemu-system-common "
                             "qemu-utils (or pass --no-qemu)")
        log("qemu-storage-daemon not installed: skipping QEMU")
        cfg.qemu = False
    if (cfg.load or cfg.migrate) and not pg_available():
        log("PostgreSQL 15 (postgresql-15) not installed: skipping the tables under load")
        cfg.load = cfg.migrate = False


def _interrupt(signum, frame) -> None:
    """SIGTERM/SIGHUP handler: unwind like Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


# ----- the run -----------------------------------------------------------------------

def contender_names(cfg: Config) -> list[str]:
    """snapfs, qemu (unless skipped), raw."""
    return [n for n in CONTENDERS if n != "qemu" or cfg.qemu]


def make_contender(name: str, work: Path, source: Path, size: int, storage: int) -> Contender:
    """Factory for the three kinds."""
    if name == "snapfs":
        return Snapfs(work / name, source, size, storage)
    if name == "qemu":
        return Qemu(work / name, source, size)
    return Raw(work / name, source, size)


def start_contenders(cfg: Config, work: Path, stack: contextlib.ExitStack, res: Results) -> list[Contender]:
    """Create sources and start every contender (stop registered first); a contender
    that fails to start is left out and all its cells are marked failed."""
    names = contender_names(cfg)
    sources = make_sources(cfg, work, names)
    cs = [make_contender(name, work, sources[name], cfg.size, 4 * cfg.size) for name in names]
    return start_all(cs, stack, res, [row.key for row in ROWS if not row.key.startswith("mem_")])


def run_all(cfg: Config, work: Path, res: Results) -> None:
    """Page-cached rounds, take test, memory test, the real device, backup under load,
    then the backup section; every contender stopped at the end of its part."""
    if cfg.only is None:
        run_snapshot_sections(cfg, work, res)
    if cfg.only == "real":
        run_real(cfg, work, res)
    if cfg.load and cfg.only in (None, "load"):
        guarded(res, [row.key for row in INTERPOSE_ROWS], "snapfs", run_interpose, cfg, work, res)
        guarded(res, [row.key for row in LOAD_ROWS], "snapfs", run_under_load, cfg, work, res)
    if cfg.migrate and cfg.only in (None, "migrate"):
        guarded(res, [row.key for row in MIG_ROWS], "snapfs", run_migration_bench, cfg, work, res)
    if cfg.backup and cfg.only in (None, "backup"):
        text, rows = run_backup_bench(cfg, work)
        res.extra["backup"] = {"table": text, "rows": rows}
    if cfg.protect and cfg.only in (None, "protect"):
        try:
            res.extra["protect"] = run_protect_bench(cfg, work)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            res.fail("protect", "snapfs", exc)
    if cfg.cdp and cfg.only in (None, "cdp"):
        text, rows = run_cdp_bench(cfg, work)
        res.extra["cdp"] = {"table": text, "rows": rows}


def run_snapshot_sections(cfg: Config, work: Path, res: Results) -> None:
    """The page-cached and real-device tables."""
    with contextlib.ExitStack() as stack:
        cs = start_contenders(cfg, work, stack, res)
        for rnd in range(cfg.rounds):
            run_round(cs, cfg, work, res, rnd)
        for c in cs:
            if c.can_take:
                guarded(res, ["take_wait_p50", "take_wait_p99"], c.name, run_take_test, c, cfg, res)
    note_log_problems(cs, res)      # after the unmount: CBT saving is logged too
    for path in work.glob("src-*.img"):
        path.unlink()
    for name in contender_names(cfg):
        if name != "raw":
            c = make_contender(name, work / "mem", work / "mem" / name / "sparse.img",
                               cfg.mem_device, 4 * cfg.scatter)
            guarded(res, ["mem_written"], name, run_memory_test, c, cfg, res)
            note_log_problems([c], res)
    if cfg.real:
        run_real(cfg, work, res)


def run_real(cfg: Config, work: Path, res: Results) -> None:
    """The real-device table; if it cannot be set up, all its cells are marked failed."""
    try:
        cs = run_real_device(cfg, work, res)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        for row in REAL_ROWS:
            for name in contender_names(cfg):
                res.fail(row.key, name, f"real device: {exc}")
        return
    note_log_problems(cs, res)


def guarded(res: Results, keys: list[str], who: str, fn: Callable, *args) -> None:
    """Run a test; record its failure under ``keys`` instead of aborting the run."""
    try:
        fn(*args)
    except Exception as exc:
        for key in keys:
            res.fail(key, who, exc)


def note_log_problems(cs: list[Contender], res: Results) -> None:
    """Tracebacks or internal errors in a snapfs log are snapfs bugs: report them."""
    for c in cs:
        problem = c.log_problems() if isinstance(c, Snapfs) else None
        if problem:
            res.notes.append(problem)
            keep_log(c)


def keep_log(c: Snapfs) -> None:
    """Copy a snapfs log with errors out of the scratch dir (it is removed)."""
    dest = Path(tempfile.gettempdir()) / f"snapfs-bench-{os.getpid()}-{c.dir.name}.log"
    with contextlib.suppress(OSError):
        shutil.copyfile(c.log, dest)
        log(f"snapfs log with errors kept as {dest}")


def main(argv: list[str] | None = None) -> int:
    """Parse, run, report; clean up on every path."""
    cfg = parse_args(argv)
    try:
        check_tools(cfg)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    res, started, status = Results(), time.time(), 0
    try:
        with scratch_dir(cfg) as work:
            run_all(cfg, work, res)
    except KeyboardInterrupt:
        log("interrupted: cleaned up; partial table follows")
        status = EXIT_INTERRUPTED
    except (BenchError, OSError) as exc:
        log(f"bench failed: {exc}")
        status = EXIT_ERROR
    report(res, cfg, started)
    return status or (EXIT_FAILURES if res.failures else 0)
