"""Interposition cost: what a database pays for running through snapfs when no snapshot
and no backup is under way, side by side with QEMU's FUSE export of the same device
and with the device itself.

Set-up (one run): a sparse --load-size file (a new VM disk image), a loop device with
``--direct-io=on`` over it (uncached, a stand-in for a disk), ext4 with a PostgreSQL
cluster (``pgbench -i``, scale 20) made on it once. Each round, for raw, snapfs and
qemu in turn: the contender is started over the loop device, ext4 is mounted from the
device it presents (raw: the loop device itself; snapfs: a loop device over
``MOUNT/devices/d``; qemu: a loop device over its FUSE export of a host_device node;
both stacked loop devices buffered: with --direct-io=on PostgreSQL's backends died of
I/O errors through QEMU 7.2's export),
PostgreSQL is started on it and ``pgbench`` (4 clients) runs --interpose-runtime
seconds; then everything is stopped again. The row is pgbench's tps.
"""

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

from .common import BenchError, Config, human, log
from .contenders import Contender, Raw, Snapfs
from .pg import CLIENTS, PG_SCALE, as_postgres, mounted, server
from .qemu import QemuDevice
from .realdev import loop_device
from .report import Row

INTERPOSE_ROWS = [Row("interpose_tps", "pgbench tps on ext4 over the device (no snapshot)", "tps")]


def run_interpose(cfg: Config, work: Path, res) -> None:
    """The whole section; everything started is stopped at the end."""
    work.chmod(0o711)
    work = work / "interpose"
    work.mkdir(mode=0o711)
    backing = work / "disk.img"
    log(f"interposition: {human(cfg.load_size)} sparse disk, PostgreSQL (scale {PG_SCALE}), pgbench "
        f"{cfg.interpose_runtime} s per contender and round")
    with open(backing, "wb") as f:
        f.truncate(cfg.load_size)
    try:
        with loop_device(backing) as disk:
            prepare(disk, work)
            for rnd in range(cfg.load_rounds):
                log(f"interposition: round {rnd + 1}/{cfg.load_rounds}")
                for c in contenders(cfg, work, disk):
                    try:
                        tps = one_run(c, disk, work, cfg.interpose_runtime)
                    except (BenchError, OSError, subprocess.SubprocessError) as exc:
                        res.fail("interpose_tps", c.name, exc)
                        continue
                    res.add("interpose_tps", c.name, tps)
                    log(f"  {c.name:7} {tps:8.0f} tps")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def contenders(cfg: Config, work: Path, disk: Path) -> list[Contender]:
    cs: list[Contender] = [Raw(work / "raw", disk, cfg.load_size),
                           Snapfs(work / "snapfs", disk, cfg.load_size, cfg.load_size)]
    if cfg.qemu:
        cs.append(QemuDevice(work / "qemu", disk, cfg.load_size))
    return cs


def prepare(disk: Path, work: Path) -> None:
    """ext4 on the disk with an initialized cluster and pgbench's tables."""
    with mounted(disk, work / "pgfs", mkfs=True) as data, server(data, work, init=True):
        pass


def one_run(c: Contender, disk: Path, work: Path, seconds: int) -> float:
    """Start ``c``, mount ext4 from what it presents, run pgbench; tps."""
    with contextlib.ExitStack() as stack:
        stack.callback(c.stop)
        c.start()
        dev = disk if isinstance(c, Raw) else stack.enter_context(loop_device(c.device, direct=False))
        data = stack.enter_context(mounted(dev, work / "pgfs"))
        sock = stack.enter_context(server(data, work))
        done = as_postgres("pgbench", "-h", str(sock), "-c", str(CLIENTS), "-j", "2", "-T", str(seconds),
                           "bench", timeout=seconds + 120)
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if not found:
        raise BenchError(f"no tps in pgbench's output: {done.stdout[-300:]}")
    return float(found.group(1))


def interpose_table(res, cfg: Config) -> str:
    """The section's table: tps per contender (median of rounds) and the ratios."""
    med = {who: res.median("interpose_tps", who) for who in ("raw", "snapfs", "qemu")}
    samples = {who: ", ".join(f"{v:.0f}" for v in res.samples.get("interpose_tps", {}).get(who, []))
               for who in med}
    lines = [f"interposition cost: pgbench ({CLIENTS} clients, scale {PG_SCALE}, {cfg.interpose_runtime} s) "
             f"on ext4 over a {human(cfg.load_size)} uncached loop device, directly or through a FUSE "
             f"daemon, {cfg.load_rounds} round(s), medians", "",
             "| contender | tps | samples |", "|---|---|---|"]
    lines += [f"| {who} | {'fail' if v is None else f'{v:.0f}'} | {samples[who]} |" for who, v in med.items()]
    if med["snapfs"] and med["raw"]:
        line = f"snapfs/raw {med['snapfs'] / med['raw']:.2f}"
        if med["qemu"]:
            line += (f", qemu/raw {med['qemu'] / med['raw']:.2f}, "
                     f"snapfs/qemu {med['snapfs'] / med['qemu']:.2f} (target >= 1.0)")
        lines += ["", line]
    return "\n".join(lines)
