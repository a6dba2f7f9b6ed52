"""The end of a soak: every kept point restores, its ext4 is ``e2fsck -fn`` clean and
PostgreSQL started on it holds the TPC-B invariant; the daemon's memory and descriptor
slopes; the last line's figures."""

import contextlib
import json
import shutil
import time
from pathlib import Path

from snapbench.pg import PG_BIN, as_postgres

from .agents import World, snapfs_cmd
from .common import SoakError, log, run
from .stack import DEVICE

INVARIANT = ("select (select sum(abalance) from pgbench_accounts), "
             "(select sum(tbalance) from pgbench_tellers), (select sum(bbalance) from pgbench_branches), "
             "(select coalesce(sum(delta), 0) from pgbench_history)")


def kept_points(world: World) -> list[str]:
    done = run(snapfs_cmd("backup", "list", "--json", str(world.repo)), 300)
    return [p["point"] for p in json.loads(done.stdout)]


def check_points(world: World, cdp_sha) -> None:
    """Restore each kept point into a new file, e2fsck -fn it, check TPC-B on it.
    ``cdp_sha``: None, or (point, sha256 of the CDP view of its mark) to compare with."""
    target = world.stack.work / "restored.img"
    for point in kept_points(world):
        start = time.time()
        target.unlink(missing_ok=True)
        try:
            run(snapfs_cmd("backup", "restore", str(world.repo), point, DEVICE, str(target)), 1800)
        except SoakError as exc:
            world.ledger.check("kept point restores", False, str(exc))
            continue
        world.ledger.check("kept point restores", True)
        if cdp_sha and cdp_sha[0] == point:
            sha = run(["sha256sum", str(target)], 1800).stdout.split()[0]
            world.ledger.check("CDP view equals the restored point", sha == cdp_sha[1], f"point {point}")
        fsck = run(["e2fsck", "-fn", str(target)], 900, check=False)
        world.ledger.check("restored ext4 e2fsck -fn clean", fsck.returncode == 0,
                           f"point {point}: exit {fsck.returncode} {fsck.stdout[-300:]}")
        try:
            sums = tpcb_sums(world, target)
            world.ledger.check("TPC-B invariant on the restored point", len(set(sums)) == 1,
                               f"{point}: {sums}")
        except SoakError as exc:
            world.ledger.check("TPC-B invariant on the restored point", False, f"{point}: {exc}")
        log(f"point {point} checked in {time.time() - start:.0f} s")


def tpcb_sums(world: World, image: Path) -> list[str]:
    """PostgreSQL on a restored image (crash recovery from its WAL): the four sums."""
    work = world.stack.work
    where, sock = work / "check", work / "checksock"
    where.mkdir(exist_ok=True)
    sock.mkdir(exist_ok=True)
    shutil.chown(sock, "postgres", "postgres")
    world.stack.pglogs.mkdir(exist_ok=True)
    loop = run(["losetup", "--find", "--show", str(image)], 60).stdout.strip()
    try:
        run(["mount", loop, str(where)], 120)
        data = where / "pgdata"
        try:
            (data / "postmaster.pid").unlink(missing_ok=True)   # the live server's
            opts = f"-k {sock} -c listen_addresses='' -c shared_buffers=32MB"
            as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                        str(world.stack.pglogs / "pg-check.log"), "-w", "-t", "600", "start", timeout=660)
            try:
                return world.stack.psql(INVARIANT, sock).split("|")
            finally:
                as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop", timeout=120)
        finally:
            unmount(where)
    except Exception as exc:
        raise SoakError(str(exc)) from exc
    finally:
        detach(loop, image)


def unmount(where: Path) -> None:
    """umount, retried while busy (PostgreSQL's last processes exiting); SoakError if
    it stays mounted: a filesystem left on the image would write into the next one."""
    for _ in range(100):
        if run(["umount", str(where)], 120, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise SoakError(f"{where} stayed mounted")


def detach(loop: str, image: Path) -> None:
    """losetup -d, then wait until no loop device is over ``image`` (a detach is
    asynchronous while the device is still open)."""
    run(["losetup", "-d", loop], 60, check=False)
    for _ in range(150):
        if not run(["losetup", "-j", str(image)], 60, check=False).stdout.strip():
            return
        time.sleep(0.2)
    raise SoakError(f"a loop device still holds {image}")


# Seconds of each daemon life left out of the RSS slope: the issue's "after the first
# 10 minutes", for every daemon a kill or restart starts afresh. A new daemon's memory
# fills bounded pools and caches (the journal's index rebuilt, pyfuse3's 1 MiB request
# buffers, AIO buffers, the allocator's arenas) over about that long (README, "Soak").
WARM = 600


def slope(samples: list, skip_until: float, life_starts: dict, warm: float = 60) -> float | None:
    """Growth per hour of a sampled value, pooled over the daemon's lives (each life its
    own intercept): samples after ``skip_until`` and ``warm`` s into their life. None
    without two such samples in one life. ``samples``: (time, life, value)."""
    lives: dict = {}
    for t, life, value in samples:
        if t >= skip_until and t >= life_starts.get(life, 0) + warm:
            lives.setdefault(life, []).append((t, value))
    num = den = 0.0
    for points in lives.values():
        if len(points) < 2:
            continue
        mt = sum(t for t, _ in points) / len(points)
        mv = sum(v for _, v in points) / len(points)
        num += sum((t - mt) * (v - mv) for t, v in points)
        den += sum((t - mt) ** 2 for t, _ in points)
    return num / den * 3600 if den else None


def daemon_log_clean(world: World) -> None:
    with contextlib.suppress(OSError):
        text = world.stack.log.read_text(errors="replace")
        bad = [w for w in ("Traceback", "internal error", "CRITICAL") if w in text]
        world.ledger.check("no traceback in the daemon's log", not bad, f"{bad} in {world.stack.log}")
