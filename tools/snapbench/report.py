"""Results and the table: samples, medians, percentiles, ratios, the Markdown table and
the JSON file."""

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snapfs import __version__ as SNAPFS_VERSION

from .common import CONTENDERS, Config, human, log


@dataclass(frozen=True)
class Row:
    """A table row: key in Results, label template, unit, direction."""

    key: str
    label: str
    unit: str
    lower_is_better: bool = False


ROWS = [
    Row("plain_seq_write", "plain: seq write 1M", "MiB/s"),
    Row("plain_seq_read", "plain: seq read 1M", "MiB/s"),
    Row("plain_rand_write", "plain: rand write 4K", "IOPS"),
    Row("cow_seq_write", "first overwrite: seq write 1M, whole device", "MiB/s"),
    Row("cow_rand_write", "first overwrite: rand write 4K, fresh chunks", "IOPS"),
    Row("snap_seq_read", "snapshot image: seq read 1M (all copied)", "MiB/s"),
    Row("snap_rand_read", "snapshot image: rand read 4K", "IOPS"),
    Row("take_wait_p50", "take: longest write wait, p50 of {takes}", "ms", True),
    Row("take_wait_p99", "take: longest write wait, p99 of {takes}", "ms", True),
    Row("take_base_p50", "take test: longest write wait, same-length window, no take, p50", "ms", True),
    Row("take_block_p99", "take: writes held (daemon's count), p99", "ms", True),
    Row("take_cmd_p50", "take: command time, p50", "ms", True),
    Row("writer_lat_p99", "take test: 4 writers' write latency p99", "ms", True),
    Row("mem_attached", "memory: {mem} sparse device attached", "MiB", True),
    Row("mem_snapshot", "memory: + snapshot taken", "MiB", True),
    Row("mem_written", "memory: + {scatter} scattered writes", "MiB", True),
]

REAL_ROWS = [
    Row("real_rand_read_1", "device: rand read 4K direct, 1 job", "IOPS"),
    Row("real_rand_read_16", "device: rand read 4K direct, 16 jobs", "IOPS"),
    Row("real_seq_read", "device: seq read 1M buffered", "MiB/s"),
    Row("real_cp", "device: cp to /dev/null", "MiB/s"),
    Row("real_snap_seq_read", "snapshot image: seq read 1M buffered (raw: the device)", "MiB/s"),
    Row("real_cow_rand_write", "after take: rand write 4K direct, 8 jobs (raw: no snapshot)", "IOPS"),
    Row("real_cached_rand_read_16", "source in page cache: rand read 4K direct, 16 jobs", "IOPS"),
    Row("real_commit_1", "commit: rand write 4K direct + fsync, 1 job", "IOPS"),
    Row("real_commit_4", "commit: rand write 4K direct + fsync, 4 jobs", "IOPS"),
]

RATIOS = {"qemu": "ratio", "raw": "ratio_raw"}   # ratio column -> key in a table row


@dataclass
class Results:
    """Samples per (row key, contender), failures, and notes for the report."""

    samples: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    failures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=lambda: defaultdict(dict))

    def add(self, key: str, who: str, value: float) -> None:
        """Record one sample."""
        self.samples[key][who].append(value)

    def fail(self, key: str, who: str, error: object) -> None:
        """Record a failed measurement (shown as "fail" and listed under the table)."""
        self.failures.append({"workload": key, "contender": who, "error": str(error)})
        log(f"  FAILED {key} on {who}: {error}")

    def median(self, key: str, who: str) -> float | None:
        """Median of the samples, or None."""
        values = self.samples.get(key, {}).get(who)
        return statistics.median(values) if values else None


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ratio(row: Row, snapfs: float | None, other: float | None) -> float | None:
    """snapfs/other for throughput, other/snapfs for ms and MiB: >= 1 means snapfs is
    as good or better."""
    if not snapfs or not other:
        return None
    return other / snapfs if row.lower_is_better else snapfs / other


def build_table(res: Results, cfg: Config, rows: list[Row] = ROWS) -> list[dict]:
    """Rows of medians with the ratios against qemu and raw."""
    names = {"takes": cfg.takes, "mem": human(cfg.mem_device), "scatter": human(cfg.scatter)}
    table = []
    for row in rows:
        medians = {who: res.median(row.key, who) for who in CONTENDERS}
        ratios = {key: ratio(row, medians["snapfs"], medians[who]) for who, key in RATIOS.items()}
        table.append({"key": row.key, "workload": row.label.format(**names), "unit": row.unit,
                      **medians, **ratios, "lower_is_better": row.lower_is_better,
                      "samples": {k: list(v) for k, v in res.samples.get(row.key, {}).items()}})
    return table


