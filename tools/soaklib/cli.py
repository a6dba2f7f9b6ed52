"""The soak's command line and run.

    .venv/bin/python tools/soak --minutes N [--workdir DIR] [--scale S] [--seed N] [--keep]

pgbench runs the whole time on ext4 over a loop device over a snapfs device whose
source is a 2 GiB ``--direct-io=on`` loop device; meanwhile the agents (agents.py) make
backups, snapshots and overflows, and the main thread kills the daemon (SIGKILL, then
the operator's recovery) and restarts it cleanly on a schedule scaled from the 60-minute
run (``plan``). The end checks are in final.py. The last line on stdout has the
figures; the exit code is 0 only when every check held, 1 otherwise, 2 when the soak
could not run."""

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from snapbench.pg import pg_available
from snapbench.procs import shielded
from snapbench.scratch import remove_scratch

from . import extras, final
from .agents import Plan, World, backup_agent, sampler, snapfs_cmd, snapshot_agent
from .bench import Pgbench
from .common import GiB, Ledger, SoakError, log, run
from .stack import DEVICE, Stack

# not /var/tmp, /mnt or /srv: tests/test_docs.py detaches the loop devices over files there
# that appeared during its run, and other worktrees' test suites run on this machine too
WORKDIR = "/var/lib/snapfs-soak"
GAP = 25            # seconds at least between two disruptions (kill, clean restart)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60, help="how long the workload runs (default 60)")
    p.add_argument("--workdir", default=WORKDIR, help=f"where the scratch directory goes (default {WORKDIR})")
    p.add_argument("--scale", type=int, help="pgbench scale (default 20 for 30 minutes or more, else 5)")
    p.add_argument("--seed", type=int, help="random seed (default: time)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, repository)")
    p.add_argument("--samples", metavar="FILE", help="write the samples as JSON: the daemon's RSS and "
                   "descriptors, pgbench's tps per second, the kill windows, the points")
    return p.parse_args(argv)


def spread(count: int, total: float, lo: float, hi: float) -> list[float]:
    """``count`` times, one at a random fraction in [lo, hi] of each of ``count`` equal slices."""
    size = total / count
    return [i * size + random.uniform(lo, hi) * size for i in range(count)]


def plan(minutes: float) -> Plan:
    """Intervals of the 60-minute run, scaled so that a 3-minute run still has at least
    two backups (one incremental), a take/cp/destroy, an overflow, a kill and a restart."""
    total = minutes * 60
    kills = spread(max(1, round(minutes / 15)), total * 0.9, 0.3, 0.7)
    restarts = spread(max(1, round(minutes / 20)), total * 0.9, 0.45, 0.55)
    events, last = [], -GAP
    for t, kind in sorted([(t, "kill") for t in kills] + [(t, "restart") for t in restarts]):
        t = max(t, last + GAP, 20.0)
        events.append((t, kind))
        last = t
    return Plan(minutes=minutes, backup_every=min(60.0, max(15.0, minutes)),
                audit_every=10 if minutes >= 30 else 3,
                prune_every=10 * minutes, snapshot_mean=max(20.0, 2 * minutes), overflow_every=20 * minutes,
                kills=[t for t, k in events if k == "kill"],
                restarts=[t for t, k in events if k == "restart"],
                migrate_every=30 * minutes)


def history_check(world: World, bench: Pgbench) -> None:
    """Committed transactions (pgbench's count, over all segments) <= pgbench_history rows."""
    rows = int(world.stack.psql("select count(*) from pgbench_history"))
    committed = bench.committed()
    world.ledger.check("no committed transaction lost", committed <= rows,
                       f"pgbench committed {committed}, pgbench_history has {rows} rows")
    log(f"pgbench committed {committed} transactions so far; pgbench_history has {rows} rows")


def after_start(world: World, features: dict) -> None:
    world.life += 1
    world.life_starts[world.life] = time.time()
    if features.get("cdp"):
        extras.cdp_ensure(world)


def kill_and_recover(world: World, bench: Pgbench, features: dict) -> None:
    """SIGKILL mid-pgbench, then the operator: stop PostgreSQL, ext4 and its loop down,
    snapfs started as the unit would, e2fsck -p, mount, PostgreSQL (crash recovery)."""
    window = [time.time(), None]
    world.kill_windows.append(window)
    bench.segments[-1].kill_at = window[0]
    world.killed_since_point = True
    log("SIGKILL of the daemon")
    world.stack.kill_daemon()
    time.sleep(3)                                # PostgreSQL and pgbench notice
    with world.slot:
        world.stack.pg_stop("immediate")
        check_segment(world, bench.wait(extra=60))
        world.stack.ext4_down()
        world.stack.up(fsck=True)
        after_start(world, features)
        history_check(world, bench)
        window[1] = time.time()
    log(f"recovered in {window[1] - window[0]:.0f} s")


