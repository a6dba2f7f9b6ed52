"""Tunables (blksnap module parameters, same defaults), size parsing, and the
computation of chunk and tracking-block sizes from a device's capacity."""

import errno
import os
import re
from dataclasses import dataclass

from .errors import SnapfsError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

CHUNK_MAXIMUM = 64 * MiB
TRACKING_BLOCK_MAXIMUM = 64 * MiB
PAGE = 4096
SECTOR = 512

MAX_BYTES = (1 << 63) - 1     # every size and offset fits a signed 64-bit off_t

_SUFFIX = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE_RE = re.compile(r"([0-9]{1,20})([KMGT]?)(?:i?B)?", re.IGNORECASE | re.ASCII)
_NUMBER_RE = re.compile(r"[0-9]{1,20}", re.ASCII)


def parse_size(text: str) -> int:
    """Parse ``"256K"``, ``"1G"``, ``"4096"`` (binary units) into bytes.

    ASCII digits only, at most 20 of them, and at most MAX_BYTES: anything else raises
    SnapfsError(EINVAL).
    """
    m = _SIZE_RE.fullmatch(text.strip())
    value = int(m.group(1)) * _SUFFIX[m.group(2).upper()] if m else -1
    if not 0 <= value <= MAX_BYTES:
        raise SnapfsError(errno.EINVAL, f"bad size {text[:64]!r}: use a number with K, M, G or T")
    return value


def parse_number(text: str, what: str, maximum: int = MAX_BYTES) -> int:
    """A decimal number of ASCII digits from 0 to ``maximum``; SnapfsError(EINVAL)
    naming ``what`` otherwise (never int()'s digit-limit or Unicode-digit surprises)."""
    value = int(text) if _NUMBER_RE.fullmatch(text) else -1
    if not 0 <= value <= maximum:
        raise SnapfsError(errno.EINVAL, f"bad {what} {text[:64]!r}: use 0 to {maximum}")
    return value


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Params:
    """Mount-wide tunables (docs/design.md section 6). All sizes in bytes."""

    chunk_minimum: int = 256 * KiB
    chunk_maximum_count_shift: int = 40
    tracking_block_minimum: int = 64 * KiB
    tracking_block_maximum_count: int = 2_097_152
    diff_storage_minimum: int = 1 * GiB
    audit_file_size: int = 4 * MiB       # MOUNT/audit is rotated at this size (protect.py)

    def validate(self) -> "Params":
        """Check ranges; raise SnapfsError(EINVAL) naming the bad tunable."""
        if not (_is_power_of_two(self.chunk_minimum) and PAGE <= self.chunk_minimum <= CHUNK_MAXIMUM):
            raise SnapfsError(errno.EINVAL, "chunk minimum must be a power of two from 4K to 64M")
        if not 1 <= self.chunk_maximum_count_shift <= 63:
            raise SnapfsError(errno.EINVAL, "chunk maximum count shift must be 1..63")
        tbm = self.tracking_block_minimum
        if not (_is_power_of_two(tbm) and PAGE <= tbm <= TRACKING_BLOCK_MAXIMUM):
            raise SnapfsError(errno.EINVAL, "tracking block minimum must be a power of two from 4K to 64M")
        if self.tracking_block_maximum_count < 1:
            raise SnapfsError(errno.EINVAL, "tracking block maximum count must be positive")
        if self.diff_storage_minimum < 2 * self.chunk_minimum:
            raise SnapfsError(errno.EINVAL, "diff storage minimum must hold at least two chunks")
        if not 4 * KiB <= self.audit_file_size <= 1 * GiB:
            raise SnapfsError(errno.EINVAL, "audit file size must be from 4K to 1G")
        return self


def chunk_size(capacity: int, params: Params) -> int:
    """COW chunk size of a device: start at the minimum, double while the chunk count
    exceeds 2**chunk_maximum_count_shift, capped at 64 MiB."""
    size = params.chunk_minimum
    limit = 1 << params.chunk_maximum_count_shift
    while -(-capacity // size) > limit and size < CHUNK_MAXIMUM:
        size *= 2
    return size


def tracking_block_size(capacity: int, params: Params) -> int:
    """CBT block size: start at the minimum, double while the block count exceeds the
    maximum count, capped at 64 MiB (the count may then exceed the maximum)."""
    size = params.tracking_block_minimum
    while -(-capacity // size) > params.tracking_block_maximum_count and size < TRACKING_BLOCK_MAXIMUM:
        size *= 2
    return size


def default_state_dir() -> str:
    """Where a mount keeps its CBT unless told (``--state-dir``)."""
    if os.geteuid() == 0:
        return "/var/lib/snapfs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "snapfs")


def human(n: float) -> str:
    """A size for people to read: ``512B``, ``1.5M``."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def size_text(n: int) -> str:
    """A size as it is typed (``parse_size`` reads it back): ``256K``, ``1G``."""
    for unit in ("T", "G", "M", "K"):
        scale = 1 << (10 * "KMGT".index(unit) + 10)
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)
