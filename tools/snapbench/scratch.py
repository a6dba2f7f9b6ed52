"""Scratch files: the scratch directory, the random source files, the page cache."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .common import Config, MiB, human, log
from .procs import lazy_unmount, mount_points, shielded


@contextlib.contextmanager
def scratch_dir(cfg: Config):
    """A fresh directory under --workdir (or /var/tmp), removed at the end after
    detaching anything still mounted below it."""
    base = cfg.workdir or "/var/tmp"
    os.makedirs(base, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="snapfs-bench-", dir=base))
    try:
        yield path
    finally:
        with shielded():
            remove_scratch(path)


def remove_scratch(path: Path) -> None:
    """Unmount leftovers below ``path``, then delete it (never through a live mount)."""
    below = [m for m in mount_points() if m.startswith(f"{path}/")]
    for mount in below:
        lazy_unmount(mount)
    still = [m for m in mount_points() if m.startswith(f"{path}/")]
    if still:
        log(f"still mounted, not removing {path}: {', '.join(still)}")
        return
    shutil.rmtree(path, ignore_errors=True)


def make_random_file(path: Path, size: int) -> None:
    """``size`` bytes of random data."""
    piece = 16 * MiB
    with open(path, "wb") as f:
        for offset in range(0, size, piece):
            f.write(os.urandom(min(piece, size - offset)))


def make_sources(cfg: Config, work: Path, names: list[str]) -> dict[str, Path]:
    """One random source file, copied once per contender (each has its own)."""
    log(f"creating {len(names)} random {human(cfg.size)} source files in {work}")
    first = work / f"src-{names[0]}.img"
    make_random_file(first, cfg.size)
    sources = {names[0]: first}
    for name in names[1:]:
        sources[name] = work / f"src-{name}.img"
        shutil.copyfile(first, sources[name])
    return sources


def warm(path: Path) -> None:
    """Read ``path`` once so it is in the page cache (like ``cat file >/dev/null``)."""
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def settle(source: Path) -> None:
    """Before each job: write back dirty pages (so no earlier job's writeback runs during
    this one), drop the source's clean pages, then warm it by reading it once.

    Dropping first gives every contender the same page cache: folios made by
    read-ahead. Without it a source keeps the folios of however it was last written,
    and on ext4 with large folios that alone changes the cost of a buffered 4 KiB
    write into a cached page from about 2 us (small folios, e.g. a file written in
    small pieces or copied) to about 33 us (large folios: written in big pieces, or
    read back by read-ahead) -- measured with a plain pwrite loop, no FUSE involved.
    The bench once gave snapfs the big-folio file and QEMU a copied one."""
    os.sync()
    forget(source)
    warm(source)


def forget(path: Path) -> None:
    """Drop the clean page-cache pages of ``path`` (a file or a block device)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
