"""Backup under load: how much a backup of a snapshot image costs a database that keeps
running on the device, against a plain copy of as much uncached data.

Set-up, once per kind of source (``sparse``: a new VM disk image, holes where nothing
was written; ``full``: every byte written): a file is the "disk", a loop device with
``--direct-io=on`` over it, split in two by offset: the first part is the snapfs source
(device ``d``; sparse or random data), the second a plain region of random data on the
same disk. A second loop device over ``MOUNT/devices/d`` carries ext4 with a PostgreSQL
cluster, and ``pgbench`` (4 clients, scale 20) runs on it for the whole section.

Each round: tps over a quiet window; take a snapshot and ``cp`` its image to /dev/null
(device and image page cache dropped first); destroy it; ``snapfs backup create --full``
of the device into a repository on the same disk as the scratch dir; ``cp`` of the
plain region, uncached too. During each copy a ``fio`` writer (one job, 4 KiB random
writes each followed by ``fsync``, on the same ext4) measures commit latency. Per copy:
the median and the lowest whole second of pgbench's tps, the writer's p99 latency, and
the copy's time; the targets compare each copy with the plain one.
"""

import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

from .common import BenchError, Config, human, log
from .contenders import Snapfs
from .pg import CLIENTS, PG_SCALE, mounted, server
from .procs import shielded, tail, wait_until
from .realdev import loop_device
from .report import Row
from .scratch import forget, make_random_file

QUIET = 8.0                   # seconds of the baseline window
SETTLE = 4.0                  # seconds between a copy and the next window
KINDS = ("sparse", "full")
COPIES = ("image", "backup", "plain")
FSYNC_RATE = 50               # commits a second of the fsync writer: a latency probe, not a load
COPY_LABELS = {"image": "cp of the snapshot image", "backup": "snapfs backup create --full",
               "plain": "cp of a plain region of the disk"}


def _rows() -> list[Row]:
    rows = []
    for kind in KINDS:
        rows += [Row(f"load_{kind}_base", f"{kind}: pgbench tps, no copy (median second)", "tps"),
                 Row(f"load_{kind}_snap", f"{kind}: pgbench tps, snapshot taken, no copy", "tps")]
        for copy in COPIES:
            label = f"{kind}: {COPY_LABELS[copy]}"
            rows += [Row(f"load_{kind}_{copy}_med", f"{label}: tps, median second", "tps"),
                     Row(f"load_{kind}_{copy}_min", f"{label}: tps, lowest whole second", "tps"),
                     Row(f"load_{kind}_{copy}_p99", f"{label}: fsync writer p99", "ms", True),
                     Row(f"load_{kind}_{copy}_time", f"{label}: time", "s", True)]
    return rows


LOAD_ROWS = _rows()


def run_under_load(cfg: Config, work: Path, res) -> None:
    """The whole section, once per kind of source; every mount, loop device and server
    is gone at the end."""
    work.chmod(0o711)                 # the postgres user must reach its data and socket
    for kind in cfg.load_kinds:
        kdir = work / f"load-{kind}"
        kdir.mkdir(mode=0o711)
        try:
            run_kind(cfg, kdir, kind, res)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            for row in LOAD_ROWS:
                if row.key.startswith(f"load_{kind}_") and not res.samples.get(row.key):
                    res.fail(row.key, "snapfs", exc)
            for name in ("pgbench.log", "snapfs/snapfs.log"):
                log(f"{kind}: end of {name}: {tail(kdir / name, 800)}")
        finally:
            shutil.rmtree(kdir, ignore_errors=True)


def make_disk(backing: Path, size: int, kind: str) -> None:
    """The disk file: the device region (sparse, or random data), then a plain region
    of random data."""
    make_random_file(backing, 2 * size)
    if kind == "sparse":
        subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(size),
                        str(backing)], check=True)


