"""The backup repository format (version 1), defined and documented here and only here.

A repository is a plain directory tree. Every file is written once under a temporary
name in ``tmp/``, fsynced, renamed into place, and its directory fsynced; nothing is
modified in place afterwards, only removed (prune, gc). So rsync or rclone can ship it
off-site, and an interrupted writer (Ctrl-C, SIGKILL, a full disk) leaves at most
unreferenced chunks and index files, which nothing reads and gc removes.

    REPO/
      config                  JSON (CONFIG below); never changes after init
      lock                    empty; writers (create, prune, gc) hold flock LOCK_EX on it
      readers.lock            empty; restore and verify hold LOCK_SH, gc LOCK_EX (so gc
                              never deletes a chunk a restore is about to read)
      lease.json              while a create runs: the snapfs mount and snapshot id it holds,
                              so the next writer can destroy a snapshot a killed create left
      chunks/XX/DIGEST        one chunk; XX = the first two hex digits of DIGEST
      indexes/POINT/NAME.idx  the fixed index of device NAME in point POINT
      points/POINT.json       the manifest: a point exists iff this file exists (renamed last)
      tmp/                    writers' temporary files (cleared by the next writer)

DIGEST: the hex BLAKE3-256 of the chunk's plaintext (config ``chunk_id``). A chunk is
the device's bytes [i * chunk_size, (i + 1) * chunk_size) (the last one may be
shorter). All-zero chunks are never stored.

Chunk file (integers little endian):

    offset size
       0     4  magic b"SBC1"
       4     1  compression: 0 = stored as is, 1 = zstd frame
       5     3  reserved, 0
       8     4  plaintext length
      12     4  CRC-32 of the payload (the stored bytes) -- cheap damage check
      16     .  payload

Restore, mount and verify check the CRC, decompress, and recompute the digest.

Index file (one per device and point; every point is a full index, there are no chains):

       0     8  magic b"SBIDX001"
       8     8  device size in bytes
      16     4  chunk size
      20     4  reserved, 0
      24     8  chunk count = ceil(size / chunk size)
      32    32  BLAKE3 of the digest array (also in the manifest)
      64  32*n  the chunk digests in device order; 32 zero bytes = an all-zero chunk

Manifest ``points/POINT.json`` (POINT = UTC time of the backup, ``YYYYmmddTHHMMSSZ``,
with ``-N`` appended when that name is taken)::

    {"format": 1, "point": POINT, "time": ISO 8601 UTC, "unix_time": float,
     "tool_version": "x.y.z", "mount": path, "snapshot": id,
     "consistency": "frozen" | "crash-consistent", "frozen": [mountpoints], "not_frozen": [...],
     "chunk_size": int,
     "devices": {NAME: {"size", "index", "index_digest", "chunks", "zero_chunks",
                        "cbt": {"generation_id", "changes_number", "block_size"},
                        "mode": "full" | "incremental", "reason": why (full reads), "parent": POINT | null,
                        "chunks_read", "bytes_read" (from the snapshot image, audit included),
                        "repo_bytes_read" (chunk files read to rebuild chunks), "chunks_rebuilt",
                        "parents_unreadable", "chunks_new", "bytes_new" (stored, compressed),
                        "plain_new", "audit": {"sampled", "mismatches": [offsets]} | null,
                        "seconds": {"image", "repository", "hash", "store"}}},
     "stats": {"bytes_read", "repo_bytes_read", "bytes_new", "plain_new", "chunks_new", "duration"}}

A rebuilt chunk (an incremental where CBT marked only some blocks of a chunk): the
parent point's chunk read from this repository and checked, the changed blocks read
from the snapshot image over it; it is then hashed and stored like any other chunk,
so the files above do not say how a chunk was made.

"seconds": the worker thread-seconds spent reading the image, reading parent chunks
from the repository, hashing, and storing (compression, chunk file writes, fsync):
where a backup's time went.

Compatibility: version 1 was extended, not bumped. "repo_bytes_read", "chunks_rebuilt",
"parents_unreadable" and "seconds" came with rebuilt chunks (issue 21); manifests
written before lack them and read as 0. Nothing else changed, and readers ignore keys they do
not know, so older and newer tools read each other's repositories.

Encryption is not built. Room for it: ``config["encryption"]`` is null; a future
version puts a key-derivation section there (algorithm, salt, parameters, a wrapped
key) and changes ``chunk_id`` to a keyed BLAKE3, so chunk names reveal nothing. This
version refuses a repository whose encryption section is not null, or whose version
it does not know.
"""

