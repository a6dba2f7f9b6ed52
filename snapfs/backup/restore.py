"""``backup restore``: write one device of one point to a file or a block device.

A new or emptied regular file is made sparse: its size is set first, all-zero chunks
stay holes, and so do all-zero 64 KiB pieces inside a chunk. A block device gets every
chunk written (zeros too); it must be at least the device's size and is opened O_EXCL
(not while mounted). ``delta`` keeps what TARGET already holds where it matches: each
chunk of the target is hashed and only chunks whose digest differs are written.

Chunks are loaded into a page-aligned buffer per worker and written with O_DIRECT
where offset and length allow (``Restorer``), so a restore does not fill the page cache.

Every chunk read is checked (CRC of the stored bytes, decompression, length, digest);
a damaged one stops the restore with ``Damaged`` naming point, device and offset. The
target is then incomplete, and the message says so; a target file this restore
created is removed on any failure (one that existed is left, incomplete). A write
error names the target.
"""

import contextlib
import errno
import os
import stat

from ..errors import SnapfsError
from .chunks import ChunkStore, digest_of, is_zero
from .output import Output
from .parallel import run_window
from .repo import ALIGN, DIGEST_SIZE, ZERO, Damaged, Repo, chunk_count

SPARSE_BLOCK = 64 << 10      # zero runs this long inside a chunk stay holes in a new file


def write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def open_target(target: str, size: int, delta: bool, force: bool) -> tuple[int, bool, bool]:
    """(fd, is_block_device, created: the file did not exist) ready for ``size`` bytes."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        fd = os.open(target, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        if os.lseek(fd, 0, os.SEEK_END) < size:
            os.close(fd)
            raise SnapfsError(errno.ENOSPC, f"{target} is smaller than the device ({size} bytes)")
        return fd, True, False
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise SnapfsError(errno.EINVAL, f"{target} is neither a regular file nor a block device")
    if st is not None and st.st_size and not (delta or force):
        raise SnapfsError(errno.EEXIST, f"{target} exists; --delta updates it in place, "
                          "--force overwrites it")
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if delta else os.O_TRUNC)
    fd = os.open(target, flags, 0o600)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        if st is None:
            os.unlink(target)
        raise SnapfsError.from_oserror(exc, f"making {target} {size} bytes long") from None
    return fd, False, st is None


def reopen_direct(fd: int) -> int | None:
    """A second descriptor of the open target with O_DIRECT, or None where the
    filesystem refuses it (tmpfs)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return None


def nonzero_runs(data: memoryview) -> list[tuple[int, int]]:
    """[start, end) runs of the SPARSE_BLOCK pieces of ``data`` that are not all zeros."""
    runs: list[tuple[int, int]] = []
    for start in range(0, len(data), SPARSE_BLOCK):
        end = min(start + SPARSE_BLOCK, len(data))
        if not is_zero(data[start:end].tobytes()):      # bytes compare with memcmp; views do not
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
    return runs


class Restorer:
    """Writes the chunks of one index to an open target in worker threads.

    Writes whose offset and length are multiples of ALIGN go through an O_DIRECT
    descriptor (the chunk's plaintext sits in a page-aligned buffer): no copy into the
    page cache and no dirty pages to throttle on; the rest, and every write where the
    kernel refuses O_DIRECT, through the ordinary one. The final fsync covers both."""

    def __init__(self, store: ChunkStore, fd: int, size: int, fresh_file: bool, delta: bool,
                 where: str, target: str = "the target"):
        self.store, self.fd, self.size, self.target = store, fd, size, target
        self.fresh_file, self.delta, self.where = fresh_file, delta, where
        self.chunk_size = store.repo.chunk_size
        self.written = self.skipped = 0
        self.direct = reopen_direct(fd)

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)

    def write(self, view: memoryview, offset: int) -> None:
        """O_DIRECT where aligned (EINVAL: the ordinary descriptor); an error names the target."""
        try:
            if self.direct is not None and not (offset | len(view)) % ALIGN:
                try:
                    return write_all(self.direct, view, offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            write_all(self.fd, view, offset)
        except OSError as exc:
            raise SnapfsError.from_oserror(exc, f"writing {self.target} at offset {offset}") from None

    def one(self, index: int, digest: bytes) -> tuple[int, int]:
        """(bytes written, bytes left as they were) for chunk ``index``."""
        offset = index * self.chunk_size
        length = min(self.chunk_size, self.size - offset)
        if digest == ZERO and self.fresh_file:
            return 0, length                                  # a hole
        if self.delta:
            current = os.pread(self.fd, length, offset)
            now = ZERO if is_zero(current) else digest_of(current)
            if now == digest and len(current) == length:
                return 0, length
        try:
            data = self.store.load(digest, length)[0]
        except Damaged as exc:
            raise Damaged(f"{self.where}, offset {offset} (chunk {index}, {digest.hex()[:16]}): "
                          f"{exc.message}; the restore target is incomplete") from None
        if not self.fresh_file:
            self.write(data, offset)
            return length, 0
        written = 0                       # a new file reads zeros elsewhere, without taking space
        for start, end in nonzero_runs(data):
            self.write(data[start:end], offset + start)
            written += end - start
        return written, length - written

    def run(self, digests: bytes, workers: int, progress) -> None:
        count = len(digests) // DIGEST_SIZE
        calls = ((i, self.one, i, digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]) for i in range(count))
        run_window(workers, "backup-restore", calls, lambda _, result: self._collect(result, progress))

    def _collect(self, result: tuple[int, int], progress) -> None:
        written, skipped = result
        self.written += written
        self.skipped += skipped
        progress.update(written + skipped)


def restore(repo: Repo, spec: str, name: str, target: str, out: Output, delta: bool = False,
            force: bool = False, workers: int = 4) -> dict:
    """Restore device NAME of point ``spec`` to ``target``; a summary."""
    with repo.lock("readers.lock", shared=True):
        manifest = repo.resolve(spec)
        if name not in manifest["devices"]:
            raise SnapfsError(errno.ENOENT, f"point {manifest['point']} has no device {name!r} "
                              f"(it has {', '.join(sorted(manifest['devices']))})")
        size = manifest["devices"][name]["size"]
        digests = repo.read_index(manifest, name, digest_of)
        assert len(digests) == chunk_count(size, repo.chunk_size) * DIGEST_SIZE
        fd, is_bdev, created = open_target(target, size, delta, force)
        try:
            job = Restorer(ChunkStore(repo), fd, size, not is_bdev and not delta, delta,
                           f"point {manifest['point']}, device {name}", target)
            progress = out.progress(size, f"restore {name}")
            try:
                job.run(digests, workers, progress)
            finally:
                progress.close()
                job.close()
            os.fsync(fd)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(target)
                out.warn(f"removed the incomplete {target} (this restore created it)")
            raise
        finally:
            os.close(fd)
    return {"point": manifest["point"], "device": name, "target": target, "size": size,
            "bytes_written": job.written, "bytes_unchanged": job.skipped}