def run_kind(cfg: Config, work: Path, kind: str, res) -> None:
    size = cfg.load_size
    backing = work / "disk.img"
    log(f"backup under load ({kind}): {human(2 * size)} disk, PostgreSQL on ext4 over snapfs")
    make_disk(backing, size, kind)
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(loop_device(backing, 0, size))
        plain = stack.enter_context(loop_device(backing, size, size))
        for dev in (disk, plain):
            got = int(subprocess.run(["blockdev", "--getsize64", str(dev)], capture_output=True,
                                     text=True, check=True).stdout)
            if got != size:
                raise BenchError(f"loop device {dev} over {backing} is {got} bytes, not {size}")
        snap = Snapfs(work / "snapfs", disk, size, size)
        snap.start()
        stack.callback(snap.stop)
        pgdev = stack.enter_context(loop_device(snap.device, 0, size))
        pgfs = work / "pgfs"
        pgdata = stack.enter_context(mounted(pgdev, pgfs, mkfs=True))
        sock = stack.enter_context(server(pgdata, work, init=True))
        repo = work / "repo"
        snap.cli("backup", "init", str(repo))
        bench = stack.enter_context(pgbench(sock, work, cfg.load_rounds))
        for rnd in range(cfg.load_rounds):
            log(f"backup under load ({kind}): round {rnd + 1}/{cfg.load_rounds}")
            load_round(Round(snap, disk, plain, pgfs, repo, bench, kind, res))


class Round:
    """What one round works on."""

    def __init__(self, snap, disk, plain, pgfs, repo, bench, kind, res):
        self.snap, self.disk, self.plain, self.pgfs = snap, disk, plain, pgfs
        self.repo, self.bench, self.kind, self.res = repo, bench, kind, res

    def key(self, name: str) -> str:
        return f"load_{self.kind}_{name}"


def load_round(r: Round) -> None:
    """Baseline window, image copy, backup create, plain copy."""
    time.sleep(SETTLE)
    t0 = time.time()
    time.sleep(QUIET)
    r.res.add(r.key("base"), "snapfs", statistics.median(r.bench.seconds(t0, time.time())))
    r.snap.take()
    try:
        t0 = time.time()
        time.sleep(QUIET)
        r.res.add(r.key("snap"), "snapfs", statistics.median(r.bench.seconds(t0, time.time())))
        uncache(r.disk, r.snap.image)
        measured_copy(r, "image", ["cp", str(r.snap.image), "/dev/null"])
    finally:
        r.snap.release()
    time.sleep(SETTLE)
    uncache(r.disk)
    measured_copy(r, "backup", r.snap.cli_args("backup", "create", "--full", "--storage",
                                               str(r.snap.store), str(r.repo), "d"))
    time.sleep(SETTLE)
    uncache(r.plain)
    measured_copy(r, "plain", ["cp", str(r.plain), "/dev/null"])
    log("  " + ", ".join(f"{c} {r.res.samples[r.key(c + '_time')]['snapfs'][-1]:.1f} s "
                         f"tps {r.res.samples[r.key(c + '_med')]['snapfs'][-1]:.0f} "
                         f"(min {r.res.samples[r.key(c + '_min')]['snapfs'][-1]:.0f})" for c in COPIES))


def uncache(*paths: Path) -> None:
    """Write back and drop what the page cache holds of these files and devices."""
    subprocess.run(["sync"], check=True)
    for path in paths:
        if path.is_block_device():
            subprocess.run(["blockdev", "--flushbufs", str(path)], check=True)
        forget(path)


def measured_copy(r: Round, name: str, cmd: list[str]) -> None:
    """Run ``cmd`` with the fsync writer beside it; record tps median and minimum of the
    whole seconds inside it, the writer's p99 and the copy's time."""
    with fsync_writer(r.pgfs) as writer:
        start, t0 = time.time(), time.monotonic()
        done = subprocess.run(cmd, check=True, timeout=1800, capture_output=True, text=True)
        seconds = time.monotonic() - t0
    if seconds < 0.5:
        sizes = subprocess.run(["lsblk", "-bno", "NAME,SIZE,TYPE"], capture_output=True, text=True).stdout
        raise BenchError(f"{' '.join(cmd)} took {seconds:.2f} s: nothing copied? {done.stderr[-300:]} "
                         f"devices: {' '.join(sizes.split())[-400:]}")
    tps = r.bench.seconds(start, start + seconds)
    r.res.add(r.key(f"{name}_time"), "snapfs", seconds)
    r.res.add(r.key(f"{name}_med"), "snapfs", statistics.median(tps))
    r.res.add(r.key(f"{name}_min"), "snapfs", min(tps))
    r.res.add(r.key(f"{name}_p99"), "snapfs", writer.p99_ms())


class FsyncWriter:
    """A running fio job: 4 KiB random writes, fsync after each, until stopped."""

    def __init__(self, proc: subprocess.Popen, out: Path):
        self.proc, self.out = proc, out

    def p99_ms(self) -> float:
        text = self.out.read_text()
        job = json.loads(text[text.find("{"):])["jobs"][0]
        lat = job["sync"]["lat_ns"] if job["sync"]["lat_ns"].get("percentile") else job["write"]["clat_ns"]
        return lat["percentile"]["99.000000"] / 1e6


