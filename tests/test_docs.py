"""The docs work as written (issue 19): every ```sh block of README.md and docs/*.md
runs, in order, one shell per document, as a new user pasting them would, in a
scratch mount namespace without the machine's snapfs mounts, where /mnt, /srv,
/var/tmp, /var/backups, /var/lib/snapfs, /run/snapfs and /tmp are empty tmpfs (the
host's stay untouched), from the top of this checkout (``$PWD/.venv/bin`` is the CLI).

A block that cannot run here says so in an HTML comment on the line before it,
``<!-- not run: WHY -->`` (an external engine, systemd as PID 1, the test suite
itself); ``NOT_RUN`` is the whole list, so it stays short. A documented output is a
comment line ``# -> TEXT`` after a command: TEXT (``...`` matches anything) must
appear in the block's output, in order.

The shell runs under a timeout (then its snapfs connections are aborted); at its exit,
whatever it left mounted is unmounted lazily and its loop devices are detached.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import abort_fuse, requires_fuse, snapfs

from snapfs import mountinfo
from snapfs.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "docs" / "*.md")))]
BLOCK = re.compile(r"(?ms)^(?:<!--(?P<note>[^\n]*)-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```")
OUTPUT = re.compile(r"^\s*#\s*->\s?(.*)$", re.M)
SCRATCH = ["/mnt", "/srv", "/var/tmp", "/var/backups", "/var/lib/snapfs", "/run/snapfs", "/tmp"]
NOT_RUN = {   # (document, first line of the block): why
    ("README.md", "make demo"): "runs the demo and the test suite itself",
    ("README.md", "cp tools/systemd/snapfs@.service"): "needs systemd as PID 1",
    ("docs/performance.md", "make bench"): "the benchmark: 20 minutes, QEMU",
}
SECONDS = 600


def blocks(doc: str) -> list[tuple[int, str, str]]:
    """(line, note, body) of each ```sh block of ``doc``."""
    text = (ROOT / doc).read_text()
    return [(text[: m.start()].count("\n") + 1, (m.group("note") or "").strip(), m.group("body"))
            for m in BLOCK.finditer(text) if m.group("lang") == "sh"]


def test_the_blocks_not_run_are_marked_and_few():
    marked = [(doc, body.splitlines()[0]) for doc in DOCS for _, note, body in blocks(doc)
              if note.startswith("not run")]
    assert len(marked) == len(NOT_RUN), marked
    for doc, first in marked:
        assert any(doc == d and first.startswith(p) for d, p in NOT_RUN), (doc, first)


def script(doc: str) -> tuple[str, list[tuple[int, list[str]]]]:
    """The shell script of one document: each block after a marker line; and each
    run block's line and expected outputs."""
    parts, expected = [LEFTOVERS, "set -eo pipefail"], []
    for line, note, body in blocks(doc):
        if note.startswith("not run"):
            continue
        parts += [f"echo '@@block {line}@@'", body]
        expected.append((line, [m.group(1).strip() for m in OUTPUT.finditer(body)]))
    parts.append("echo '@@end@@'")
    return "\n".join(parts) + "\n", expected


SCRATCH_SETUP = """
set -e
exec 9< "$1"
findmnt -n -l -t fuse.snapfs,fuse.snapfs-backup -o TARGET | while read -r m; do umount -l "$m"; done || true
cd {root}
for d in {dirs}; do mkdir -p "$d" && mount -t tmpfs -o mode=0755 scratch "$d"; done
# a checkout under a scratch directory (a clone in /tmp) is now hidden: the working
# directory still is the checkout, so bind it back at its path
mkdir -p {root} && mount --no-canonicalize --bind . {root}
chmod 1777 /tmp /var/tmp
cd {root}
exec bash /dev/fd/9
"""
# on exit, also after a failed block: loop devices over files of this namespace's
# scratch directories or snapfs mounts (told by their device numbers, so never another
# process's) lose their mounts and are detached; snapfs mounts go lazily (a daemon
# exits once its files are released)
LEFTOVERS = """
scratch_cleanup() {
  set +e +o pipefail
  mounts=$(findmnt -n -l -t fuse.snapfs,fuse.snapfs-backup -o TARGET)
  devs=" $(stat -c '%Hd:%Ld' /mnt /srv /var/tmp /var/backups /tmp | tr '\\n' ' ') "
  devs="$devs$(findmnt -n -l -t fuse.snapfs,fuse.snapfs-backup -o MAJ:MIN | tr '\\n' ' ') "
  losetup -l -n -O NAME,BACK-MAJ:MIN | while read -r loop majmin; do
    case "$devs" in *" $majmin "*)
      findmnt -n -l -S "$loop" -o TARGET | while read -r t; do umount -l "$t"; done
      losetup -d "$loop";;
    esac
  done
  for m in $mounts; do fusermount3 -u -z "$m"; done
  return 0
}
trap scratch_cleanup EXIT
"""


def cleanup(pid: int, loops_before: set[str]) -> None:
    """Whatever the documents left: snapfs mounts in their namespace aborted and
    unmounted lazily, new loop devices over files in the scratch directories detached."""
    try:
        with open(f"/proc/{pid}/mountinfo", "rb") as f:
            left = [m for m in mountinfo.parse(f.read()) if m.fstype.startswith("fuse.snapfs")]
    except OSError:
        left = []
    for m in left:
        abort_fuse("/nonexistent", os.minor(m.dev))
    for loop, backing in loop_devices().items():
        if loop not in loops_before and backing.startswith(("/mnt/", "/var/tmp/", "/srv/")):
            subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)


def loop_devices() -> dict[str, str]:
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True,
                         text=True, timeout=30).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if len(line.split(None, 1)) == 2)


@requires_fuse
@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d)])
def test_the_shell_blocks_run_as_written(doc, tmp_path):
    text, expected = script(doc)
    if not expected:
        pytest.skip(f"{doc}: every block is marked not run")
    path = tmp_path / "doc.sh"
    path.write_text(text)
    setup = SCRATCH_SETUP.format(dirs=" ".join(SCRATCH), root=ROOT)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    loops_before = set(loop_devices())
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", setup,
                             "doc", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=SECONDS)
    except subprocess.TimeoutExpired:
        cleanup(proc.pid, loops_before)
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{doc} did not finish within {SECONDS} s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        cleanup(proc.pid, loops_before)
    ran = dict(re.findall(r"(?ms)^@@block (\d+)@@\n(.*?)(?=^@@)", out + "@@"))
    last = max(ran, key=int, default="?")
    assert "@@end@@" in out and proc.returncode == 0, \
        f"{doc}: the block at line {last} failed (exit {proc.returncode}):\n{ran.get(last, out)[-4000:]}"
    for line, outputs in expected:
        check_outputs(doc, line, ran[str(line)], outputs)


def check_outputs(doc: str, line: int, out: str, outputs: list[str]) -> None:
    position = 0
    for want in outputs:
        pattern = ".*?".join(re.escape(part) for part in want.split("..."))
        found = re.compile(pattern).search(out, position)
        assert found, f"{doc}, block at line {line}: {want!r} not printed (in order):\n{out[-3000:]}"
        position = found.end()


# ----- the CLI accepts what the docs show, and says what it takes -----------------------------

def subparsers(parser: argparse.ArgumentParser, path: str = "snapfs"):
    """(command path, parser) of every verb, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, f"{path} {name}")


NOT_OPTIONS = (argparse._HelpAction, argparse._VersionAction)


def test_every_verbs_help_lists_its_options_with_defaults():
    missing = []
    for path, parser in subparsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text, (path, text)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, NOT_OPTIONS):
                continue
            shown = formatter._get_help_string(action) if action.help else ""
            if action.help is argparse.SUPPRESS or not shown or action.option_strings[-1] not in text:
                missing.append(f"{path} {action.option_strings[-1]}: not listed")
            elif action.nargs != 0 and action.default not in (None, argparse.SUPPRESS, []) \
                    and "default" not in shown:
                missing.append(f"{path} {action.option_strings[-1]}: no default")
    assert not missing, missing


def test_nofreeze_as_a_word_and_as_an_option():
    parser = build_parser()
    for argv in (["snapshot_take", "ID", "nofreeze"], ["snapshot_take", "ID", "--nofreeze"]):
        args = parser.parse_args(argv)
        assert args.nofreeze is True, argv
    assert not parser.parse_args(["snapshot_take", "ID"]).nofreeze


@requires_fuse
def test_take_nofreeze_as_the_readme_writes_it(mounter, device, storage_dir):
    m = mounter({"d0": device[0]})
    snap = m.snapshot(storage_dir, "64M", "d0", take=False)
    done = snapfs("snapshot_take", "-m", m.path, snap, "nofreeze")
    assert done.returncode == 0, done.stderr
    assert m.ok(f"snapshot_destroy {snap}")


def test_a_missing_mountpoint_says_so(tmp_path):
    (tmp_path / "d.img").write_bytes(bytes(1 << 20))
    done = snapfs("mount", str(tmp_path / "nowhere"), f"d={tmp_path / 'd.img'}")
    assert done.returncode == 1 and "does not exist" in done.stderr, done.stderr
