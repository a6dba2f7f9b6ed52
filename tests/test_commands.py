"""The command table (snapfs/commands.py) as the client side and the docs use it: the
client imports none of the daemon's modules, docs/design.md's table is the table, and
argument checks refuse what the daemon would refuse, with EINVAL."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from snapfs.commands import COMMANDS, doc_table, split
from snapfs.errors import SnapfsError

DAEMON_MODULES = {"trio", "pyfuse3", "bitarray", "libaio"} | {
    f"snapfs.{m}" for m in ("registry", "workers", "aio", "diffarea", "tracker", "snapshot", "fs", "control")}
DESIGN = Path(__file__).parent.parent / "docs" / "design.md"


def loaded_by(code: str) -> set[str]:
    """Modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport sys, json; print(json.dumps(list(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import snapfs.cli",
    "import snapfs.cli; snapfs.cli.build_parser()",
    "import snapfs.client",
    # the backup verbs that are only clients of a mount or readers of a repository
    "import snapfs.backup.cli, snapfs.backup.create, snapfs.backup.restore, snapfs.backup.verify, "
    "snapfs.backup.prune",
])
def test_the_client_side_loads_no_daemon_module(code):
    assert not loaded_by(code) & DAEMON_MODULES, loaded_by(code) & DAEMON_MODULES


def test_design_md_table_is_the_command_table():
    rows = [r for r in DESIGN.read_text().splitlines() if r.startswith("| `") and r.split("`")[1].split()[0]
            in COMMANDS]
    assert rows == doc_table()


@pytest.mark.parametrize("line", [
    "", "nosuch", "version x", "attach d0", "attach d0 relative/path", "attach ../x /dev/null",
    "detach", "markdirtyblock d0", "markdirtyblock d0 1", "markdirtyblock d0 1:0", "markdirtyblock d0 x:1",
    "snapshot_create /s", "snapshot_create /s 1Q", "snapshot_create s 1M", "snapshot_create /s 1M bad/name",
    "snapshot_take", "snapshot_take 1 freeze", "snapshot_take 1 nofreeze x", "snapshot_waitevent 1 60001",
    "snapshot_waitevent 1 -1", "stop now", "stop force force", "'unclosed",
])
def test_malformed_lines_are_einval(line):
    with pytest.raises(SnapfsError) as exc:
        command, words = split(line)
        command.check(words)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("line,values", [
    ("snapshot_take abc", ["abc", False]),
    ("snapshot_take abc nofreeze", ["abc", True]),
    ("snapshot_create /s 1M", ["/s", 1 << 20, []]),
    ("snapshot_create /s 1M a b", ["/s", 1 << 20, ["a", "b"]]),
    ("markdirtyblock d0 0:8 16:8", ["d0", ["0:8", "16:8"]]),
    ("snapshot_waitevent x 60000", ["x", 60000]),
    ("stop", [False]),
])
def test_good_lines_are_converted(line, values):
    command, words = split(line)
    assert command.check(words) == values
