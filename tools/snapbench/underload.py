"""Backup under load: how much a backup copy of a snapshot image costs a database that
keeps running on the device, against a plain copy of as much uncached data.

Set-up (one run): a file of random data is the "disk", a loop device with
``--direct-io=on`` over it, split in two by offset: the first part is the snapfs
source (device ``d``), the second a plain region of the same size on the same disk.
A second loop device over ``MOUNT/devices/d`` carries ext4 with a PostgreSQL cluster,
and ``pgbench`` (4 clients) runs on it for the whole section. Each round: tps over a
quiet window; take a snapshot and ``cp`` its image to /dev/null (device and image
page cache dropped first); destroy it; then ``cp`` the plain region, uncached too.
The rows are the tps of each window (from ``pgbench -P 1 --progress-timestamp``) and
both copy times; the targets compare the image copy with the plain one.
"""

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

from .common import BenchError, Config, MiB, human, log
from .contenders import Snapfs
from .procs import shielded, wait_until
from .realdev import loop_device
from .report import Row
from .scratch import forget, make_random_file

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SCALE = 10                 # pgbench scale: ~150 MiB of tables
CLIENTS = 4
QUIET = 8.0                   # seconds of the baseline window
SETTLE = 4.0                  # seconds between a copy and the next window

LOAD_ROWS = [
    Row("load_tps_base", "pgbench tps, no copy", "tps"),
    Row("load_tps_snap", "pgbench tps, snapshot taken, no copy (copy-before-write cost)", "tps"),
    Row("load_tps_image", "pgbench tps during cp of the snapshot image", "tps"),
    Row("load_tps_plain", "pgbench tps during cp of a plain region of the disk", "tps"),
    Row("load_cp_image", "cp of the snapshot image", "s", True),
    Row("load_cp_plain", "cp of the plain region", "s", True),
]


def pg_available() -> bool:
    """PostgreSQL 15 server binaries and pgbench are installed."""
    return (PG_BIN / "initdb").exists() and shutil.which("pgbench") is not None


def run_under_load(cfg: Config, work: Path, res) -> None:
    """The whole section; every mount, loop device and server is gone at the end."""
    work.chmod(0o711)                 # the postgres user must reach its data and socket
    work = work / "load"
    work.mkdir(mode=0o711)
    size = cfg.load_size
    backing = work / "disk.img"
    log(f"backup under load: {human(2 * size)} random file, PostgreSQL on ext4 over snapfs")
    make_random_file(backing, 2 * size)
    try:
        with contextlib.ExitStack() as stack:
            disk = stack.enter_context(loop_device(backing, 0, size))
            plain = stack.enter_context(loop_device(backing, size, size))
            snap = Snapfs(work / "snapfs", disk, size, size)
            snap.start()
            stack.callback(snap.stop)
            pgdev = stack.enter_context(loop_device(snap.device, 0, size))
            pgdata = stack.enter_context(ext4_mounted(pgdev, work / "pgfs"))
            sock = stack.enter_context(postgres(pgdata, work))
            bench = stack.enter_context(pgbench(sock, work, cfg.load_rounds))
            for rnd in range(cfg.load_rounds):
                log(f"backup under load: round {rnd + 1}/{cfg.load_rounds}")
                load_round(snap, disk, plain, size, bench, res)
    finally:
        backing.unlink(missing_ok=True)


def load_round(snap: Snapfs, disk: Path, plain: Path, size: int, bench: "PgBench", res) -> None:
    """Baseline window, image copy, plain copy; their tps and times into ``res``."""
    time.sleep(SETTLE)
    t0 = time.time()
    time.sleep(QUIET)
    res.add("load_tps_base", "snapfs", bench.tps(t0, time.time()))
    snap.take()
    try:
        t0 = time.time()
        time.sleep(QUIET)
        res.add("load_tps_snap", "snapfs", bench.tps(t0, time.time()))
        for path in (disk, snap.image):
            forget(path)
        subprocess.run(["blockdev", "--flushbufs", str(disk)], check=True)
        start, image_s = timed_copy(snap.image)
    finally:
        snap.release()
    res.add("load_tps_image", "snapfs", bench.tps(start, start + image_s))
    res.add("load_cp_image", "snapfs", image_s)
    time.sleep(SETTLE)
    subprocess.run(["blockdev", "--flushbufs", str(plain)], check=True)
    forget(plain)
    start, seconds = timed_copy(plain)
    res.add("load_tps_plain", "snapfs", bench.tps(start, start + seconds))
    res.add("load_cp_plain", "snapfs", seconds)
    log(f"  cp image {image_s:.1f} s, plain {seconds:.1f} s; tps base/snap/image/plain "
        f"{res.samples['load_tps_base']['snapfs'][-1]:.0f}/"
        f"{res.samples['load_tps_snap']['snapfs'][-1]:.0f}/"
        f"{res.samples['load_tps_image']['snapfs'][-1]:.0f}/"
        f"{res.samples['load_tps_plain']['snapfs'][-1]:.0f}")


