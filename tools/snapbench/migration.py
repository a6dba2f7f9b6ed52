"""Migration under load (issue 23): moving a device that a database uses to new storage,
``snapfs migrate`` side by side with qemu-storage-daemon's ``blockdev-mirror``.

Set-up, once: a --migrate-size disk image with ext4 and a PostgreSQL cluster holding
pgbench's tables (scale 20), sparse where nothing was written. Each round, for snapfs
and QEMU in turn (interleaved, the order alternating: the machine is shared and
noisy): a fresh copy of that image, an uncached loop device (``--direct-io=on``) over
it, the contender over the loop device (snapfs: device ``d``; QEMU: a host_device node
under a raw node exported over FUSE). First, with no load, the copy until ``ready``
(snapfs: ``snapfs migrate --no-complete`` then ``migrate_cancel``; QEMU: with its FUSE
export removed, ``blockdev-mirror`` sync=full write-blocking to a new file until
``BLOCK_JOB_READY``, then ``block-job-cancel`` and the export back). Then a loop
device over the contender's device with the ext4 mounted, the server, ``pgbench`` (4
clients): tps over a quiet window; ``cp`` of the contender's device to a new file in
the scratch directory and ``sync`` of that file (the plain copy under the same load,
made durable as a migration's target is at its pivot); for snapfs the migration
to a new file, copy and pivot (``snapfs migrate d TARGET``). Per copy: its time, and
the median and lowest whole second of pgbench's tps while it ran.

QEMU cannot mirror a device while it exports it writable over FUSE: a writable FUSE
export takes the RESIZE permission and the mirror job does not share it ("Permission
conflict on node ...: permissions 'resize' are both required by an unnamed block device
... and unshared by mirror job", QEMU 7.2; the export code is the same in later
versions), and this machine has no NBD client module for another export. So QEMU's
mirror is measured only without the load.
"""

import contextlib
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from .common import BenchError, Config, human, log
from .contenders import Snapfs
from .pg import CLIENTS, PG_SCALE, mounted, server
from .procs import tail
from .qemu import Qemu
from .realdev import loop_device, uncache
from .report import Row
from .underload import QUIET, SETTLE, pgbench

WHO = ("snapfs", "qemu")
MIG_ROWS = [Row("mig_idle_ready", "no load: copy until ready (snapfs migrate / blockdev-mirror)", "s", True),
            Row("mig_base", "pgbench tps, no copy (median second)", "tps"),
            Row("mig_cp_time", "cp of the device to a new file, then sync of it: time", "s", True),
            Row("mig_cp_med", "cp of the device: tps, median second", "tps"),
            Row("mig_cp_min", "cp of the device: tps, lowest whole second", "tps"),
            Row("mig_time", "migration to a new file, pivot included: time", "s", True),
            Row("mig_med", "migration: tps, median second", "tps"),
            Row("mig_min", "migration: tps, lowest whole second", "tps"),
            Row("mig_block", "migration: device writes held at the pivot", "ms", True),
            Row("mig_time_ratio", "migration time / cp + sync time (same round)", "x", True),
            Row("mig_med_ratio", "migration median tps / baseline (same round)", "x"),
            Row("mig_min_ratio", "migration lowest second / baseline (same round)", "x")]


