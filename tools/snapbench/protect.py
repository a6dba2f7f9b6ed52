"""What protected ranges cost a device without any (issue 23): page-cached 4 KiB random
writes (fio --direct=1 --ioengine=psync, one job, the first table's plain_rand_write)
on ``MOUNT/devices/d``, three variants side by side:

    base   snapfs of a baseline revision (--protect-baseline, default main: its snapfs
           package from ``git archive`` into the scratch dir; the daemon runs with
           PYTHONPATH pointing there, from a working directory outside the checkout);
    this   snapfs of this checkout, no rule (the write path tests one attribute);
    rule   this checkout with a deny range on the first MiB, which the job never
           touches (it writes from 1 MiB on): one bisect per write.

Each variant has its own copy of one random --protect-size source and its own mount, all
mounted at once; each round runs one job per variant, the order rotating every round
(interleaved, so drift on a shared machine hits all of them alike); the source is
synced, dropped and read back before each job (scratch.settle). The table: median IOPS,
the ratio to base, every sample.
"""

import contextlib
import statistics
import subprocess
from pathlib import Path

from .common import BLOCK, BenchError, Config, MiB, human, log
from .contenders import Snapfs
from .fio import fio
from .scratch import make_sources, settle
from .workloads import ERRORS

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("base", "this", "rule")
RULE = "deny 0:2048"            # sectors of the first MiB, which the job leaves alone


def baseline_tree(rev: str, dest: Path) -> Path:
    """The snapfs package of ``rev`` (git archive) under ``dest``; BenchError if git fails."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "snapfs"], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace')[-300:]}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def job(path: Path, cfg: Config, seed: int) -> list[str]:
    return [f"--filename={path}", "--rw=randwrite", f"--bs={BLOCK}", f"--offset={MiB}",
            f"--size={cfg.protect_size - MiB}", "--time_based", f"--runtime={cfg.runtime}",
            f"--randseed={seed}"]


def run_protect_bench(cfg: Config, work: Path) -> dict:
    """The section; returns {"table": text, "samples": {variant: [IOPS...]}}."""
    work = work / "protect"
    work.mkdir()
    cfg_sized = Config(**{**vars(cfg), "size": cfg.protect_size})
    sources = make_sources(cfg_sized, work, list(VARIANTS))
    paths = {"base": baseline_tree(cfg.protect_baseline, work / "baseline"), "this": ROOT, "rule": ROOT}
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with contextlib.ExitStack() as stack:
        mounts = {}
        for v in VARIANTS:
            m = Snapfs(work / v, sources[v], cfg.protect_size, 64 * MiB)
            m.env = {"PYTHONPATH": str(paths[v])}
            stack.callback(m.stop)
            m.start()
            mounts[v] = m
        mounts["rule"].ctl(f"protect d {RULE}")
        for rnd in range(cfg.protect_rounds):
            order = VARIANTS[rnd % 3:] + VARIANTS[: rnd % 3]
            for v in order:
                try:
                    settle(mounts[v].source)
                    iops = fio(job(mounts[v].device, cfg, 1000 + rnd))["write"]["iops"]
                except ERRORS as exc:
                    log(f"  protect {v}: failed: {exc}")
                    continue
                samples[v].append(iops)
                log(f"  protect round {rnd + 1}/{cfg.protect_rounds} {v:5} {iops:9.0f} IOPS")
    return {"table": table(samples, cfg), "samples": samples}


def table(samples: dict[str, list[float]], cfg: Config) -> str:
    med = {v: statistics.median(s) if s else None for v, s in samples.items()}
    lines = [f"protected ranges: page-cached 4 KiB random writes on a {human(cfg.protect_size)} snapfs "
             f"device, {cfg.runtime} s fio jobs, {cfg.protect_rounds} interleaved round(s), medians; "
             f"base = {cfg.protect_baseline}, this = this checkout without rules, rule = with "
             f"'{RULE}' (not touched by the job). A shared 2-core machine is noisy: read the ratios "
             "with the spread of the samples", "",
             "| variant | IOPS | /base | samples |", "|---|---|---|---|"]
    for v in VARIANTS:
        ratio = f"{med[v] / med['base']:.3f}" if med[v] and med["base"] else "-"
        value = "fail" if med[v] is None else f"{med[v]:.0f}"
        lines.append(f"| {v} | {value} | {ratio} | {', '.join(f'{x:.0f}' for x in samples[v])} |")
    lines += ["", "target: this/base and rule/base within 5% (0.95-1.05)"]
    return "\n".join(lines)