def timed_copy(path: Path) -> tuple[float, float]:
    """``cp path /dev/null``: (wall-clock start, seconds)."""
    start, t0 = time.time(), time.monotonic()
    subprocess.run(["cp", str(path), "/dev/null"], check=True, timeout=1800)
    return start, time.monotonic() - t0


@contextlib.contextmanager
def ext4_mounted(dev: Path, where: Path):
    """mkfs.ext4 on ``dev``, mounted at ``where``; yields the data directory (owned by
    postgres)."""
    subprocess.run(["mkfs.ext4", "-q", "-F", str(dev)], check=True)
    where.mkdir()
    subprocess.run(["mount", str(dev), str(where)], check=True)
    try:
        data = where / "pgdata"
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        yield data
    finally:
        with shielded():
            subprocess.run(["umount", str(where)], capture_output=True, check=False)


def as_postgres(*cmd: str, **kw) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program as the postgres user (initdb refuses root)."""
    done = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=False,
                          capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise BenchError(f"{Path(cmd[0]).name} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done


@contextlib.contextmanager
def postgres(data: Path, work: Path):
    """initdb + a server on a Unix socket in ``work``; ``pgbench -i``. Yields the socket
    directory; the server is stopped at the end."""
    sock = work / "pgsock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust")
    opts = f"-k {sock} -c listen_addresses='' -c fsync=on -c shared_buffers=64MB"
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(data / "log"), "-w", "start")
    try:
        as_postgres("createdb", "-h", str(sock), "bench")
        as_postgres("pgbench", "-h", str(sock), "-i", "-q", "-s", str(PG_SCALE), "bench", timeout=600)
        yield sock
    finally:
        with shielded():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data),
                            "-m", "immediate", "-w", "stop"], capture_output=True, check=False)


class PgBench:
    """A running ``pgbench -P 1 --progress-timestamp``; tps over a wall-clock window."""

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

    def tps(self, start: float, end: float) -> float:
        """Mean tps of the one-second intervals that end inside (start, end + 1]."""
        wait_until(lambda: any(t > end + 1 for t, _ in self.samples()) or self.proc.poll() is not None,
                   10, "pgbench progress")
        inside = [tps for t, tps in self.samples() if start < t <= end + 1]
        if not inside:
            raise BenchError(f"no pgbench progress between {start:.0f} and {end:.0f}")
        return sum(inside) / len(inside)


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
    """The section's table: medians and every sample, and the two target ratios."""
    med = {row.key: res.median(row.key, "snapfs") for row in LOAD_ROWS}
    lines = [f"backup under load: pgbench ({CLIENTS} clients, scale {PG_SCALE}) on ext4 over a loop "
             f"device over a snapfs device of {human(cfg.load_size)} (source: a --direct-io=on loop "
             f"device), {cfg.load_rounds} round(s), medians", "",
             "| measure | unit | median | samples |", "|---|---|---|---|"]
    for row in LOAD_ROWS:
        samples = ", ".join(f"{v:.1f}" for v in res.samples.get(row.key, {}).get("snapfs", []))
        value = "fail" if med[row.key] is None else f"{med[row.key]:.1f}"
        lines.append(f"| {row.label} | {row.unit} | {value} | {samples} |")
    if all(med.values()):
        lines += ["", f"tps during image copy / during plain copy: "
                  f"{med['load_tps_image'] / med['load_tps_plain']:.2f} (target >= 0.7); "
                  f"image copy time / plain copy time: {med['load_cp_image'] / med['load_cp_plain']:.2f} "
                  f"(target <= 1.5); image copy {size_rate(cfg.load_size, med['load_cp_image'])}, "
                  f"plain {size_rate(cfg.load_size, med['load_cp_plain'])}"]
    return "\n".join(lines)


def size_rate(size: int, seconds: float) -> str:
    """MiB/s of a copy."""
    return f"{size / MiB / seconds:.0f} MiB/s"