def clean_restart(world: World, bench: Pgbench, features: dict) -> None:
    """The workload stopped first (pgbench ended its segment), then SIGTERM: exit 0."""
    with world.slot:
        code = world.stack.down_clean()
        world.ledger.check("clean stop exits 0", code == 0, f"exit {code}")
        world.stack.up()
        after_start(world, features)
        history_check(world, bench)
    log("clean restart done")


def timeline(world: World, bench: Pgbench, features: dict, t0: float) -> None:
    """pgbench segments between the disruptions, which happen at their planned times."""
    events = sorted([(t, "kill") for t in world.plan.kills] + [(t, "restart") for t in world.plan.restarts])
    end = t0 + world.plan.minutes * 60
    for at, kind in events:
        at = t0 + at
        if kind == "kill":
            bench.start(int(at - time.time()) + 60)
            time.sleep(max(0.0, at - time.time()))
            kill_and_recover(world, bench, features)
        else:
            if at > time.time() + 1:
                bench.start(int(at - time.time()))
                check_segment(world, bench.wait())
            clean_restart(world, bench, features)
    if end > time.time() + 1:
        bench.start(int(end - time.time()))
        check_segment(world, bench.wait())


def check_segment(world: World, seg) -> None:
    """No pgbench error before the kill (a segment without one must also exit 0)."""
    world.ledger.check("pgbench without errors outside kill windows",
                       (seg.kill_at is not None or seg.exit_code == 0) and not seg.errors_outside_kill(),
                       f"exit {seg.exit_code}: {seg.errors_outside_kill()[:3]}")


def agents(world: World, features: dict) -> list[threading.Thread]:
    targets = [backup_agent, snapshot_agent, sampler]
    if features.get("migrate"):
        targets.append(migrate_agent)
    threads = [threading.Thread(target=guarded, args=(world, t), name=t.__name__, daemon=True)
               for t in targets]
    for t in threads:
        t.start()
    return threads


def guarded(world: World, agent) -> None:
    """Run ``agent(world)``; that it ran to the end is a check (an agent that died, e.g.
    the sampler, would leave its figures silently empty)."""
    try:
        agent(world)
    except Exception as exc:
        world.ledger.check(f"agent {agent.__name__} ran to the end", False, f"{type(exc).__name__}: {exc}")
        raise
    world.ledger.check(f"agent {agent.__name__} ran to the end", True)


def migrate_agent(world: World) -> None:
    from .agents import attempt
    while world.sleep(world.plan.migrate_every / 2 if world.life <= 1 else world.plan.migrate_every):
        with world.slot:
            if world.stop.is_set():
                return
            attempt(world, "migration back and forth", lambda: extras.migrate_round_trip(world))


def detect(world: World) -> dict:
    """Which optional features the daemon knows; a note for each one it does not."""
    mnt = str(world.stack.mnt)
    features = {"cdp": extras.known(mnt, "cdp_start"), "migrate": extras.known(mnt, "migrate_start")}
    for name, issue in (("cdp", 22), ("migrate", 23)):
        if not features[name]:
            log(f"NOTE: the daemon does not know {name}_start (issue {issue} not landed): "
                "its phase is skipped")
    return features


def end_checks(world: World, bench: Pgbench, features: dict) -> None:
    history_check(world, bench)
    world.stack.pg_stop("fast")            # first: the view below then reads a quiet device
    cdp_sha = None
    if features.get("cdp"):
        point = extras.pick_marked_point(world, set(final.kept_points(world)))
        if point is None:
            log("NOTE: no kept CDP-marked point; the view check is skipped")
        else:
            try:
                cdp_sha = (point["point"], extras.cdp_view_sha(world, point["cdp_mark"]))
            except SoakError as exc:       # a failed check; the points are still checked
                world.ledger.check("CDP view readable", False, str(exc))
    final.check_points(world, cdp_sha)
    world.stack.ext4_down()
    code = world.stack.stop_daemon()
    world.ledger.check("clean stop exits 0", code == 0, f"exit {code}")
    final.daemon_log_clean(world)


