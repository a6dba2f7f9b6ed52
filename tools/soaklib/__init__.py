"""The snapfs soak behind ``tools/soak``: hours of PostgreSQL on ext4 over a snapfs
device while backups, snapshots, overflows, crashes and restarts happen (issue 24).

    common   SoakError, log, bounded subprocesses and control commands, the check ledger
    stack    the layers: source loop device, daemon, ext4 on a loop device, PostgreSQL
    bench    pgbench segments: per-second tps, errors, committed transactions
    agents   the backup agent, the snapshot agent (take/cp/destroy, overflow), the sampler
    extras   CDP and migration phases (only when the daemon knows their commands)
    final    the end checks: every kept point restores, e2fsck, the TPC-B invariant; figures
    cli      the command line, the schedule and the run
"""

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOOLS))      # snapbench (PostgreSQL, processes) is reused
if importlib.util.find_spec("snapfs") is None:  # run with a python outside the venv: use the checkout
    sys.path.insert(0, str(TOOLS.parent))