def fmt(value: float | None, failed: bool = False) -> str:
    """A table cell: 3 significant-ish digits, "fail" or "n/a"."""
    if value is None:
        return "fail" if failed else "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def render_table(table: list[dict], res: Results, caption: str, legend: str,
                 versus: tuple[str, ...] = ("qemu",)) -> str:
    """A table as Markdown, with its caption and legend; a ratio column per ``versus``."""
    failed = {(f["workload"], f["contender"]) for f in res.failures}
    head = ["workload", "unit", *CONTENDERS, *(f"snapfs/{who}" for who in versus)]
    body = [[r["workload"], r["unit"], *(fmt(r[w], (r["key"], w) in failed) for w in CONTENDERS),
             *(fmt(r[RATIOS[who]]) for who in versus)] for r in table]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        """One Markdown row: text columns left-aligned, numbers right-aligned."""
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([caption, "", line(head), rule, *map(line, body), "", legend])


def page_cached_table(table: list[dict], res: Results, cfg: Config) -> str:
    """The first table: page-cached files."""
    caption = (f"snapfs benchmark: {human(cfg.size)} devices, {cfg.rounds} round(s), medians; "
               "fio --direct=1 --ioengine=psync, 1 job")
    legend = ("snapfs/qemu: >= 1 means snapfs is as fast or faster; for ms and MiB rows it is "
              "qemu/snapfs (lower is better there), so >= 1 still favours snapfs. raw = the source "
              "file without FUSE (O_DIRECT to the disk; the FUSE daemons use the page cache).")
    return render_table(table, res, caption, legend)


def real_device_table(table: list[dict], res: Results, cfg: Config) -> str:
    """The second table: one uncached loop block device."""
    caption = (f"real device: one {human(cfg.real_size)} loop device (losetup --direct-io=on over a "
               f"random file), page cache dropped before every job, {cfg.real_rounds} round(s), "
               f"medians; fio --ioengine=psync, {cfg.real_runtime} s random jobs")
    legend = ("snapfs/raw and snapfs/qemu: >= 1 means snapfs is as fast or faster. raw = the loop "
              "device itself; snapfs = MOUNT/devices/NAME over it; qemu = qemu-storage-daemon "
              "(host_device) FUSE exports: the node itself for the device reads, copy-before-write "
              "fleecing for the snapshot rows. The page-cache row is snapfs only (the device read "
              "once, not dropped): the ceiling of its request loop.")
    return render_table(table, res, caption, legend, ("raw", "qemu"))


def report(res: Results, cfg: Config, started: float) -> str:
    """Print the tables (stdout), failures and notes; write --json. Returns the text."""
    table = build_table(res, cfg) if cfg.only is None else []
    real = build_table(res, cfg, REAL_ROWS) if cfg.real and cfg.only in (None, "real") else []
    parts = [page_cached_table(table, res, cfg)] if cfg.only is None else []
    if real:
        parts.append(real_device_table(real, res, cfg))
    if cfg.load and cfg.only in (None, "load"):
        from .interpose import interpose_table
        from .underload import load_table
        parts += [interpose_table(res, cfg), load_table(res, cfg)]
    if cfg.migrate and cfg.only in (None, "migrate"):
        from .migration import migration_table
        parts.append(migration_table(res, cfg))
    for section in ("backup", "protect", "cdp"):
        if section in res.extra:
            parts.append(res.extra[section]["table"])
    text = "\n\n".join(parts)
    print(text, flush=True)
    for f in res.failures:
        print(f"FAILED: {f['workload']} on {f['contender']}: {f['error']}")
    for note in res.notes:
        print(f"note: {note}")
    if cfg.json:
        doc = {"config": asdict(cfg), "environment": environment(), "seconds": time.time() - started,
               "rows": table, "real_rows": real,
               "load": {k: dict(v) for k, v in res.samples.items()
                        if k.startswith(("load_", "interpose_", "mig_"))},
               "failures": res.failures, "notes": res.notes, "extra": res.extra}
        Path(cfg.json).write_text(json.dumps(doc, indent=2) + "\n")
    return text


def environment() -> dict:
    """Versions and machine facts for the JSON report."""
    def first_line(cmd: list[str]) -> str:
        """First line of a command's output, or "" if it cannot run."""
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
            return out.splitlines()[0] if out else ""
        except OSError:
            return ""

    return {"snapfs": SNAPFS_VERSION, "fio": first_line(["fio", "--version"]),
            "qemu": first_line(["qemu-storage-daemon", "--version"]), "kernel": platform.release(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
