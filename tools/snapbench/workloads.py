"""The workloads: one round of fio jobs on every contender, with and without a snapshot."""

import contextlib
import subprocess
from pathlib import Path

from .common import BenchError, Config, log
from .contenders import Contender
from .fio import WORKLOADS, fio
from .report import Results
from .scratch import settle


def measure(res: Results, key: str, c: Contender, path: Path, cfg: Config, work: Path, seed: int) -> None:
    """Run workload ``key`` on ``path`` of contender ``c``; record the value or failure."""
    wl = WORKLOADS[key]
    try:
        settle(c.source)
        value = wl.value(fio(wl.job(path, cfg, work, seed)))
    except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        res.fail(key, c.name, exc)
        return
    res.add(key, c.name, value)
    log(f"  {key:17} {c.name:7} {value:10.1f} {'MiB/s' if wl.metric == 'bw' else 'IOPS'}")


@contextlib.contextmanager
def snapshots(cs: list[Contender], res: Results, keys: list[str]):
    """Take a snapshot on every contender; yield those that have one; release them all.
    A failed take marks ``keys`` failed for that contender."""
    held = []
    try:
        for c in cs:
            try:
                c.take()
                held.append(c)
            except Exception as exc:
                for key in keys:
                    res.fail(key, c.name, f"take failed: {exc}")
        yield held
    finally:
        for c in held:
            try:
                c.release()
            except Exception as exc:
                res.notes.append(f"{c.name}: release failed: {exc}")


def run_round(cs: list[Contender], cfg: Config, work: Path, res: Results, rnd: int) -> None:
    """One round: every workload once per contender, contenders interleaved per workload."""
    log(f"round {rnd + 1}/{cfg.rounds}")
    seed = 1000 + rnd
    for key in ("plain_seq_write", "plain_seq_read", "plain_rand_write"):
        for c in cs:
            measure(res, key, c, c.device, cfg, work, seed)
    keys = ["cow_seq_write", "snap_seq_read", "snap_rand_read"]
    with snapshots(cs, res, keys) as held:
        for c in held:
            measure(res, "cow_seq_write", c, c.device, cfg, work, seed)
            check_copied(c, cfg, res)
        for key in keys[1:]:
            for c in held:
                measure(res, key, c, c.image, cfg, work, seed)
    with snapshots(cs, res, ["cow_rand_write"]) as held:
        for c in held:
            measure(res, "cow_rand_write", c, c.device, cfg, work, seed)


def check_copied(c: Contender, cfg: Config, res: Results) -> None:
    """After the whole-device overwrite every chunk must have been copied: otherwise
    the snapshot-read rows would not measure reads of copied data."""
    try:
        copied = c.copied_bytes()
    except Exception as exc:
        res.notes.append(f"{c.name}: cannot read the copied amount: {exc}")
        return
    if copied is None:
        return
    res.extra[c.name].setdefault("copied_after_overwrite", []).append(copied)
    if copied < cfg.size:
        res.notes.append(f"{c.name}: only {copied} of {cfg.size} bytes copied after the overwrite")