class QemuMirror(Qemu):
    """qemu-storage-daemon over a block device (host_device), migrated by
    blockdev-mirror to a new file."""

    driver = "host_device"

    def mirror_until_ready(self, target: Path) -> None:
        """Without the FUSE export (see the module docstring): blockdev-mirror ``live``
        to a raw node over ``target`` (a new file of the device's size), write-blocking,
        until ready; returns then (``cancel_mirror`` ends it)."""
        self._del_export("exp-live")
        with open(target, "wb") as f:
            f.truncate(self.size)
        self.qmp.execute("blockdev-add", {"driver": "file", "node-name": "mtgt-file",
                                          "filename": str(target)})
        self.qmp.execute("blockdev-add", {"driver": "raw", "node-name": "mtgt", "file": "mtgt-file"})
        self.qmp.execute("blockdev-mirror", {"job-id": "mig", "device": "live", "target": "mtgt",
                                             "sync": "full", "copy-mode": "write-blocking"})
        self._wait_job("BLOCK_JOB_READY")

    def _wait_job(self, *names: str) -> dict:
        """The next event of job ``mig`` named one of ``names`` (block job events name
        the job in ``data.device``); BenchError when the job ends otherwise."""
        while True:
            for i, ev in enumerate(self.qmp.events):
                if ev.get("data", {}).get("device") != "mig":
                    continue
                del self.qmp.events[i]
                if ev.get("event") in names:
                    return ev
                if ev.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"):
                    raise BenchError(f"blockdev-mirror ended: {ev}")
                break
            else:
                self.qmp.events.append(self.qmp._recv())

    def cancel_mirror(self) -> None:
        """block-job-cancel of the ready mirror (no pivot), its nodes deleted, the
        export back."""
        self.qmp.execute("block-job-cancel", {"device": "mig"})
        self._wait_job("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        for node in ("mtgt", "mtgt-file"):
            self.qmp.execute("blockdev-del", {"node-name": node})
        self.qmp.execute("block-export-add", {"type": "fuse", "id": "exp-live", "node-name": "live",
                                              "mountpoint": str(self.live), "writable": True})


def run_migration_bench(cfg: Config, work: Path, res) -> None:
    """The whole section; every mount, loop device and server is gone at the end."""
    work.chmod(0o711)                 # the postgres user must reach its data and socket
    mdir = work / "migrate"
    mdir.mkdir(mode=0o711)
    try:
        base = make_base(cfg, mdir)
        for rnd in range(cfg.migrate_rounds):
            for who in (WHO if rnd % 2 == 0 else WHO[::-1]) if cfg.qemu else WHO[:1]:
                log(f"migration under load: round {rnd + 1}/{cfg.migrate_rounds}, {who}")
                try:
                    migrate_round(cfg, mdir / f"{who}-{rnd}", base, who, res)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    for row in MIG_ROWS:
                        res.fail(row.key, who, exc)
    finally:
        shutil.rmtree(mdir, ignore_errors=True)


def make_base(cfg: Config, mdir: Path) -> Path:
    """The disk image every round starts from: ext4 with pgbench's tables."""
    base = mdir / "base.img"
    with open(base, "wb") as f:
        f.truncate(cfg.migrate_size)
    log(f"migration under load: {human(cfg.migrate_size)} disk, PostgreSQL (pgbench scale {PG_SCALE})")
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(loop_device(base, direct=False))
        pgdata = stack.enter_context(mounted(dev, mdir / "basefs", mkfs=True))
        stack.enter_context(server(pgdata, mdir, init=True))
    return base


def migrate_round(cfg: Config, rdir: Path, base: Path, who: str, res) -> None:
    """One contender, one round: the copy until ready with no load; then baseline, cp
    under load and (snapfs) the migration under load."""
    rdir.mkdir(mode=0o711)
    disk = rdir / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(base), str(disk)], check=True)
    os.sync()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, rdir, True)
        loop = stack.enter_context(loop_device(disk))
        c = Snapfs(rdir / "snapfs", loop, cfg.migrate_size, cfg.migrate_size) if who == "snapfs" \
            else QemuMirror(rdir / "qemu", loop, cfg.migrate_size)
        c.start()
        stack.callback(c.stop)
        res.add("mig_idle_ready", who, idle_ready(c, loop, rdir / "idle.img"))
        pgdev = stack.enter_context(loop_device(c.device, direct=False))
        pgdata = stack.enter_context(mounted(pgdev, rdir / "pgfs"))
        sock = stack.enter_context(server(pgdata, rdir))
        bench = stack.enter_context(pgbench(sock, rdir, 1))
        try:
            time.sleep(SETTLE)
            t0 = time.time()
            time.sleep(QUIET)
            base_tps = statistics.median(bench.seconds(t0, time.time()))
            uncache(loop)
            plain = rdir / "plain.img"         # durable, as a migration's target is at the pivot
            cp = timed(bench, ["sh", "-c", f"cp {c.device} {plain} && sync {plain}"])
            (rdir / "plain.img").unlink()
            if who == "snapfs":
                time.sleep(SETTLE)
                uncache(loop)
                mig = timed(bench, c.cli_args("migrate", "d", str(rdir / "target.img")))
                held = c.ctl("migrate_info d")["write_block_ms"]
        except BaseException:
            log(f"  {who}: end of pgbench.log: {tail(rdir / 'pgbench.log', 600)}")
            raise
    figures = {"mig_base": base_tps, "mig_cp_time": cp[0], "mig_cp_med": cp[1], "mig_cp_min": cp[2]}
    if who == "snapfs":
        figures |= {"mig_time": mig[0], "mig_med": mig[1], "mig_min": mig[2], "mig_block": held,
                    "mig_time_ratio": mig[0] / cp[0], "mig_med_ratio": mig[1] / base_tps,
                    "mig_min_ratio": mig[2] / base_tps}
    for key, value in figures.items():
        res.add(key, who, value)
    log(f"  {who}: idle copy until ready {res.samples['mig_idle_ready'][who][-1]:.1f} s; base "
        f"{base_tps:.0f} tps; cp {cp[0]:.1f} s (tps {cp[1]:.0f}, min {cp[2]:.0f})"
        + (f"; migration {mig[0]:.1f} s (tps {mig[1]:.0f}, min {mig[2]:.0f})" if who == "snapfs" else ""))


