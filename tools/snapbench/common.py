"""What every part of the benchmark shares: sizes, the error type, progress logging and
the configuration."""

import sys
import time
from dataclasses import dataclass

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CLUSTER = 64 * KiB          # QEMU's cbw cluster and the snapfs chunk used here
BLOCK = 4 * KiB             # small random I/O size
CONTENDERS = ("snapfs", "qemu", "raw")


class BenchError(Exception):
    """A step of the benchmark failed (message says which and why)."""


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def human(n: int) -> str:
    """Binary size for labels: 64 MiB, 1 GiB, 1 TiB."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


# ----- configuration ----------------------------------------------------------------

@dataclass
class Config:
    """What to run; ``--quick`` and the full run differ only in these numbers."""

    quick: bool = False
    size: int = GiB              # device size
    rounds: int = 3
    runtime: int = 10            # seconds per time-based random job
    takes: int = 20
    hold: float = 0.25           # seconds a snapshot lives during the take test
    mem_device: int = TiB        # sparse device of the memory test
    scatter: int = GiB           # bytes of scattered writes in the memory test
    qemu: bool = True
    real: bool = True            # the real-device section (realdev)
    real_size: int = 2 * GiB     # its loop device
    real_rounds: int = 3
    real_runtime: int = 8        # seconds per time-based job there
    load: bool = True            # the backup-under-load section (underload)
    load_size: int = 2 * GiB     # its snapfs device (and the plain region)
    load_rounds: int = 3
    load_kinds: tuple = ("sparse", "full")   # sources of the backup-under-load table
    interpose_runtime: int = 30  # seconds of pgbench per contender in the interposition table
    backup: bool = True          # the backup section (snapbench/backup.py)
    backup_size: int = 4 * GiB   # its device
    cdp: bool = True             # the CDP section (snapbench/cdp.py)
    cdp_size: int = 256 * MiB    # its history device
    cdp_writes: int = 1_000_000  # 4 KiB writes in its history
    protect: bool = True         # the protected-ranges section (snapbench/protect.py)
    protect_rounds: int = 6
    protect_size: int = 256 * MiB
    protect_baseline: str = "main"   # the git revision it compares against
    migrate: bool = True         # the migration-under-load section (migration)
    migrate_size: int = 2 * GiB  # its device
    migrate_rounds: int = 3
    only: str | None = None      # run only this section: load, backup, real, protect, migrate or cdp
    workdir: str | None = None
    json: str | None = None
