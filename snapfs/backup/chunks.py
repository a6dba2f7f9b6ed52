"""Chunk contents: the digest (BLAKE3-256 of the plaintext), the zero test, zstd
compression, and ``ChunkStore``, which puts and gets verified chunks through a Repo.

Thread-safe: create, restore, verify and the backup mount call it from worker
threads (blake3 and zstandard release the GIL, so threads hash and compress in
parallel). zstd contexts are not thread-safe, so each thread gets its own, and its
own buffers (``Repo.buffers``): ``load`` returns a view of one, valid until the same
thread loads again; ``get`` copies.
"""

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import blake3
import zstandard

from .repo import STORED, ZERO, ZSTD, Damaged, Repo, decode_chunk

SAMPLE_PIECES, SAMPLE_PIECE = 16, 4 << 10     # the compressibility sample of a chunk
COMMIT_BACKLOG = 16                           # deferred chunk files waiting for fsync (open fds)


def digest_of(data) -> bytes:
    """The chunk name: BLAKE3-256 of ``data``."""
    return blake3.blake3(data).digest()


@functools.lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    """A zero buffer per length (the chunk size, a short last chunk): compared, never copied."""
    return bytes(length)


def is_zero(data) -> bool:
    return data == _zeros(len(data))


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes: a chunk that hashes to it is all zeros
    (BLAKE3 is collision resistant), so the zero test costs nothing beyond the hash."""
    return digest_of(_zeros(length))


class ChunkStore:
    """Verified chunk I/O on one repository.

    ``deferred`` (create): ``put`` writes a chunk file under a temporary name and hands
    its fsync and rename to one committer thread, so the workers go on reading while
    the journal commits; fsyncs that queue up there share a journal commit. At most
    COMMIT_BACKLOG files wait; ``sync`` waits for all of them and raises the first
    error, so no manifest is written over a chunk that did not become durable."""

    def __init__(self, repo: Repo, deferred: bool = False):
        self.repo = repo
        self._local = threading.local()
        self._lock = threading.Lock()
        self._claimed: set[bytes] = set()     # digests stored (or being stored) by this process
        self.dirs: set[str] = set()           # chunk directories to fsync before a manifest
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="backup-commit") if deferred else None
        self._backlog = threading.BoundedSemaphore(COMMIT_BACKLOG)
        self._commits: list[Future] = []

    def _zstd(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = (zstandard.ZstdCompressor(level=self.repo.zstd_level),
                                     zstandard.ZstdDecompressor())
        return ctx

    def put(self, digest: bytes, data) -> int:
        """Store ``data`` (any buffer; not kept) under ``digest`` unless the repository
        has it; the bytes written (0 when it was there already)."""
        with self._lock:
            if digest in self._claimed:
                return 0
            self._claimed.add(digest)
        if self.repo.has_chunk(digest):
            return 0
        payload, compression = data, STORED
        if self.compressible(data):
            packed = self._zstd()[0].compress(data)
            if len(packed) < len(data):
                payload, compression = packed, ZSTD
        staged = self.repo.stage_chunk(digest, compression, len(data), payload)
        if self._committer is None:
            self._commit(staged)
        else:
            self._backlog.acquire()
            future = self._committer.submit(self._commit, staged, self._backlog.release)
            with self._lock:
                self._commits.append(future)
        return len(payload) + 16

    def _commit(self, staged: tuple[int, str, str], done=lambda: None) -> None:
        try:
            directory = self.repo.commit_chunk(*staged)
        finally:
            done()
        with self._lock:
            self.dirs.add(directory)

    def compressible(self, data) -> bool:
        """False when SAMPLE_PIECES pieces spread over ``data`` do not shrink by 3%
        under zstd together (random or already compressed data: borg's ``auto`` and
        PBS test a sample too); small chunks are always compressed."""
        step = len(data) // SAMPLE_PIECES
        if step < 4 * SAMPLE_PIECE:
            return True
        sample = b"".join(data[i * step:i * step + SAMPLE_PIECE] for i in range(SAMPLE_PIECES))
        return len(self._zstd()[0].compress(sample)) < 0.97 * len(sample)

    def sync(self) -> None:
        """Wait for the deferred commits (the first error is raised), then fsync the
        directories chunks were renamed into (before the manifest)."""
        from ..osutil import fsync_dir
        with self._lock:
            commits, self._commits = self._commits, []
        for future in commits:
            future.result()
        with self._lock:
            dirs, self.dirs = self.dirs, set()
        for directory in sorted(dirs):
            fsync_dir(directory)

    def close(self) -> None:
        """Stop the committer after the commits it holds (on every exit path: a failed
        run leaves whole chunk files, or temporary ones the next writer clears)."""
        if self._committer is not None:
            self._committer.shutdown(wait=True)

    def get(self, digest: bytes, length: int | None = None) -> bytes:
        """The plaintext of a chunk, checked: CRC of the stored bytes, decompression,
        length, and the digest recomputed. Damaged(reason) otherwise."""
        return bytes(self.load(digest, length)[0])

    def load_into(self, digest: bytes, view: memoryview) -> int:
        """Fill ``view`` with the plaintext of chunk ``digest``, checked as ``get``
        checks it; the bytes read from the repository."""
        data, stored = self.load(digest, len(view))
        view[:] = data
        return stored

    def load(self, digest: bytes, length: int | None = None) -> tuple[memoryview, int]:
        """(``get``'s plaintext, in a page-aligned buffer of this thread that is valid
        until its next load; the size of the chunk file read). ZERO (``length``
        given): zeros, nothing read."""
        if digest == ZERO:
            view = self.repo.buffers.get("plain", length)
            view[:] = _zeros(length)
            return view, 0
        raw = self.repo.read_chunk_file(digest)
        compression, plain_len, payload = decode_chunk(raw)
        if length is not None and plain_len != length:
            raise Damaged(f"chunk holds {plain_len} bytes, expected {length}")
        if compression == STORED:
            data = payload
        elif plain_len > self.repo.chunk_size:
            raise Damaged(f"chunk claims {plain_len} bytes, more than a chunk")
        else:
            data = self.decompress(payload, self.repo.buffers.get("plain", plain_len))
        if len(data) != plain_len:
            raise Damaged(f"chunk holds {len(data)} bytes, expected {plain_len}")
        if digest_of(data) != digest:
            raise Damaged("chunk content does not match its digest")
        return data, len(raw)

    def decompress(self, payload, out: memoryview) -> memoryview:
        """Decompress the zstd frame ``payload`` into ``out`` (no allocation of a chunk:
        a stream read into a reused buffer); the part filled. Damaged if the frame is
        corrupt or holds more than ``out``."""
        try:
            reader, done = self._zstd()[1].stream_reader(payload), 0
            while done < len(out) and (got := reader.readinto(out[done:])):
                done += got
            if reader.read(1):
                raise Damaged("chunk decompresses to more than its recorded length")
        except zstandard.ZstdError as exc:
            raise Damaged(f"chunk does not decompress: {exc}") from None
        return out[:done]
