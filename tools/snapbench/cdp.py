"""The CDP section (issue 22): what a journal costs the workload, and what a view
of a past instant costs to open and to read.

    pgbench    PostgreSQL (4 clients, scale 20) on ext4 over a loop device over a snapfs
               device over an uncached loop device (``interpose``'s set-up), with the
               journal off and on (``cdp_start`` into a directory of the scratch disk),
               interleaved off, on, off, on, ... for --load-rounds rounds; tps medians
               and their ratio; journal bytes per byte the database wrote (``cdp_info``:
               used / bytes_written)
    history    --cdp-writes random 4 KiB writes by fio (psync, buffered: each write one
               FUSE request) to a --cdp-size random device with the journal on, in two
               halves: the daemon's RSS before and after (growth per million writes),
               its write rate
    view open  ``cdp_view`` of instants spread over that history (median and worst)
    view read  a snapshot is taken halfway through the history (every chunk is copied
               by the second half): sequential reads (1 MiB; image files are direct
               I/O) of the whole device from its image, from the view of the take's
               instant (first checked equal to the image) and from a view of the end,
               interleaved, page cache warm (source and journal read once first);
               MiB/s medians and view/image ratios

The machine is shared: the rounds are interleaved and the figures are medians.
"""

import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from snapfs.errors import SnapfsError

from .common import BenchError, Config, MiB, human, log
from .contenders import Snapfs
from .interpose import one_run, prepare
from .pg import CLIENTS, PG_SCALE, pg_available
from .procs import rss_mib
from .realdev import loop_device
from .scratch import make_random_file, warm

JOURNAL_LIMIT = 64 << 30


class CdpSnapfs(Snapfs):
    """A snapfs mount whose device ``d`` has a journal in ``directory/journal`` from
    start to stop; ``info`` is its last ``cdp_info``."""

    name = "snapfs+cdp"

    def __init__(self, directory: Path, source: Path, size: int, storage: int):
        super().__init__(directory, source, size, storage)
        self.journal = directory / "journal"
        self.info: dict = {}

    def start(self) -> None:
        super().start()
        self.journal.mkdir(exist_ok=True)
        self.ctl(f"cdp_start d {self.journal} {JOURNAL_LIMIT}")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.info = self.ctl("cdp_info d")
                self.ctl("cdp_stop d")
        super().stop()