@contextlib.contextmanager
def fsync_writer(where: Path):
    out = where.parent / "fsync-writer.json"
    cmd = ["fio", "--name=fsync", f"--filename={where}/fsync.dat", "--size=64M", "--rw=randwrite",
           "--bs=4k", "--ioengine=psync", "--fsync=1", f"--rate_iops={FSYNC_RATE}", "--time_based",
           "--runtime=3600",
           "--output-format=json", f"--output={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    writer = FsyncWriter(proc, out)
    try:
        yield writer
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class PgBench:
    """A running ``pgbench -P 1 --progress-timestamp``; tps of each second."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc, self.log_path = proc, log_path

    def samples(self) -> list[tuple[float, float]]:
        """(end time of the second, tps) for every progress line so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("progress: "):
                words = line.split()
                out.append((float(words[1]), float(words[3])))
        return out

    def seconds(self, start: float, end: float) -> list[float]:
        """tps of the whole seconds inside (start, end); of the seconds that overlap it
        when none lies wholly inside."""
        wait_until(lambda: any(t > end + 1 for t, _ in self.samples()) or self.proc.poll() is not None,
                   10, "pgbench progress")
        samples = self.samples()
        inside = [tps for t, tps in samples if start <= t - 1 and t <= end]
        inside = inside or [tps for t, tps in samples if start < t <= end + 1]
        if not inside:
            raise BenchError(f"no pgbench progress between {start:.0f} and {end:.0f}")
        return inside


@contextlib.contextmanager
def pgbench(sock: Path, work: Path, rounds: int):
    """pgbench with CLIENTS clients for long enough; stopped (SIGINT) at the end."""
    log_path = work / "pgbench.log"
    seconds = str(600 * rounds)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbench", "-h", str(sock),
                                 "-c", str(CLIENTS), "-j", "2", "-T", seconds, "-P", "1",
                                 "--progress-timestamp", "bench"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield PgBench(proc, log_path)
    finally:
        with shielded():
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load_table(res, cfg: Config) -> str:
    """The section's table (medians over rounds and every sample), then the targets."""
    med = {row.key: res.median(row.key, "snapfs") for row in LOAD_ROWS}
    lines = [f"backup under load: pgbench ({CLIENTS} clients, scale {PG_SCALE}) on ext4 over a loop "
             f"device over a snapfs device of {human(cfg.load_size)} (source: a --direct-io=on loop "
             f"device, sparse or fully written), fio fsync writer beside each copy, "
             f"{cfg.load_rounds} round(s), medians of rounds", "",
             "| measure | unit | median | samples |", "|---|---|---|---|"]
    for row in LOAD_ROWS:
        if not row.key.startswith(tuple(f"load_{kind}_" for kind in cfg.load_kinds)):
            continue
        samples = ", ".join(f"{v:.1f}" for v in res.samples.get(row.key, {}).get("snapfs", []))
        value = "fail" if med[row.key] is None else f"{med[row.key]:.1f}"
        lines.append(f"| {row.label} | {row.unit} | {value} | {samples} |")
    lines.append("")
    lines += [target_line(res, med, kind, copy) for kind in cfg.load_kinds for copy in ("image", "backup")]
    return "\n".join(lines)


def target_line(res, med: dict, kind: str, copy: str) -> str:
    """The four targets of one copy against the plain copy, each with its figure."""
    k = f"load_{kind}_"
    try:
        lowest = min(res.samples[k + f"{copy}_min"]["snapfs"]) / med[k + "base"]
        return (f"{kind}, {COPY_LABELS[copy]}: lowest second / baseline {lowest:.2f} (target >= 0.3); "
                f"median tps / plain copy's {med[k + f'{copy}_med'] / med[k + 'plain_med']:.2f} "
                f"(target >= 0.8); time / plain copy's {med[k + f'{copy}_time'] / med[k + 'plain_time']:.2f} "
                f"(target <= 1.5); fsync p99 / plain copy's "
                f"{med[k + f'{copy}_p99'] / med[k + 'plain_p99']:.2f} (target <= 2)")
    except (KeyError, TypeError, ZeroDivisionError, ValueError):
        return f"{kind}, {COPY_LABELS[copy]}: not measured"
