"""The soak's phases for features that may not have landed yet: a CDP journal on the
whole run (issue 22) and a migration back and forth (issue 23). Each runs only when the
daemon knows its commands (``known``); otherwise the run prints a note and goes on.

CDP check: a backup point made with the journal on is taken inside a freeze the agent
holds itself, with a ``cdp_mark`` in the same freeze, so the mark's instant and the
point show the same quiescent device. At the end, a random past instant picks the
nearest such point; the view of its mark must equal the point restored (final.py)."""

import random
import subprocess
import threading
import time

from .agents import World, create_result
from .common import SoakError, ctl, ctl_ok, log, run
from .stack import DEVICE

# Retention runs within the hour at this size (pgbench fills about 14 MiB/s: 2G held
# 2.5 minutes), and it leaves room for the end's view: a view pins its history, and a
# full journal that cannot drop the pinned part stops (design §9), failing the view. The
# run of 2026-12-03 with 2G lost its view that way, PostgreSQL still writing.
JOURNAL_LIMIT = "8G"


def known(mnt: str, command: str) -> bool:
    """Whether the daemon knows ``command`` (an unknown one is refused as such)."""
    reply = ctl(mnt, command)
    return "unknown command" not in str(reply.get("error", ""))


# ----- CDP -----------------------------------------------------------------------------

def cdp_ensure(world: World) -> None:
    """After each start: the journal is on (taken up again after a crash, else started)."""
    mnt = str(world.stack.mnt)
    info = ctl(mnt, f"cdp_info {DEVICE}")
    world.cdp_on = True
    if info.get("ok") and not info.get("stopped"):
        log(f"CDP journal on: oldest {info.get('oldest')}, newest {info.get('newest')}")
        return
    journal = world.stack.work / "cdp"
    journal.mkdir(exist_ok=True)
    ctl_ok(mnt, f"cdp_start {DEVICE} {journal} {JOURNAL_LIMIT}")
    log("CDP journal started")


def marked_backup(world: World, cmd: list[str]) -> dict:
    """A backup point inside a freeze held here, with the CDP mark ``pN`` at the same
    quiescent instant: freeze, mark, ``create --nofreeze`` until its snapshot is taken,
    thaw. Returns the manifest (with ``cdp_mark`` added)."""
    stack, label = world.stack, f"p{len(world.points)}-{int(time.time())}"
    cmd = [*cmd, "--nofreeze"]
    run(["fsfreeze", "-f", str(stack.data)], 60)
    try:
        ctl_ok(str(stack.mnt), f"cdp_mark {DEVICE} {label} nofreeze")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        taken = threading.Event()
        errors: list[str] = []

        def read_stderr():
            assert proc.stderr is not None
            for line in proc.stderr:
                errors.append(line)
                if " taken" in line:
                    taken.set()
        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not taken.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
            pass
    finally:
        stack.thaw()
    try:
        out = proc.communicate(timeout=1800)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SoakError("backup create (CDP-marked) did not end within 1800 s") from None
    reader.join(10)
    manifest = create_result(proc.returncode, out, "".join(errors))
    manifest["cdp_mark"] = label
    return manifest


def cdp_view_sha(world: World, label: str) -> str:
    """sha256 of the view of mark ``label`` (the view destroyed after)."""
    mnt = str(world.stack.mnt)
    view = ctl_ok(mnt, f"cdp_view {DEVICE} {label}")
    try:
        return run(["sha256sum", f"{mnt}/{view['image']}"], 1800).stdout.split()[0]
    finally:
        ctl(mnt, f"snapshot_destroy {view['id']}")


def pick_marked_point(world: World, kept: set) -> dict | None:
    """The kept, CDP-marked point nearest a random instant of the run."""
    info = ctl(str(world.stack.mnt), f"cdp_info {DEVICE}")
    oldest = float(info.get("oldest") or 0)         # a migration restarts the journal
    marked = [p for p in world.points if p.get("cdp_mark") and p["point"] in kept and p["unix_time"] > oldest]
    if not marked:
        return None
    first, last = world.points[0]["unix_time"], time.time()
    instant = random.uniform(first, last)
    return min(marked, key=lambda p: abs(p["unix_time"] - instant))


# ----- migration -----------------------------------------------------------------------

def migrate_round_trip(world: World) -> None:
    """disk0 to a new file and back to its loop device, each pivoted once ``ready``."""
    stack = world.stack
    target = stack.work / "migrated.img"
    journal = world.create_point is not None       # CDP on: a migration refuses a journaled device
    if journal:
        ctl_ok(str(stack.mnt), f"cdp_stop {DEVICE}")
    if stack.source == str(target):        # a kill left disk0 on the file: bring it home
        legs: tuple[str, ...] = (stack.loop_source,)
    else:                                  # a kill mid-copy leaves a half-copied target,
        target.unlink(missing_ok=True)     # which the operator removes first
        legs = (str(target), stack.loop_source)
    try:
        for dest in legs:
            migrate_once(world, dest)
            stack.source = dest
    finally:
        if journal:
            cdp_ensure(world)
    if stack.source != str(target):
        target.unlink(missing_ok=True)


def migrate_once(world: World, dest: str) -> None:
    mnt = str(world.stack.mnt)
    started = time.time()
    ctl_ok(mnt, f"migrate_start {DEVICE} {dest}")
    deadline = time.monotonic() + 1800
    while True:
        info = ctl_ok(mnt, f"migrate_info {DEVICE}")
        if info.get("state") == "ready":
            break
        if info.get("state") not in ("running",) or time.monotonic() > deadline:
            ctl(mnt, f"migrate_cancel {DEVICE}")
            raise SoakError(f"migration to {dest}: {info}")
        time.sleep(1)
    ctl_ok(mnt, f"migrate_complete {DEVICE}")
    info = ctl_ok(mnt, f"migrate_info {DEVICE}")
    world.ledger.check("migration completed", info.get("state") == "completed", str(info))
    log(f"migrated {DEVICE} to {dest} in {time.time() - started:.0f} s")