def save_samples(path: str, world: World, bench: Pgbench) -> None:
    doc = {"t0": world.t0, "daemon": [{"time": t, "life": life, "rss_mib": r, "fds": f, "cdp_index_mib": x}
                                      for t, life, r, f, x in world.samples],
           "tps": [{"time": t, "tps": v, "kill_segment": s.kill_at is not None}
                   for s in bench.segments for t, v in s.tps],
           "kill_windows": world.kill_windows, "life_starts": world.life_starts,
           "points": [{k: p.get(k) for k in ("point", "unix_time", "stats")} | {"disk0": p["devices"][DEVICE]}
                      for p in world.points]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def per_hour(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def figures(world: World, bench: Pgbench) -> str:
    skip = world.t0 + (600 if world.plan.minutes >= 30 else 60)
    rss = [(t, life, r) for t, life, r, _, _ in world.samples]
    net = [(t, life, r - x) for t, life, r, _, x in world.samples]
    fds = [(t, life, f) for t, life, _, f, _ in world.samples]
    ok = world.ledger.failed() == 0
    return (f"soak {'PASSED' if ok else 'FAILED'}: {world.plan.minutes:g} min, "
            f"points made {len(world.points)}, "
            f"bytes read {world.bytes_read / GiB:.2f} GiB, restarts {world.life - 1} "
            f"({len(world.kill_windows)} after SIGKILL), snapshots {world.snapshots}, "
            f"overflows {world.overflows}, "
            f"max RSS {max((r for *_, r in rss), default=0):.1f} MiB, "
            f"RSS slope {per_hour(final.slope(rss, skip, world.life_starts, final.WARM))} MiB/h "
            f"(net of the CDP index {per_hour(final.slope(net, skip, world.life_starts, final.WARM))}; "
            f"from 5 min into each life {per_hour(final.slope(rss, skip, world.life_starts, 300))}, "
            f"from 1 min {per_hour(final.slope(rss, skip, world.life_starts, 60))}), "
            f"max fds {max((f for *_, f in fds), default=0)}, "
            f"fd slope {per_hour(final.slope(fds, skip, world.life_starts), 1)}/h, "
            f"committed {bench.committed()}, lowest 1-s tps {bench.lowest_tps():.0f}, "
            f"checks passed {world.ledger.passed()}, failed {world.ledger.failed()}")


def soak(args, work: Path) -> tuple[World, Pgbench]:
    scale = args.scale or (20 if args.minutes >= 30 else 5)
    stack = Stack(work, 2 * GiB, scale)
    world = World(stack=stack, plan=plan(args.minutes), ledger=Ledger(), repo=work / "repo")
    bench = Pgbench(str(stack.sock))
    log(f"soak in {work}: {args.minutes:g} min, pgbench scale {scale}, "
        f"kills at {[round(t) for t in world.plan.kills]} s, "
        f"clean restarts at {[round(t) for t in world.plan.restarts]} s")
    try:
        stack.make_source()
        stack.up(first=True)
        run(snapfs_cmd("backup", "init", str(world.repo)), 60)
        features = detect(world)
        if features["cdp"]:
            world.create_point = extras.marked_backup
        world.t0 = time.time()
        after_start(world, features)
        threads = agents(world, features)
        try:
            timeline(world, bench, features, world.t0)
        finally:
            world.stop.set()
            for t in threads:
                t.join(1900)
        end_checks(world, bench, features)
    except Exception as exc:     # SoakError, BenchError (PostgreSQL), anything: reported, cleaned up
        world.ledger.check("the soak ran to its end", False, f"{type(exc).__name__}: {exc}")
    finally:
        stack.teardown()
    return world, bench


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("tools/soak: needs root (loop devices, mounts, PostgreSQL as postgres)", file=sys.stderr)
        return 2
    if not pg_available():
        print("tools/soak: needs PostgreSQL 15 and pgbench (apt-get install postgresql)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # cleanups run (finally)
    random.seed(args.seed if args.seed is not None else time.time_ns())
    os.makedirs(args.workdir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="snapfs-soak-", dir=args.workdir))
    os.chmod(work, 0o755)           # PostgreSQL (user postgres) reaches its data below it
    try:
        world, bench = soak(args, work)
    finally:
        if not args.keep:
            with shielded():
                remove_scratch(work)
    for name, (passed, failed) in sorted(world.ledger.counts.items()):
        log(f"check {name}: {passed} passed, {failed} failed")
    for failure in world.ledger.failures:
        log(f"failed: {failure}")
    if args.samples:
        save_samples(args.samples, world, bench)
    print(figures(world, bench), flush=True)
    return 0 if world.ledger.failed() == 0 else 1
