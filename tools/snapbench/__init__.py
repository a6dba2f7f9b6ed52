"""The snapfs benchmark behind ``tools/bench``, one module per part (``cli``'s docstring
describes what it measures and how):

    common      sizes, BenchError, log, human, Config
    procs       processes, mounts, signals: spawn, finish_process, lazy_unmount, wait_until
    scratch     the scratch directory, the random source files, the page cache
    fio         running a fio job; the job builders and WORKLOADS
    contenders  the Contender interface, Take, and the raw and snapfs contenders
    qemu        the qemu-storage-daemon contender: QMP client, image fleecing
    workloads   one round of the fio workloads, with and without a snapshot
    take        take latency (writers, longest write wait)
    memory      daemon RSS
    realdev     the real-device table: the three on one uncached loop block device
    report      Results, ROWS, percentiles, ratios, the table and the JSON file
    cli         the command line and the run: parse_args, run_all, main
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("snapfs") is None:  # run with a python outside the venv: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