import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import struct
import threading
import time
import uuid
import zlib

from .. import __version__
from ..errors import SnapfsError
from ..osutil import fsync_dir, replace_file, write_parts

FORMAT = "snapfs-backup"
VERSION = 1
DIGEST_SIZE = 32
ZERO = bytes(DIGEST_SIZE)                # the index entry of an all-zero chunk
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 << 10, 64 << 20
ALIGN = 4096                             # O_DIRECT writes of chunk files: offsets and lengths

CHUNK_MAGIC = b"SBC1"
CHUNK_HEADER = struct.Struct("<4sB3xII")     # magic, compression, plaintext length, crc32
STORED, ZSTD = 0, 1

INDEX_MAGIC = b"SBIDX001"
INDEX_HEADER = struct.Struct("<8sQI4xQ32s")  # magic, size, chunk size, count, digest of digests

POINT_RE = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")


class Damaged(SnapfsError):
    """Stored data that fails its checks (bad magic, CRC, digest, length, missing file)."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_header(compression: int, plain_len: int, payload) -> bytes:
    """The 16-byte header of a chunk file whose payload is ``payload`` (any buffer)."""
    return CHUNK_HEADER.pack(CHUNK_MAGIC, compression, plain_len, zlib.crc32(payload))


def decode_chunk(raw) -> tuple[int, int, memoryview]:
    """(compression, plaintext length, payload) of a chunk file; Damaged if the header
    or the CRC of the stored bytes is wrong."""
    if len(raw) < CHUNK_HEADER.size:
        raise Damaged(f"chunk file truncated ({len(raw)} bytes)")
    magic, compression, plain_len, crc = CHUNK_HEADER.unpack_from(raw)
    payload = memoryview(raw)[CHUNK_HEADER.size:]
    if magic != CHUNK_MAGIC or compression not in (STORED, ZSTD):
        raise Damaged("chunk file header is damaged")
    if zlib.crc32(payload) != crc:
        raise Damaged("chunk file CRC mismatch: its stored bytes are damaged")
    return compression, plain_len, payload


def encode_index(size: int, chunk_size: int, digests: bytes, digest_of) -> bytes:
    count = len(digests) // DIGEST_SIZE
    if count != chunk_count(size, chunk_size):
        raise ValueError("index length does not match the device size")
    return INDEX_HEADER.pack(INDEX_MAGIC, size, chunk_size, count, digest_of(digests)) + digests


def decode_index(raw: bytes, digest_of) -> tuple[int, int, bytes]:
    """(size, chunk size, digests) of an index file; Damaged if it fails its checks."""
    if len(raw) < INDEX_HEADER.size:
        raise Damaged("index file truncated")
    magic, size, chunk_size, count, check = INDEX_HEADER.unpack_from(raw)
    digests = raw[INDEX_HEADER.size:]
    if (magic != INDEX_MAGIC or not chunk_size or count != chunk_count(size, chunk_size)
            or len(digests) != count * DIGEST_SIZE or digest_of(digests) != check):
        raise Damaged("index file is damaged")
    return size, chunk_size, digests


class ThreadBuffers:
    """Page-aligned buffers of one size, one per thread and name (O_DIRECT needs the
    alignment; reusing a buffer spares an allocation of a chunk and its page faults,
    which cost more than hashing it). A view is valid until its thread asks again."""

    def __init__(self, size: int):
        self.size = -(-size // ALIGN) * ALIGN
        self._local = threading.local()

    def get(self, name: str, length: int) -> memoryview:
        view = getattr(self._local, name, None)
        if view is None:
            view = memoryview(mmap.mmap(-1, self.size))
            setattr(self._local, name, view)
        return view[:length]


class Repo:
    """An opened repository: paths, locks, and the reading and writing of its files.
    Chunk contents (hashing, compression) are chunks.py's; this class moves bytes."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        try:
            with open(self.p("config"), "rb") as f:
                self.config = json.loads(f.read())
        except FileNotFoundError:
            raise SnapfsError(errno.ENOENT, f"{self.path} is not a backup repository "
                              "(no config; create one with 'snapfs backup init')") from None
        except (OSError, ValueError) as exc:
            raise SnapfsError(errno.EIO, f"{self.path}/config is unreadable: {exc}") from None
        if self.config.get("format") != FORMAT or self.config.get("version") != VERSION:
            raise SnapfsError(errno.EPROTO, f"{self.path}: unknown repository format "
                              f"{self.config.get('format')!r} version {self.config.get('version')!r}")
        if self.config.get("encryption") is not None:
            raise SnapfsError(errno.EPROTO, f"{self.path} is encrypted; this version cannot read it")
        self.chunk_size = int(self.config["chunk_size"])
        self.zstd_level = int(self.config["compression"]["level"])
        # a chunk, or a chunk file padded for O_DIRECT
        self.buffers = ThreadBuffers(self.chunk_size + CHUNK_HEADER.size + ALIGN)
        self.direct_writes = True            # until the filesystem refuses O_DIRECT

    @classmethod
    def init(cls, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE, zstd_level: int = 3) -> "Repo":
        """Create an empty repository at ``path`` (a new or empty directory)."""
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise SnapfsError(errno.EINVAL, "chunk size must be a power of two from 64K to 64M")
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        if os.listdir(path):
            raise SnapfsError(errno.EEXIST, f"{path} is not empty")
        for sub in ("chunks", "indexes", "points", "tmp"):
            os.mkdir(os.path.join(path, sub))
        for name in ("lock", "readers.lock"):
            open(os.path.join(path, name), "wb").close()
        config = {"format": FORMAT, "version": VERSION, "id": str(uuid.uuid4()),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "tool_version": __version__, "chunk_size": chunk_size, "chunk_id": "blake3",
                  "compression": {"algorithm": "zstd", "level": zstd_level}, "encryption": None}
        replace_file(os.path.join(path, "config"), [(json.dumps(config, indent=2) + "\n").encode()],
                     os.path.join(path, "tmp", "config"))
        return cls(path)

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # ----- locks ----------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str = "lock", shared: bool = False):
        """flock on REPO/NAME, not waiting: EBUSY names who holds it."""
        fd = os.open(self.p(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                who = "a create, prune or gc" if name == "lock" else "a restore or verify"
                raise SnapfsError(errno.EBUSY, f"{self.path} is in use by {who}; try again "
                                  "when it has finished") from None
            yield
        finally:
            os.close(fd)

    # ----- atomic writes --------------------------------------------------------------

    def tmp_name(self, hint: str) -> str:
        return self.p("tmp", f"{hint}.{os.getpid()}.{uuid.uuid4().hex[:12]}")

    def write_atomic(self, final: str, *parts, sync_dir: bool = True) -> None:
        """Write ``parts`` (buffers, in order) to a temporary file, fsync it, rename it
        to ``final`` (and fsync its directory unless the caller batches that)."""
        replace_file(final, parts, self.tmp_name(os.path.basename(final)), sync_dir)

    def _write_direct(self, tmp: str, view: memoryview, length: int) -> int | None:
        """Write ``view[:length]`` (``view`` page-aligned) to a new file: the whole
        ALIGN blocks with O_DIRECT, the rest through the page cache; the open fd, or
        None (nothing left behind) where the filesystem refuses O_DIRECT (tmpfs), and
        from then on."""
        if not self.direct_writes:
            return None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct_writes = False
            return None
        try:
            aligned = length // ALIGN * ALIGN
            write_parts(fd, [view[:aligned]])
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            write_parts(fd, [view[aligned:length]])
        except OSError as exc:
            os.close(fd)
            os.unlink(tmp)
            if exc.errno != errno.EINVAL:
                raise
            self.direct_writes = False
            return None
        return fd

    def clear_tmp(self) -> None:
        """Remove what interrupted writers left in tmp/ (call holding the writer lock)."""
        for name in os.listdir(self.p("tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.p("tmp", name))

    # ----- chunks ---------------------------------------------------------------------

    def chunk_path(self, digest: bytes) -> str:
        hexd = digest.hex()
        return self.p("chunks", hexd[:2], hexd)

    def has_chunk(self, digest: bytes) -> bool:
        return os.path.exists(self.chunk_path(digest))

    def write_chunk(self, digest: bytes, compression: int, plain_len: int, payload) -> str:
        """Store a chunk file (fsynced; its directory is returned for the caller to
        fsync once, before the manifest that references it is written)."""
        return self.commit_chunk(*self.stage_chunk(digest, compression, plain_len, payload))

    def stage_chunk(self, digest: bytes, compression: int, plain_len: int,
                    payload) -> tuple[int, str, str]:
        """Write a chunk file under a temporary name, not yet durable: (open fd, tmp
        path, final path) for ``commit_chunk``. ``payload`` (any buffer) and the header
        are copied into a page-aligned buffer and written with O_DIRECT where the
        filesystem allows it (no page cache to fill and write back: a backup writes
        about as much as it reads)."""
        final = self.chunk_path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        header = chunk_header(compression, plain_len, payload)
        length = len(header) + len(payload)
        view = self.buffers.get("staging", self.buffers.size)
        view[:len(header)], view[len(header):length] = header, payload
        tmp = self.tmp_name(os.path.basename(final))
        fd = self._write_direct(tmp, view, length)
        if fd is None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                write_parts(fd, [view[:length]])
            except BaseException:
                os.close(fd)
                raise
        return fd, tmp, final

    def commit_chunk(self, fd: int, tmp: str, final: str) -> str:
        """fsync and close a staged chunk file, then rename it into place (a chunk file
        under its name is always whole); its directory, for the caller to fsync."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        return os.path.dirname(final)

    def read_chunk_file(self, digest: bytes) -> memoryview:
        """The bytes of a chunk file, in this thread's "file" buffer, placed so that
        the payload is page-aligned (restore writes it with O_DIRECT)."""
        try:
            fd = os.open(self.chunk_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Damaged("chunk file is missing") from None
        try:
            size = os.fstat(fd).st_size
            if size > CHUNK_HEADER.size + self.chunk_size:
                raise Damaged(f"chunk file holds {size} bytes, more than a chunk")
            skip = ALIGN - CHUNK_HEADER.size         # so that the payload starts page-aligned
            view, done = self.buffers.get("file", skip + size)[skip:], 0
            while done < size:
                got = os.preadv(fd, [view[done:]], done)
                if not got:
                    raise Damaged("chunk file shrank while read")
                done += got
            return view
        finally:
            os.close(fd)

    def chunk_files(self):
        """(digest, path, size) of every chunk file."""
        root = self.p("chunks")
        for sub in sorted(os.listdir(root)):
            for entry in os.scandir(os.path.join(root, sub)):
                with contextlib.suppress(ValueError):
                    yield bytes.fromhex(entry.name), entry.path, entry.stat().st_size

    # ----- indexes --------------------------------------------------------------------

    def index_rel(self, point: str, name: str) -> str:
        return os.path.join("indexes", point, f"{name}.idx")

    def write_index(self, point: str, name: str, size: int, digests: bytes, digest_of) -> str:
        """Write the fixed index; returns the hex digest of its digest array."""
        os.makedirs(self.p("indexes", point), exist_ok=True)
        data = encode_index(size, self.chunk_size, digests, digest_of)
        self.write_atomic(self.p(self.index_rel(point, name)), data)
        fsync_dir(self.p("indexes"))
        return digest_of(digests).hex()

    def read_index(self, manifest: dict, name: str, digest_of) -> bytes:
        """The digest array of device NAME in a point; Damaged if it fails its checks
        or differs from what the manifest recorded."""
        entry = manifest["devices"][name]
        where = f"point {manifest['point']}, device {name}"
        try:
            with open(self.p(entry["index"]), "rb") as f:
                size, chunk_size, digests = decode_index(f.read(), digest_of)
        except FileNotFoundError:
            raise Damaged(f"{where}: index file {entry['index']} is missing") from None
        except Damaged as exc:
            raise Damaged(f"{where}: {exc.message}") from None
        if (size != entry["size"] or chunk_size != manifest["chunk_size"]
                or digest_of(digests).hex() != entry["index_digest"]):
            raise Damaged(f"{where}: index file does not match the manifest")
        return digests

    # ----- points ---------------------------------------------------------------------

    def new_point_id(self, when: float) -> str:
        base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
        point, n = base, 1
        while os.path.exists(self.p("points", f"{point}.json")) or os.path.exists(self.p("indexes", point)):
            n += 1
            point = f"{base}-{n}"
        return point

    def write_manifest(self, manifest: dict) -> None:
        """The commit of a point: after this rename it exists."""
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        self.write_atomic(self.p("points", f"{manifest['point']}.json"), data)

    def points(self) -> list[dict]:
        """Every manifest, oldest first (by backup time)."""
        found = []
        for name in os.listdir(self.p("points")):
            if name.endswith(".json") and POINT_RE.match(name[:-5]):
                found.append(self.manifest(name[:-5]))
        return sorted(found, key=lambda m: (m["unix_time"], m["point"]))

    def manifest(self, point: str) -> dict:
        try:
            with open(self.p("points", f"{point}.json"), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            raise SnapfsError(errno.ENOENT, f"no point {point!r} in {self.path}") from None
        except ValueError:
            raise Damaged(f"point {point}: manifest is damaged") from None

    def resolve(self, spec: str) -> dict:
        """A point by its name, a unique prefix of it, or ``latest``."""
        points = self.points()
        if spec == "latest" and points:
            return points[-1]
        matches = [m for m in points if m["point"] == spec] or [m for m in points
                                                                if m["point"].startswith(spec)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise SnapfsError(errno.ENOENT, f"no point {spec!r} in {self.path} (see 'snapfs backup list')")
        raise SnapfsError(errno.EINVAL, f"{spec!r} names {len(matches)} points; give more of it")

    def latest_with(self, name: str) -> dict | None:
        """The newest point that holds device NAME (the parent of its next backup),
        not counting points of a past instant (``create --at``: CBT says nothing of
        what changed since then)."""
        for manifest in reversed(self.points()):
            if name in manifest["devices"] and not manifest.get("at"):
                return manifest
        return None

    def delete_point(self, point: str) -> None:
        """Remove a manifest (the point is gone at once), then its indexes."""
        os.unlink(self.p("points", f"{point}.json"))
        fsync_dir(self.p("points"))
        self.remove_indexes(point)

    def remove_indexes(self, point: str) -> None:
        directory = self.p("indexes", point)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)

    # ----- the lease of a running create ----------------------------------------------

    def read_lease(self) -> dict | None:
        try:
            with open(self.p("lease.json"), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def write_lease(self, lease: dict) -> None:
        self.write_atomic(self.p("lease.json"), json.dumps(lease).encode())

    def clear_lease(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.p("lease.json"))
