"""``tools/bench --quick`` runs end to end and prints its table.

Only the shape of the output is checked, never the numbers: they depend on the machine
and on whatever else runs on it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "tools" / "bench"
COLUMNS = ("workload", "unit", "snapfs", "qemu", "raw", "snapfs/qemu")
REAL_COLUMNS = ("workload", "unit", "snapfs", "qemu", "raw", "snapfs/raw", "snapfs/qemu")


def _header(columns: tuple[str, ...]) -> re.Pattern:
    """A Markdown header line with exactly ``columns``."""
    return re.compile(r"^\|" + "".join(rf"\s*{re.escape(c)}\s*\|" for c in columns) + "$", re.MULTILINE)


HEADER, REAL_HEADER = _header(COLUMNS), _header(REAL_COLUMNS)


def _skip_reason() -> str | None:
    """Why the smoke run cannot happen here, or None."""
    if shutil.which("fio") is None:
        return "fio not installed (apt-get install -y fio)"
    if os.geteuid() != 0:
        return "the benchmark mounts FUSE filesystems and runs qemu-storage-daemon as root"
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        return "FUSE not available"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_bench_quick_prints_the_table(tmp_path):
    """--quick finishes, prints both tables' headers (page-cached files, then the real
    device), writes the JSON file with the rows of both."""
    report = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--workdir", str(tmp_path),
                           "--json", str(report)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode in (0, 3), output       # 3: table printed, some cells failed
    assert HEADER.search(done.stdout), output
    assert REAL_HEADER.search(done.stdout), output
    assert HEADER.search(done.stdout).start() < REAL_HEADER.search(done.stdout).start(), output
    assert "protected ranges: page-cached 4 KiB random writes" in done.stdout, output
    assert "| cdp_view open" in done.stdout and "vs the snapshot image taken halfway" in done.stdout, output
    doc = json.loads(report.read_text())
    rows, real_rows = doc["rows"], doc["real_rows"]
    assert rows and all({"workload", "unit", "snapfs", "qemu", "raw", "ratio"} <= set(r) for r in rows)
    assert real_rows and all({"workload", "unit", "snapfs", "qemu", "raw", "ratio", "ratio_raw"} <= set(r)
                             for r in real_rows)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("snapfs-bench-")], \
        "scratch directory left behind"