def idle_ready(c, loop: Path, target: Path) -> float:
    """Seconds from the start of a migration of the uncached device with no load until
    it is ready; the migration is then cancelled (the device stays where it was)."""
    uncache(loop)
    t0 = time.monotonic()
    if isinstance(c, QemuMirror):
        c.mirror_until_ready(target)
        seconds = time.monotonic() - t0
        c.cancel_mirror()
    else:
        c.cli("migrate", "--no-complete", "d", str(target))
        seconds = time.monotonic() - t0
        c.ctl("migrate_cancel d")
    target.unlink(missing_ok=True)
    return seconds


def timed(bench, what, *args) -> tuple[float, float, float]:
    """Run ``what`` (a command line, or a callable with ``args``) under the load:
    (seconds, median tps, lowest whole second's tps) while it ran."""
    start, t0 = time.time(), time.monotonic()
    if callable(what):
        what(*args)
    else:
        done = subprocess.run(what, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(map(str, what))} failed: {(done.stderr or done.stdout)[-500:]}")
    seconds = time.monotonic() - t0
    tps = bench.seconds(start, start + seconds)
    return seconds, statistics.median(tps), min(tps)


def migration_table(res, cfg: Config) -> str:
    """Medians over rounds of each row, every sample, and the targets."""
    lines = [f"migration under load: pgbench ({CLIENTS} clients, scale {PG_SCALE}) on ext4 over a "
             f"{human(cfg.migrate_size)} device (an uncached --direct-io=on loop device) served by snapfs "
             f"or qemu-storage-daemon, {cfg.migrate_rounds} interleaved round(s), medians of rounds "
             "(a shared 2-core machine: compare ratios). QEMU cannot mirror a device it exports "
             "writable over FUSE (resize permission conflict), so its mirror runs without the load", "",
             "| measure | unit | snapfs | qemu | snapfs samples | qemu samples |",
             "|---|---|---|---|---|---|"]
    for row in MIG_ROWS:
        cells = []
        for who in WHO:
            m = res.median(row.key, who)
            cells.append("-" if m is None else f"{m:.2f}" if row.unit == "x" else f"{m:.1f}")
        samples = [", ".join(f"{v:.2f}" for v in res.samples.get(row.key, {}).get(who, [])) for who in WHO]
        lines.append(f"| {row.label} | {row.unit} | {' | '.join(cells)} | {' | '.join(samples)} |")
    t, med = (res.median(k, "snapfs") for k in ("mig_time_ratio", "mig_med_ratio"))
    lowest = min(res.samples.get("mig_min_ratio", {}).get("snapfs", []) or [float("nan")])
    lines += ["", "targets (snapfs): " + ("not measured" if t is None else
              f"time / cp's {t:.2f} (<= 2: {'met' if t <= 2 else 'NOT met'}); median tps / baseline "
              f"{med:.2f} (>= 0.5: {'met' if med >= 0.5 else 'NOT met'}); lowest second / baseline, "
              f"lowest round {lowest:.2f} (>= 0.3: {'met' if lowest >= 0.3 else 'NOT met'})")]
    idle = [res.median("mig_idle_ready", who) for who in WHO]
    if None not in idle:
        lines.append(f"no load, copy until ready: snapfs / QEMU time {idle[0] / idle[1]:.2f} (lower: faster)")
    return "\n".join(lines)
