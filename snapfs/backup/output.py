"""What the backup verbs print: exit codes, tables, and progress (a tqdm bar
when stdout is a terminal, plain lines otherwise, nothing on stdout with --json).

Exit codes (every verb):
    0  done
    1  failed (the message says why; nothing half-made is left as a point)
    2  usage error (argparse)
    3  damage found: verify found damaged chunks, or restore met one (the message
       names the point, device and offset; the target is incomplete)
    4  create made a correct point, but the CBT audit caught changes that CBT had
       not reported (that device was read in full)
"""

import argparse
import sys
import time

from ..errors import SnapfsError
from ..params import human

OK, FAILED, USAGE, DAMAGED, AUDIT_MISMATCH = 0, 1, 2, 3, 4


def arg_type(parse, keep_text: bool = False):
    """An argparse type from ``parse`` (text -> value, SnapfsError when bad): its value,
    or with ``keep_text`` the text it accepted; argparse prints the message."""
    def convert(text: str):
        try:
            value = parse(text)
        except SnapfsError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
        return text if keep_text else value
    return convert


class DefaultsHelp(argparse.HelpFormatter):
    """``--help`` that states every option's default, unless its text already does or
    it has none (a flag, no value): every option needs a help text to be listed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS
                or action.default == []):
            return text
        return f"{text} (default: %(default)s)"


def table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell; ``right``: indexes of right-aligned columns."""
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                         strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


class Output:
    """Messages and progress for one command. ``json``: stdout carries only the final
    JSON document; messages go to stderr."""

    def __init__(self, json_mode: bool = False, stream=None):
        self.json = json_mode
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() and not json_mode

    def say(self, text: str) -> None:
        """A line for the reader (stderr with --json, so stdout stays parseable)."""
        print(text, file=sys.stderr if self.json else self.stream, flush=True)

    def warn(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def progress(self, total: int, label: str) -> "Progress":
        return Progress(self, total, label)


class Progress:
    """Bytes done of ``total``: a tqdm bar (bytes, rate, time left) on a terminal,
    otherwise a plain line at most every 5 s and at the end; silent with --json."""

    INTERVAL = 5.0

    def __init__(self, out: Output, total: int, label: str):
        self.out, self.total, self.label, self.done = out, total, label, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if out.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                            leave=False, file=out.stream)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.out.json and time.monotonic() - self.last >= self.INTERVAL:
            self.last = time.monotonic()
            self.out.say(self._line())

    def _line(self) -> str:
        seconds = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.label}: {human(self.done)} of {human(self.total)} "
                f"({human(self.done / seconds)}/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