def run_cdp_bench(cfg: Config, work: Path) -> tuple[str, dict]:
    """The section; its table and its figures."""
    work.chmod(0o711)                  # PostgreSQL runs as postgres below it
    work = work / "cdp"
    work.mkdir(mode=0o711)
    rows: dict = {}
    try:
        if cfg.load and pg_available():
            pgbench_rows(cfg, work, rows)
        else:
            log("cdp: pgbench rows skipped (no PostgreSQL 15, or --quick without --load)")
        if cfg.cdp_writes:
            try:
                history_rows(cfg, work, rows)
            except SnapfsError as exc:
                raise BenchError(f"cdp history: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return table(rows, cfg), rows


def pgbench_rows(cfg: Config, work: Path, rows: dict) -> None:
    backing = work / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(cfg.load_size)
    tps: dict[str, list[float]] = {"off": [], "on": []}
    ratios: list[float] = []
    with loop_device(backing) as disk:
        prepare(disk, work)
        for rnd in range(cfg.load_rounds):
            for label, kind in (("off", Snapfs), ("on", CdpSnapfs)):
                c = kind(work / f"snapfs-{label}", disk, cfg.load_size, cfg.load_size)
                tps[label].append(one_run(c, disk, work, cfg.interpose_runtime))
                if label == "on" and c.info.get("bytes_written"):
                    ratios.append(c.info["used"] / c.info["bytes_written"])
                log(f"cdp: round {rnd + 1}: pgbench, journal {label}: {tps[label][-1]:.0f} tps")
    rows["pg_off"], rows["pg_on"] = tps["off"], tps["on"]
    rows["journal_ratio"] = ratios


def history_rows(cfg: Config, work: Path, rows: dict) -> None:
    source = work / "history.img"
    make_random_file(source, cfg.cdp_size)
    c = CdpSnapfs(work / "history", source, cfg.cdp_size, cfg.cdp_size + 64 * MiB)
    try:
        c.start()
        rss0 = rss_mib(c.pid)
        log(f"cdp: {cfg.cdp_writes} random 4 KiB writes with the journal on, a snapshot taken halfway")
        seconds = fio_writes(c, cfg.cdp_writes // 2)
        snap = c.ctl(f"snapshot_create {c.store} {c.storage} d")["id"]
        before = time.time()
        c.ctl(f"snapshot_take {snap} nofreeze")
        taken = (before + time.time()) / 2     # no writes run around the take: any instant in it
        seconds += fio_writes(c, cfg.cdp_writes - cfg.cdp_writes // 2)
        info = c.ctl("cdp_info d")
        rows["history"] = {"writes": info["writes"], "seconds": seconds, "used": info["used"],
                           "rss_before": rss0, "rss_after": rss_mib(c.pid),
                           "index_bytes": info["index_bytes"]}
        rows["open_ms"] = open_times(c, info["oldest"], info["newest"])
        rows["reads"] = read_rounds(cfg, c, snap, taken, info["newest"])
    finally:
        c.stop()


def fio_writes(c: Snapfs, count: int) -> float:
    """Seconds fio takes for ``count`` random buffered 4 KiB writes to the device."""
    t0 = time.monotonic()
    subprocess.run(["fio", "--name=history", f"--filename={c.device}", "--rw=randwrite", "--bs=4k",
                    "--ioengine=psync", "--direct=0", "--norandommap", "--randrepeat=0",
                    f"--size={c.size}", f"--io_size={count * 4096}"], check=True, capture_output=True,
                   timeout=7200)
    return time.monotonic() - t0


def open_times(c: Snapfs, oldest: float, newest: float, count: int = 11) -> list[float]:
    """ms of ``cdp_view`` at ``count`` instants spread over the history."""
    times = []
    for k in range(count):
        when = oldest + (newest - oldest) * k / (count - 1)
        t0 = time.monotonic()
        view = c.ctl(f"cdp_view d {when:.6f}" if 0 < k < count - 1 else f"cdp_view d {when!r}")["id"]
        times.append((time.monotonic() - t0) * 1000)
        c.ctl(f"snapshot_destroy {view}")
    return times


def read_rounds(cfg: Config, c: CdpSnapfs, snap: str, taken: float, newest: float) -> dict[str, list[float]]:
    """MiB/s of whole sequential reads of the snapshot image taken halfway (every chunk
    copied since), the view of that same instant (checked equal to it) and a view of
    the end of the history, interleaved, warm."""
    images = {"image": c.mnt / "snapshots" / snap / "d"}
    for label, when in (("view_mid", taken), ("view_late", newest)):
        images[label] = c.mnt / "snapshots" / c.ctl(f"cdp_view d {when:.6f}")["id"] / "d"
    if sha256(images["image"]) != sha256(images["view_mid"]):
        raise BenchError("the view of the take's instant differs from the snapshot image")
    warm(c.source)
    for seg in c.journal.glob("seg-*.cdp"):
        warm(seg)
    speeds: dict[str, list[float]] = {k: [] for k in images}
    for _ in range(max(3, cfg.rounds)):
        for label, path in images.items():
            speeds[label].append(read_speed(path, cfg.cdp_size))
    return speeds


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def read_speed(path: Path, size: int) -> float:
    """MiB/s of reading ``path`` whole in 1 MiB pieces."""
    buf = bytearray(MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.monotonic()
        done = 0
        while n := os.readv(fd, [buf]):
            done += n
        seconds = time.monotonic() - t0
    finally:
        os.close(fd)
    if done != size:
        raise BenchError(f"read {done} of {size} bytes from {path}")
    return size / MiB / seconds


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(rows: dict, cfg: Config) -> str:
    """The section as Markdown, with the targets."""
    lines = ["continuous data protection (issue 22); medians of interleaved rounds on a shared machine",
             "",
             "| row | value | target | samples |", "|---|---|---|---|"]
    off, on = _med(rows.get("pg_off", [])), _med(rows.get("pg_on", []))
    if off and on:
        lines.append(f"| pgbench ({CLIENTS} clients, scale {PG_SCALE}, {cfg.interpose_runtime} s), journal "
                     f"on/off | {on:.0f}/{off:.0f} tps = {on / off:.2f}x | >= 0.7x | on "
                     f"{_list(rows['pg_on'], 0)}; off {_list(rows['pg_off'], 0)} |")
        ratio = _med(rows.get("journal_ratio", []))
        if ratio:
            lines.append(f"| journal bytes per byte written (pgbench) | {ratio:.3f} | <= 1.1 + metadata | "
                         f"{_list(rows['journal_ratio'], 3)} |")
    h = rows.get("history")
    if h:
        growth = (h["rss_after"] - h["rss_before"]) * 1e6 / max(1, h["writes"])
        lines.append(f"| history: {h['writes']} writes of 4 KiB by fio on a {human(cfg.cdp_size)} device | "
                     f"{h['writes'] / h['seconds']:.0f} writes/s, journal {h['used'] / MiB:.0f} MiB | | |")
        lines.append(f"| RSS growth per million journaled writes | {growth:.1f} MiB (index "
                     f"{h['index_bytes'] / MiB:.1f} MiB; {h['rss_before']:.0f} -> {h['rss_after']:.0f} MiB) "
                     "| <= 64 MiB | |")
    if rows.get("open_ms"):
        lines.append(f"| cdp_view open, {len(rows['open_ms'])} instants over the history | median "
                     f"{_med(rows['open_ms']):.1f} ms, worst {max(rows['open_ms']):.1f} ms | < 1000 ms | "
                     f"{_list(rows['open_ms'], 1)} |")
    reads = rows.get("reads")
    if reads:
        image = _med(reads["image"])
        for label, what in (("view_mid", "the take's instant (halfway)"), ("view_late", "the end")):
            v = _med(reads[label])
            lines.append(f"| seq read: view of {what} vs the snapshot image taken halfway | "
                         f"{v:.0f}/{image:.0f} MiB/s = {v / image:.2f}x | >= 0.8x | view "
                         f"{_list(reads[label], 0)}; image {_list(reads['image'], 0)} |")
    return "\n".join(lines)


def _list(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)

