"""fio: running one job, the job builders and the workloads they make."""

import json
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .common import BLOCK, CLUSTER, BenchError, Config, MiB

FIO_COMMON = ["--direct=1", "--ioengine=psync", "--numjobs=1", "--invalidate=0",
              "--allow_file_create=0", "--output-format=json"]


def fio(args: list[str], timeout: float = 1800) -> dict:
    """Run one fio job; return its JSON job record. BenchError if fio or the job failed."""
    cmd = ["fio", "--name=bench", *FIO_COMMON, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    start = done.stdout.find("{")
    if done.returncode != 0 or start < 0:
        raise BenchError(f"fio failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-600:]}")
    job = json.loads(done.stdout[start:])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {done.stderr.strip()[-600:]}")
    return job


def seq_job(rw: str, path: Path, cfg: Config, work: Path, seed: int) -> list[str]:
    """Sequential 1 MiB I/O over the whole device."""
    return [f"--filename={path}", f"--rw={rw}", "--bs=1M", f"--size={cfg.size}"]


def rand_job(rw: str, path: Path, cfg: Config, work: Path, seed: int) -> list[str]:
    """Random 4 KiB I/O over the whole device for ``cfg.runtime`` seconds."""
    return [f"--filename={path}", f"--rw={rw}", f"--bs={BLOCK}", f"--size={cfg.size}",
            "--time_based", f"--runtime={cfg.runtime}", f"--randseed={seed}"]


def first_touch_job(path: Path, cfg: Config, work: Path, seed: int) -> list[str]:
    """One 4 KiB write into every 64 KiB chunk, chunks in random order: every write is
    the first touch of its chunk after take (fio replays a generated iolog, since
    fio's own random map cannot pick each chunk once with 4 KiB blocks)."""
    rng = random.Random(seed)
    chunks = list(range(cfg.size // CLUSTER))
    rng.shuffle(chunks)
    iolog = work / f"first-touch-{seed}.iolog"
    lines = ["fio version 2 iolog", f"{path} add", f"{path} open"]
    lines += [f"{path} write {c * CLUSTER + rng.randrange(CLUSTER // BLOCK) * BLOCK} {BLOCK}"
              for c in chunks]
    iolog.write_text("\n".join([*lines, f"{path} close", ""]))
    return [f"--read_iolog={iolog}", "--replay_no_stall=1"]


def with_options(job: Callable[..., list[str]], *options: str) -> Callable[..., list[str]]:
    """``job`` with more fio options; they come last, so they override FIO_COMMON's
    (``--direct=0``, ``--numjobs=16``)."""
    def build(*args) -> list[str]:
        """The options of ``job``, then ``options``."""
        return [*job(*args), *options]
    return build


def jobs(count: int) -> tuple[str, ...]:
    """``count`` parallel jobs reported as one (fio's JSON then has one job record)."""
    return (f"--numjobs={count}", "--group_reporting")


def scatter_job(path: Path, cfg: Config) -> list[str]:
    """Memory test: ``cfg.scatter`` bytes of 64 KiB writes at random places."""
    return [f"--filename={path}", "--rw=randwrite", f"--bs={CLUSTER}", f"--size={cfg.mem_device}",
            f"--io_size={cfg.scatter}", "--norandommap", "--randseed=4242"]


@dataclass(frozen=True)
class Workload:
    """A fio workload: job builder, result section ("read"/"write"), metric."""

    job: Callable[..., list[str]]
    section: str
    metric: str   # "bw" (MiB/s) or "iops"

    def value(self, job: dict) -> float:
        """The metric from fio's job record."""
        data = job[self.section]
        return data["bw_bytes"] / MiB if self.metric == "bw" else data["iops"]

    @property
    def unit(self) -> str:
        """MiB/s or IOPS, for the progress log."""
        return "MiB/s" if self.metric == "bw" else "IOPS"


WORKLOADS = {
    "plain_seq_write": Workload(partial(seq_job, "write"), "write", "bw"),
    "plain_seq_read": Workload(partial(seq_job, "read"), "read", "bw"),
    "plain_rand_write": Workload(partial(rand_job, "randwrite"), "write", "iops"),
    "cow_seq_write": Workload(partial(seq_job, "write"), "write", "bw"),
    "cow_rand_write": Workload(first_touch_job, "write", "iops"),
    "snap_seq_read": Workload(partial(seq_job, "read"), "read", "bw"),
    "snap_rand_read": Workload(partial(rand_job, "randread"), "read", "iops"),
}

# the real-device section (realdev): an uncached loop block device
RAND_READ_16 = Workload(with_options(partial(rand_job, "randread"), *jobs(16)), "read", "iops")
BUFFERED_SEQ_READ = Workload(with_options(partial(seq_job, "read"), "--direct=0"), "read", "bw")
WORKLOADS |= {
    "real_rand_read_1": Workload(partial(rand_job, "randread"), "read", "iops"),
    "real_rand_read_16": RAND_READ_16,
    "real_seq_read": BUFFERED_SEQ_READ,
    "real_snap_seq_read": BUFFERED_SEQ_READ,
    "real_cow_rand_write": Workload(with_options(partial(rand_job, "randwrite"), *jobs(8)), "write", "iops"),
    "real_cached_rand_read_16": RAND_READ_16,
    "real_commit_1": Workload(with_options(partial(rand_job, "randwrite"), "--fsync=1"), "write", "iops"),
    "real_commit_4": Workload(with_options(partial(rand_job, "randwrite"), "--fsync=1", *jobs(4)),
                              "write", "iops"),
}
