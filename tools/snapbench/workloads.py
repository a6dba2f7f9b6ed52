"""The workloads: one round of fio jobs on every contender, with and without a snapshot."""

import contextlib
import subprocess
from collections.abc import Callable
from operator import methodcaller
from pathlib import Path

from .common import BenchError, Config, log
from .contenders import Contender
from .fio import WORKLOADS, fio
from .report import Results
from .scratch import settle

ERRORS = (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError)


def record(res: Results, key: str, who: str, unit: str, run: Callable[[], float]) -> None:
    """Run one measurement ``run``; record its value, or its failure."""
    try:
        value = run()
    except ERRORS as exc:
        res.fail(key, who, exc)
        return
    res.add(key, who, value)
    log(f"  {key:24} {who:7} {value:10.1f} {unit}")


def measure(res: Results, key: str, c: Contender, path: Path, cfg: Config, work: Path, seed: int,
            prepare: Callable[[Path], None] = settle) -> None:
    """Run workload ``key`` on ``path`` of contender ``c`` after ``prepare(c.source)``
    (by default: synced and read into the page cache); record the value or failure."""
    wl = WORKLOADS[key]

    def run() -> float:
        """Prepare, then one fio job."""
        prepare(c.source)
        return wl.value(fio(wl.job(path, cfg, work, seed)))

    record(res, key, c.name, wl.unit, run)


def each(cs: list[Contender], res: Results, keys: list[str], what: str,
         done: list[Contender] | None = None) -> list[Contender]:
    """Method ``what`` (start, take) of every contender; appends those it worked on to
    ``done`` (as they succeed) and returns it. A failure marks ``keys`` failed for that
    contender."""
    done = [] if done is None else done
    action = methodcaller(what)
    for c in cs:
        try:
            action(c)
            done.append(c)
        except Exception as exc:
            for key in keys:
                res.fail(key, c.name, f"{what} failed: {exc}")
    return done


def start_all(cs: list[Contender], stack: contextlib.ExitStack, res: Results,
              keys: list[str]) -> list[Contender]:
    """Start every contender (all stops registered first); one that fails to start is
    left out and its ``keys`` are marked failed. Returns those started."""
    for c in cs:
        stack.callback(c.stop)
    return each(cs, res, keys, "start")


@contextlib.contextmanager
def snapshots(cs: list[Contender], res: Results, keys: list[str]):
    """Take a snapshot on every contender; yield those that have one; release them all.
    A failed take marks ``keys`` failed for that contender."""
    held: list[Contender] = []
    try:
        yield each(cs, res, keys, "take", held)
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
