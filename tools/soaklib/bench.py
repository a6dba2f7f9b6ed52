"""pgbench in segments: one segment runs from one disruption to the next (a clean
restart stops it first, as an operator would; a kill lands in the middle of one).
Each segment's per-second tps (``-P 1``), errors and committed transactions are kept.

Committed transactions: pgbench counts a transaction once its COMMIT returned; TPC-B
inserts one pgbench_history row per transaction, so the sum over all segments must
never exceed the rows of pgbench_history, whatever crashed in between."""

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

from .common import log

CLIENTS = 4
PROGRESS = re.compile(r"^progress: ([\d.]+) s, ([\d.]+) tps")
PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")


@dataclass
class Segment:
    """One pgbench run: [start, end) wall time, the kill time when one hit it."""

    start: float
    seconds: int
    kill_at: float | None = None
    tps: list = field(default_factory=list)        # (wall time, tps) per second
    errors: list = field(default_factory=list)     # (wall time, line)
    committed: int = 0
    exit_code: int | None = None

    def errors_outside_kill(self) -> list:
        return [line for t, line in self.errors if self.kill_at is None or t < self.kill_at]

    def tps_outside_kill(self) -> list:
        return [v for t, v in self.tps if self.kill_at is None or t < self.kill_at - 1]


class Pgbench:
    """Starts a segment in the background, waits for it, keeps every segment. ``-n``:
    no vacuum first (pgbench's vacuum truncates pgbench_history)."""

    def __init__(self, sock: str):
        self.sock = sock
        self.segments: list[Segment] = []
        self.proc: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    def start(self, seconds: int) -> Segment:
        seg = Segment(time.time(), max(1, seconds))
        self.segments.append(seg)
        cmd = ["runuser", "-u", "postgres", "--", "pgbench", "-h", self.sock, "-c", str(CLIENTS), "-j", "2",
               "-T", str(seg.seconds), "-P", "1", "-n", "bench"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, args=(self.proc, seg), daemon=True)
        self.reader.start()
        return seg

    @staticmethod
    def _read(proc: subprocess.Popen, seg: Segment) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time()
            if m := PROGRESS.match(line):
                seg.tps.append((now, float(m.group(2))))
            elif m := PROCESSED.search(line):
                seg.committed = int(m.group(1))
            elif "error" in line.lower() or "abort" in line.lower():
                seg.errors.append((now, line.strip()))

    def wait(self, extra: float = 120) -> Segment:
        """The running segment once pgbench has exited (killed ``extra`` s past its end)."""
        seg = self.segments[-1]
        assert self.proc is not None and self.reader is not None
        try:
            seg.exit_code = self.proc.wait(timeout=max(0.0, seg.start + seg.seconds - time.time()) + extra)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            seg.exit_code = self.proc.wait(timeout=30)
            seg.errors.append((time.time(), "pgbench did not end in time (killed)"))
        self.reader.join(30)
        low = min((v for _, v in seg.tps), default=0.0)
        log(f"pgbench segment: {seg.committed} committed, {len(seg.tps)} s, lowest {low:.0f} tps, "
            f"exit {seg.exit_code}, {len(seg.errors)} error lines")
        return seg

    def committed(self) -> int:
        return sum(s.committed for s in self.segments)

    def lowest_tps(self) -> float:
        values = [v for s in self.segments for v in s.tps_outside_kill()]
        return min(values, default=0.0)
