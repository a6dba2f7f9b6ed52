"""The real-device section: snapfs, qemu-storage-daemon and the raw device on ONE
uncached block device, a loop device with ``--direct-io=on`` over a file of random data
(a stand-in for a disk: the backing file is read with O_DIRECT, so nothing of it stays
in the page cache).

The three contenders use the same loop device one after the other, never at once:
snapfs mounts it as ``d=/dev/loopN`` (opened O_EXCL: fine, fio and QEMU open it without
O_EXCL), QEMU opens it as a host_device node (``QemuDevice``), raw is the device itself.
Before every job the page cache of the device and of its backing file is dropped (sync,
BLKFLSBUF, fadvise DONTNEED, drop_caches), so each job starts uncached; only the
page-cache row (snapfs only) reads the device once instead.
"""

import contextlib
import os
import subprocess
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from .common import BenchError, Config, MiB, human, log
from .contenders import Contender, Raw, Snapfs
from .procs import shielded
from .qemu import QemuDevice
from .report import REAL_ROWS, Results
from .scratch import forget, make_random_file, warm
from .workloads import measure, record, snapshots, start_all

PLAIN_READS = ("real_rand_read_1", "real_rand_read_16", "real_seq_read")
COMMITS = ("real_commit_1", "real_commit_4")


def run_real_device(cfg: Config, work: Path, res: Results) -> list[Contender]:
    """Create the random file, attach the loop device, run ``cfg.real_rounds`` rounds;
    everything stopped and detached at the end. Returns the contenders (for their logs)."""
    rcfg = replace(cfg, size=cfg.real_size, rounds=cfg.real_rounds, runtime=cfg.real_runtime)
    work = work / "real"
    work.mkdir()
    backing = work / "disk.img"
    log(f"real device: {human(rcfg.size)} random file, loop device with --direct-io=on")
    make_random_file(backing, rcfg.size)
    os.sync()
    try:
        with loop_device(backing) as dev, contextlib.ExitStack() as stack:
            cs = make_contenders(rcfg, work, dev)
            started = start_all(cs, stack, res, [row.key for row in REAL_ROWS])
            for rnd in range(rcfg.rounds):
                real_round(started, rcfg, work, res, rnd)
        return cs
    finally:
        backing.unlink(missing_ok=True)


def make_contenders(cfg: Config, work: Path, dev: Path) -> list[Contender]:
    """snapfs (storage limit: twice the device), qemu unless skipped, raw: all on ``dev``."""
    cs: list[Contender] = [Snapfs(work / "snapfs", dev, cfg.size, 2 * cfg.size)]
    if cfg.qemu:
        cs.append(QemuDevice(work / "qemu", dev, cfg.size))
    return [*cs, Raw(work / "raw", dev, cfg.size)]


@contextlib.contextmanager
def loop_device(backing: Path, offset: int = 0, size: int | None = None, direct: bool = True):
    """``losetup --find --show --direct-io=on backing`` (``size`` bytes at ``offset``
    when given; buffered unless ``direct``); detached at the end (the kernel finishes
    the detach when the last user closes it)."""
    part = ["--offset", str(offset), "--sizelimit", str(size)] if size is not None else []
    mode = "--direct-io=on" if direct else "--direct-io=off"
    done = subprocess.run(["losetup", "--find", "--show", mode, *part, str(backing)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"losetup {backing} failed: {done.stderr.strip()}")
    dev = Path(done.stdout.strip())
    try:
        yield dev
    finally:
        with shielded():
            subprocess.run(["losetup", "-d", str(dev)], capture_output=True, check=False)


def uncache(dev: Path) -> None:
    """Before each job: write back dirty pages, then drop the page cache of the loop
    device, of its backing file, and (drop_caches) of the FUSE files over it."""
    os.sync()
    subprocess.run(["blockdev", "--flushbufs", str(dev)], capture_output=True, check=True)
    backing = Path(f"/sys/block/{dev.name}/loop/backing_file").read_text().strip()
    for path in (dev, Path(backing)):
        forget(path)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def copy_speed(path: Path, dev: Path, size: int) -> float:
    """``cp path /dev/null`` from an uncached device, as MiB/s."""
    uncache(dev)
    t0 = time.monotonic()
    subprocess.run(["cp", str(path), "/dev/null"], capture_output=True, check=True, timeout=1800)
    return size / MiB / (time.monotonic() - t0)


def real_round(cs: list[Contender], cfg: Config, work: Path, res: Results, rnd: int) -> None:
    """One round: every row once per contender, contenders one after the other."""
    log(f"real device: round {rnd + 1}/{cfg.rounds}")
    seed = 2000 + rnd
    run = partial(measure, cfg=cfg, work=work, seed=seed, prepare=uncache)
    for key in PLAIN_READS:
        for c in cs:
            run(res, key, c, c.reader)
    for c in cs:
        record(res, "real_cp", c.name, "MiB/s", partial(copy_speed, c.reader, c.source, cfg.size))
    for key in COMMITS:
        for c in cs:
            run(res, key, c, c.device)
    with snapshots(cs, res, ["real_snap_seq_read"]) as held:
        for c in held:
            run(res, "real_snap_seq_read", c, c.image)
    with snapshots(cs, res, ["real_cow_rand_write"]) as held:
        for c in held:
            run(res, "real_cow_rand_write", c, c.device)
    for c in cs:
        if isinstance(c, Snapfs):
            run(res, "real_cached_rand_read_16", c, c.device, prepare=warm)
