"""What runs beside pgbench: the backup agent (create every interval, verify each
point, prune), the snapshot agent (take/cp/destroy at random times, and a snapshot held
until its storage overflows) and the sampler (the daemon's RSS and open descriptors).

One device is in at most one snapshot, so the two agents take turns on ``World.slot``;
the main thread takes it too for a clean restart and for the recovery after a kill.
The kill itself does not wait for it: an operation that overlaps a kill window may
fail (``World.excused``), any other failure is a failed check."""

import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snapfs.errors import SnapfsError

from .common import Ledger, MiB, SoakError, ctl, ctl_ok, log, run
from .stack import DEVICE, Stack, snapfs_exe


@dataclass
class Plan:
    """Intervals in seconds, scaled from the 60-minute run by cli.plan."""

    minutes: float
    backup_every: float
    audit_every: int
    prune_every: float
    snapshot_mean: float
    overflow_every: float
    kills: list
    restarts: list
    migrate_every: float


@dataclass
class World:
    """What the threads share."""

    stack: Stack
    plan: Plan
    ledger: Ledger
    repo: Path
    slot: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    kill_windows: list = field(default_factory=list)      # [start, end or None]
    points: list = field(default_factory=list)            # manifests of points made
    bytes_read: int = 0
    snapshots: int = 0
    overflows: int = 0
    killed_since_point: bool = False
    samples: list = field(default_factory=list)           # (time, life, rss MiB, fds, index MiB)
    cdp_on: bool = False                                  # a journal runs: the sampler reads its index size
    life: int = 0                                         # daemon starts so far
    life_starts: dict = field(default_factory=dict)       # life -> its start time
    t0: float = 0.0                                       # when the workload began
    create_point: Callable | None = None                  # extras.marked_backup when CDP is on

    def excused(self, start: float, end: float) -> bool:
        """Whether [start, end] overlaps a kill window (a failure is then expected)."""
        return any(s <= end and (e is None or e >= start) for s, e in self.kill_windows)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the run ends; True if it did not."""
        return not self.stop.wait(max(0.0, seconds))


def snapfs_cmd(*args: str) -> list[str]:
    return [snapfs_exe(), *args]


def attempt(world: World, name: str, fn) -> None:
    """Run one agent operation; record its check unless a kill excuses its failure."""
    start = time.time()
    try:
        fn()
    except Exception as exc:
        if world.excused(start, time.time()):
            log(f"{name} failed in a kill window (expected): {str(exc)[:200]}")
            return
        world.ledger.check(name, False, str(exc)[:500])
        return
    world.ledger.check(name, True)


# ----- backups -------------------------------------------------------------------------

def backup_agent(world: World) -> None:
    """create every ``backup_every`` s (a --cbt-audit every ``audit_every``th), verify
    each point, prune --keep-last 20 every ``prune_every`` s."""
    plan, n, last_prune = world.plan, 0, time.time()
    next_at = time.time() + plan.backup_every / 2
    while world.sleep(next_at - time.time()):
        next_at += plan.backup_every
        n += 1
        with world.slot:
            if world.stop.is_set():
                return
            audit = n % plan.audit_every == 0
            attempt(world, "backup create", lambda a=audit: backup_once(world, a))
        if world.points:
            point = world.points[-1]["point"]
            attempt(world, "backup verify", lambda p=point: run(
                snapfs_cmd("backup", "verify", str(world.repo), p), 1800))
        if time.time() - last_prune >= plan.prune_every:
            last_prune = time.time()
            attempt(world, "backup prune", lambda: run(
                snapfs_cmd("backup", "prune", str(world.repo), "--keep-last", "20"), 1800))


def create_result(code: int, stdout: str, stderr: str) -> dict:
    """The manifest ``backup create --json`` printed; SoakError if it failed (exit 4: the
    CBT audit caught a change CBT had missed)."""
    if code == 4:
        raise SoakError(f"CBT AUDIT FAILED: {stderr.strip()[-500:]}")
    if code:
        raise SoakError(f"backup create exited {code}: {stderr.strip()[-500:]}")
    return json.loads(stdout)


def backup_once(world: World, audit: bool) -> None:
    """One point; checks its mode: full (with a reason) first and after a kill,
    incremental otherwise (a clean restart keeps CBT)."""
    killed = world.killed_since_point
    cmd = snapfs_cmd("backup", "create", "--json", "-m", str(world.stack.mnt), "--storage",
                     str(world.stack.work), str(world.repo), DEVICE) + (["--cbt-audit"] if audit else [])
    if world.create_point is not None:
        manifest = world.create_point(world, cmd)
    else:
        done = run(cmd, 1800, check=False)
        manifest = create_result(done.returncode, done.stdout, done.stderr)
    world.points.append(manifest)
    world.killed_since_point = False
    dev = manifest["devices"][DEVICE]
    world.bytes_read += manifest["stats"]["bytes_read"]
    log(f"point {manifest['point']}: {dev['mode']}, read {dev['bytes_read'] >> 20} MiB"
        + (f" ({dev['reason']})" if dev.get("reason") else "") + (", audited" if audit else ""))
    first = len(world.points) == 1
    if first or killed:
        world.ledger.check("full read after a crash, with its reason",
                           dev["mode"] == "full" and bool(dev["reason"]),
                           f"point {manifest['point']}: {dev['mode']} {dev.get('reason')}")
    else:
        world.ledger.check("incremental by CBT", dev["mode"] == "incremental",
                           f"point {manifest['point']}: {dev['mode']} ({dev.get('reason')})")


# ----- snapshots ----------------------------------------------------------------------

def snapshot_agent(world: World) -> None:
    """Take, cp to /dev/null and destroy a snapshot at random times (exponential gaps,
    mean ``snapshot_mean`` s); every ``overflow_every`` s, hold one until it overflows."""
    plan = world.plan
    next_overflow = time.time() + plan.overflow_every / 2
    while world.sleep(random.expovariate(1 / plan.snapshot_mean)):
        with world.slot:
            if world.stop.is_set():
                return
            attempt(world, "snapshot take/cp/destroy", lambda: take_copy_destroy(world))
            if time.time() >= next_overflow:
                next_overflow += plan.overflow_every
                attempt(world, "snapshot overflow", lambda: overflow(world))


def take_copy_destroy(world: World) -> None:
    mnt = str(world.stack.mnt)
    snap = ctl_ok(mnt, f"snapshot_create {world.stack.work} 4G {DEVICE}")["id"]
    try:
        ctl_ok(mnt, f"snapshot_take {snap}" + random.choice(["", " nofreeze"]), timeout=120)
        run(["cp", f"{mnt}/snapshots/{snap}/{DEVICE}", "/dev/null"], 900)
    finally:
        ctl(mnt, f"snapshot_destroy {snap}")
    world.snapshots += 1


def overflow(world: World) -> None:
    """A snapshot with a 16 MiB storage limit, 64 MiB written to ext4 meanwhile: the
    snapshot must report ``no_space`` and its image fail (EIO), while the original
    (and pgbench) carries on."""
    mnt, stack = str(world.stack.mnt), world.stack
    snap = ctl_ok(mnt, f"snapshot_create {stack.work} 16M {DEVICE}")["id"]
    filler = stack.data / "overflow.bin"
    try:
        ctl_ok(mnt, f"snapshot_take {snap} nofreeze", timeout=120)
        run(["dd", "if=/dev/urandom", f"of={filler}", "bs=1M", "count=64", "conv=fsync"], 600)
        event = ctl(mnt, f"snapshot_waitevent {snap} 30000", timeout=60)
        world.ledger.check("overflow: no_space event", (event.get("event") or {}).get("event") == "no_space",
                           str(event))
        info = ctl_ok(mnt, f"snapshot_info {DEVICE}")
        world.ledger.check("overflow: image marked corrupted", info.get("error_code", 0) < 0, str(info))
        image = run(["dd", f"if={mnt}/snapshots/{snap}/{DEVICE}", "of=/dev/null", "bs=1M", "iflag=direct"],
                    900, check=False)
        world.ledger.check("overflow: image reads fail", image.returncode != 0, image.stderr[-300:])
    finally:
        ctl(mnt, f"snapshot_destroy {snap}")
        filler.unlink(missing_ok=True)
    world.overflows += 1


# ----- the sampler ----------------------------------------------------------------------

def sampler(world: World, every: float = 10) -> None:
    """The daemon's VmRSS (MiB), open descriptors and, with CDP on, the journal index's
    memory (``cdp_info``'s ``index_bytes``, MiB; bounded by the journal's LIMIT, so the
    RSS net of it is what must stay flat) every ``every`` s."""
    while world.sleep(every):
        proc = world.stack.proc
        if proc is None or proc.poll() is not None:
            continue
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        except (OSError, StopIteration):
            continue
        index = 0.0
        if world.cdp_on:
            try:
                info = ctl(str(world.stack.mnt), f"cdp_info {DEVICE}")
            except (OSError, ValueError, SoakError, SnapfsError):   # the daemon died or
                continue                                          # restarts meanwhile
            if not info.get("ok"):
                continue
            index = info.get("index_bytes", 0) / MiB
        world.samples.append((time.time(), world.life, rss, fds, index))
