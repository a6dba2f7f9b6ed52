"""``backup create``: one snapfs snapshot of all the named devices (one point in
time, filesystems frozen by default), then per device a full or CBT-incremental read
into the repository, one index per device, and the manifest last.

Per device (``plan``): when the device's newest point in the repository was taken at
the same CBT generation (and size), only the chunks overlapping CBT blocks with
``map[i] > parent changes_number`` are made again and every other digest is copied
from the parent's index; of a chunk those blocks cover only in part, only the blocks
are read from the image, over the parent's chunk read from the repository (a rebuilt
chunk; see DeviceReader); otherwise (first backup, a new generation after a crash or an offline
change of the source, a resized or replaced device, ``--full``, a failed CBT audit)
every chunk is read and hashed, and only chunks the repository lacks are stored. The
reason is printed and kept in the manifest.

With ``--at WHEN`` there is no snapshot: each device is read from a CDP view of
that instant (``cdp_view``, issue 22), whole (CBT knows only what changed since the
newest take, not since a past instant; chunks the repository has are not stored
again), and the manifest records the instant and whether it is a mark.

The snapshot (or the views) is destroyed always, also on failure or Ctrl-C/SIGTERM. A SIGKILL leaves
it alive; ``lease.json`` names it, and the next writer on the repository destroys it.
A failed run also removes the chunks it stored and its indexes (no point references
them: the run holds the writer lock, and a chunk it stored was not in the
repository); what it cannot remove is named, for ``backup gc``. A write error into
the repository names the repository and the file system it is on.
"""

import contextlib
import errno
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field

from .. import __version__
from ..cbt import changed_runs
from ..client import command, quote, read_cbt, send
from ..errors import SnapfsError
from .chunks import ChunkStore, digest_of, zero_digest
from .output import Output
from .pace import RateLimit, set_io_priority
from .parallel import run_window
from .repo import DIGEST_SIZE, ZERO, Damaged, Repo, chunk_count

STORAGE_SLACK = 64 << 20


@dataclass
class CreateOptions:
    """storage: directory (or file) for the snapshot's difference storage, never inside
    the mount; /var/tmp by default (disk-backed, an unnamed O_TMPFILE that vanishes with
    the snapshot). storage_limit: bytes (default: the devices' total size, the most
    copy-before-write can need). audit: chunks CBT calls unchanged to sample per device."""
    storage: str = "/var/tmp"
    storage_limit: int | None = None
    freeze: bool = True
    full: bool = False
    audit: int = 0
    workers: int = 4
    io_priority: str = "normal"   # pace.PRIORITIES: the I/O class the whole run reads and writes at
    rate_limit: float = 0.0       # MiB/s read from the images at most (0: no limit)
    at: str | None = None         # a past instant (UNIX seconds, ISO-8601 UTC or a mark): CDP views


def changed_pieces(cbt_map: bytes, since: int, block_size: int, size: int,
                   chunk_size: int) -> dict[int, list[tuple[int, int]]]:
    """{chunk index: [(start within the chunk, length)]}: the CBT blocks with
    ``map[i] > since`` cut at chunk borders and at the device's end (any block and
    chunk sizes: overlap, not alignment, decides which chunks are touched)."""
    pieces: dict[int, list[tuple[int, int]]] = {}
    for offset, length in changed_runs(cbt_map, since, block_size, size):
        end = min(offset + length, size)
        while offset < end:
            index, within = divmod(offset, chunk_size)
            take = min(end - offset, chunk_size - within)
            pieces.setdefault(index, []).append((within, take))
            offset += take
    return pieces


def plan(parent: dict | None, name: str, info: dict, cbt_map: bytes, chunk_size: int,
         full: bool | str) -> tuple[str | None, dict[int, list[tuple[int, int]]] | None]:
    """(why a full read is needed, None) or (None, ``changed_pieces`` since the parent).
    ``full``: True (--full) or the reason a full read is needed."""
    size = info["device_capacity"]
    if isinstance(full, str):
        return full, None
    if parent is None:
        return f"first backup of {name} in this repository", None
    old = parent["devices"][name]
    if full:
        return "full read requested (--full)", None
    if old["size"] != size:
        return f"device size changed ({old['size']} -> {size} bytes): another device", None
    if old["cbt"]["generation_id"] != info["generation_id"]:
        return (f"CBT generation changed since point {parent['point']} (the snapfs daemon stopped "
                "uncleanly, the source changed while unmounted, or the device was re-attached): "
                "its change history is gone"), None
    if old["cbt"]["changes_number"] >= info["changes_number"]:
        return "CBT changes_number did not advance since the parent point", None
    return None, changed_pieces(cbt_map, old["cbt"]["changes_number"], info["block_size"], size,
                                chunk_size)


def open_image(image: str) -> int:
    """The snapshot image, O_DIRECT where the mount accepts it: FUSE then sends reads
    as large as the request (buffered reads go through read-ahead in small requests),
    and a backup does not fill the page cache of the machine it protects."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        try:
            return os.open(image, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return os.open(image, flags)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"opening {image}") from None


@dataclass
class Chunk:
    """What reading one chunk did: its digest (or ZERO), bytes read from the image and
    from the repository, bytes stored, whether it was rebuilt from its parent, and the
    seconds its stages took (PROFILE's keys)."""
    digest: bytes
    length: int
    device: int
    repo: int = 0
    stored: int = 0
    rebuilt: bool = False
    parent_unreadable: bool = False
    seconds: dict = field(default_factory=dict)


# the stages of a chunk, timed in the worker: the manifest's "seconds" (thread-seconds)
PROFILE = ("image", "repository", "hash", "store")


class DeviceReader:
    """Reads chunks of one snapshot image in worker threads: hash, zero test, store.

    Each thread reads into its own page-aligned buffer of one chunk (repo.buffers). A chunk
    with CBT pieces that do not cover it is rebuilt: the parent point's chunk from the
    repository (checked as restore checks it), the changed pieces from the image over
    it; an unreadable parent chunk means a whole read of the chunk instead. ``stored``
    collects the digests of the chunks this run wrote (a failed run removes them)."""

    def __init__(self, image: str, size: int, store: ChunkStore, workers: int,
                 pace: RateLimit | None = None, stored: list[bytes] | None = None):
        self.image, self.size, self.store, self.workers = image, size, store, workers
        self.pace = pace or RateLimit(0)
        self.stored = stored if stored is not None else []
        self.chunk_size = store.repo.chunk_size
        self.fd = open_image(image)
        self.stats = dict(chunks_read=0, bytes_read=0, repo_bytes_read=0, chunks_rebuilt=0,
                          parents_unreadable=0, chunks_new=0, bytes_new=0, plain_new=0)
        self.seconds = dict.fromkeys(PROFILE, 0.0)

    def close(self) -> None:
        """Close the image (read-only: an error here, e.g. ENOTCONN from a dead mount,
        loses nothing and must not hide the error that ended the run)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def buffer(self, length: int) -> memoryview:
        """This thread's chunk buffer, ``length`` bytes of it."""
        return self.store.repo.buffers.get("image", length)

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from the image at ``offset`` (within the rate limit); EIO on a
        read past its end."""
        self.pace.take(len(view))
        done = 0
        while done < len(view):
            where = f"{self.image} at offset {offset + done}"
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                error = SnapfsError.from_oserror(exc, f"reading {where}")
                raise SnapfsError(error.errno, error.message + storage_trouble(self.image)) from None
            if not got:
                raise SnapfsError(errno.EIO, f"short read of {where}")
            done += got

    def fill(self, index: int, pieces: list | None, parent: bytes | None) -> Chunk:
        """Chunk ``index``'s content in this thread's buffer; a Chunk without digest."""
        offset = index * self.chunk_size
        view = self.buffer(min(self.chunk_size, self.size - offset))
        changed = sum(n for _, n in pieces) if pieces else len(view)
        unreadable, started = False, time.perf_counter()
        if changed < len(view):
            try:
                from_repo = self.store.load_into(parent, view)
            except Damaged:
                unreadable = True
            else:
                loaded = time.perf_counter()
                for start, length in pieces:
                    self.read_into(view[start:start + length], offset + start)
                return Chunk(b"", len(view), changed, from_repo, rebuilt=True, seconds={
                    "repository": loaded - started, "image": time.perf_counter() - loaded})
        started = time.perf_counter()
        self.read_into(view, offset)
        return Chunk(b"", len(view), len(view), parent_unreadable=unreadable,
                     seconds={"image": time.perf_counter() - started})

    def digest_at(self, index: int, pieces: list | None = None, parent: bytes | None = None) -> Chunk:
        """Read (or rebuild), hash and store chunk ``index``."""
        chunk = self.fill(index, pieces, parent)
        view = self.buffer(chunk.length)
        started = time.perf_counter()
        digest = digest_of(view)
        hashed = time.perf_counter()
        if digest == zero_digest(chunk.length):
            chunk.digest = ZERO
        else:
            try:
                chunk.digest, chunk.stored = digest, self.store.put(digest, view)
            except OSError as exc:
                raise repo_error(exc, self.store.repo, "storing a chunk") from None
            if chunk.stored:
                self.stored.append(digest)          # list.append: atomic across threads
        chunk.seconds |= {"hash": hashed - started, "store": time.perf_counter() - hashed}
        return chunk

    def read_all(self, indexes, digests: bytearray, progress, pieces: dict | None = None) -> None:
        """Read ``indexes`` in parallel (a bounded window of tasks) into ``digests``;
        with ``pieces`` (CBT), ``digests`` holds the parent's digests on entry."""
        def call(index: int) -> tuple:
            args = (pieces[index], bytes(digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE])
                    ) if pieces else ()
            return (index, self.digest_at, index, *args)

        run_window(self.workers, "backup-read", map(call, indexes),
                   lambda index, chunk: self._collect(index, chunk, digests, progress))

    def _collect(self, index: int, chunk: Chunk, digests: bytearray, progress) -> None:
        digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = chunk.digest
        self.stats["chunks_read"] += 1
        self.stats["bytes_read"] += chunk.device
        self.stats["repo_bytes_read"] += chunk.repo
        self.stats["chunks_rebuilt"] += chunk.rebuilt
        self.stats["parents_unreadable"] += chunk.parent_unreadable
        for stage, seconds in chunk.seconds.items():
            self.seconds[stage] += seconds
        if chunk.stored:
            self.stats["chunks_new"] += 1
            self.stats["bytes_new"] += chunk.stored
            self.stats["plain_new"] += chunk.length
        progress.update(chunk.length)

    def audit(self, parent_digests: bytes, unchanged: list[int], samples: int) -> dict:
        """Read a random sample of chunks CBT called unchanged from the image; offsets
        whose digest differs from the parent's are mismatches (the CBT missed a write)."""
        picked = sorted(random.sample(unchanged, min(samples, len(unchanged))))
        mismatches, read = [], 0
        for index in picked:
            offset = index * self.chunk_size
            view = self.buffer(min(self.chunk_size, self.size - offset))
            self.read_into(view, offset)
            read += len(view)
            digest = digest_of(view)
            if digest == zero_digest(len(view)):
                digest = ZERO
            if digest != parent_digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]:
                mismatches.append(offset)
        self.stats["bytes_read"] += read
        return {"sampled": len(picked), "bytes_read": read, "mismatches": mismatches}


def storage_trouble(image: str) -> str:
    """Why an image read failed, when its snapshot's difference storage is the cause
    (snapshots/ID/info: the storage overflowed its limit or its file system): "" or a
    sentence naming the storage."""
    try:
        with open(os.path.join(os.path.dirname(image), "info"), "rb") as f:
            info = json.loads(f.read())
    except (OSError, ValueError):
        return ""
    if not info.get("overflow"):
        return ""
    return (f"; the snapshot's difference storage ({info.get('storage')}, limit {info.get('limit')} "
            f"bytes, used {info.get('used')}) ran out of room while the devices were written: give "
            "--storage-limit more, or --storage a file system with room")


def repo_error(exc: OSError, repo: Repo, what: str) -> SnapfsError:
    """An OSError writing into the repository, naming it and, when it is full, the file
    system it is on and how to free space."""
    code = exc.errno or errno.EIO
    if code not in (errno.ENOSPC, errno.EDQUOT):
        return SnapfsError.from_oserror(exc, f"{what} in repository {repo.path}")
    mount = os.path.realpath(repo.path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    free = shutil.disk_usage(repo.path).free
    return SnapfsError(code, f"{what} in repository {repo.path}: {os.strerror(code)} on the file "
                       f"system mounted at {mount} ({free} bytes free); prune points or make room")


def discard(repo: Repo, point: str, stored: list[bytes], out: Output) -> None:
    """A failed run: remove the chunks it stored and its indexes (module docstring)."""
    left = 0
    for digest in stored:
        try:
            os.unlink(repo.chunk_path(digest))
        except FileNotFoundError:
            pass
        except OSError:
            left += 1
    shutil.rmtree(repo.p("indexes", point), ignore_errors=True)
    if stored:
        out.warn(f"removed the {len(stored) - left} chunks this failed run stored"
                 + (f"; {left} could not be removed: 'snapfs backup gc {repo.path}' frees them"
                    if left else ""))


def backup_device(repo: Repo, store: ChunkStore, point: str, name: str, image: str, info: dict,
                  cbt_map: bytes, opts: CreateOptions, out: Output, stored: list[bytes]) -> dict:
    """Back up one device of a taken snapshot; its manifest entry (index written).
    ``stored`` collects the digests of the chunks written."""
    size, chunk_size = info["device_capacity"], repo.chunk_size
    count = chunk_count(size, chunk_size)
    parent = repo.latest_with(name)
    full = f"a past instant (--at {opts.at}): read whole" if opts.at else opts.full
    reason, changed = plan(parent, name, info, cbt_map, chunk_size, full)
    reader = DeviceReader(image, size, store, opts.workers, RateLimit(opts.rate_limit), stored)
    audit = None
    try:
        if changed is not None:
            digests = bytearray(repo.read_index(parent, name, digest_of))
            if opts.audit:
                unchanged = [i for i in range(count) if i not in changed]
                audit = reader.audit(bytes(digests), unchanged, opts.audit)
                if audit["mismatches"]:
                    reason = report_audit(out, name, parent["point"], audit)
        if changed is None or reason:
            out.say(f"{name}: full read: {reason}")
            indexes, digests, changed = range(count), bytearray(count * DIGEST_SIZE), None
        else:
            out.say(f"{name}: incremental from point {parent['point']}: {len(changed)} of {count} "
                    f"chunks changed since CBT number {parent['devices'][name]['cbt']['changes_number']}")
            indexes = sorted(changed)
        progress = out.progress(sum(min(chunk_size, size - i * chunk_size) for i in indexes), name)
        try:
            reader.read_all(indexes, digests, progress, changed)
        finally:
            progress.close()
    finally:
        reader.close()
    if reader.stats["parents_unreadable"]:
        out.warn(f"{name}: {reader.stats['parents_unreadable']} chunks of point {parent['point']} did not "
                 "pass their checks; they were read whole from the device ('backup verify' names them)")
    try:
        index_digest = repo.write_index(point, name, size, bytes(digests), digest_of)
    except OSError as exc:
        raise repo_error(exc, repo, f"writing the index of {name}") from None
    zero = sum(1 for i in range(count) if digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] == ZERO)
    return {"size": size, "index": repo.index_rel(point, name), "index_digest": index_digest,
            "chunks": count, "zero_chunks": zero,
            "cbt": {k: info[k] for k in ("generation_id", "changes_number", "block_size")},
            "mode": "incremental" if reason is None else "full", "reason": reason,
            "parent": parent["point"] if parent else None, "audit": audit, **reader.stats,
            "seconds": {k: round(v, 3) for k, v in reader.seconds.items()}}


def report_audit(out: Output, name: str, parent: str, audit: dict) -> str:
    """Say loudly that the CBT missed writes; the reason of the full read that follows."""
    offsets = ", ".join(str(o) for o in audit["mismatches"][:8])
    out.warn(f"CBT AUDIT FAILED: {name}: {len(audit['mismatches'])} of {audit['sampled']} sampled "
             f"chunks that CBT reported unchanged since point {parent} differ from it (offsets "
             f"{offsets}): something wrote to the source behind snapfs, or CBT is wrong. "
             f"Reading all of {name}.")
    return (f"CBT audit found {len(audit['mismatches'])} of {audit['sampled']} sampled unchanged "
            "chunks changed")


def release_leftover(repo: Repo, out: Output) -> None:
    """Destroy the snapshot a killed create left (named by the lease), if it still lives."""
    lease = repo.read_lease()
    if lease is None:
        return
    for snap in [lease.get("snapshot") or "-", *lease.get("views", [])]:
        if os.path.isdir(os.path.join(lease.get("mount", ""), "snapshots", snap)):
            reply = send(lease["mount"], f"snapshot_destroy {quote(snap)}")
            if reply.get("ok"):
                out.say(f"destroyed snapshot {snap} left by an interrupted backup")
    repo.clear_lease()


def create(repo: Repo, names: list[str], mount: str, opts: CreateOptions, out: Output) -> dict:
    """Make one point of ``names`` (holding the writer lock); its manifest."""
    if len(set(names)) != len(names):
        raise SnapfsError(errno.EINVAL, "a device is named twice")
    set_io_priority(opts.io_priority)     # before any thread starts: they inherit it
    with repo.lock():
        repo.clear_tmp()
        release_leftover(repo, out)
        if opts.at:
            return create_at(repo, names, mount, opts, out)
        sizes = [read_cbt(mount, name)[0]["device_capacity"] for name in names]
        limit = opts.storage_limit or sum(sizes) + STORAGE_SLACK
        snap = command(mount, f"snapshot_create {quote(os.path.abspath(opts.storage))} {limit} "
                       + " ".join(quote(n) for n in names))["id"]
        repo.write_lease({"mount": mount, "snapshot": snap, "pid": os.getpid()})
        try:
            return take_and_back_up(repo, names, mount, snap, opts, out)
        finally:
            destroy(repo, mount, snap, out)


def create_at(repo: Repo, names: list[str], mount: str, opts: CreateOptions, out: Output) -> dict:
    """A point of ``names`` as they were at ``opts.at``, read from CDP views."""
    views: dict[str, dict] = {}
    try:
        for name in names:
            views[name] = command(mount, f"cdp_view {quote(name)} {quote(opts.at or '')}")
            repo.write_lease({"mount": mount, "snapshot": None, "views": [v["id"] for v in views.values()],
                              "pid": os.getpid()})
        instants = {v["instant"] for v in views.values()}
        mark = next((v["mark"] for v in views.values() if v["mark"]), None)
        out.say(f"views of {opts.at} opened" + (f" (mark {mark})" if mark else ""))
        images = {n: os.path.join(mount, "snapshots", v["id"], n) for n, v in views.items()}
        meta = {"snapshot": None, "consistency": f"mark {mark}" if mark else "crash-consistent",
                "frozen": [], "not_frozen": [],
                "at": {"when": opts.at, "instant": min(instants), "mark": mark,
                       "views": {n: v["id"] for n, v in views.items()}}}
        return back_up(repo, names, mount, images, opts, out, min(instants), meta)
    finally:
        for view in views.values():
            destroy(repo, mount, view["id"], out)


def destroy(repo: Repo, mount: str, snap: str, out: Output) -> None:
    """Destroy the run's snapshot; if that fails (a dead mount), say so and keep the
    lease for the next writer, without hiding the error that ended the run."""
    try:
        reply = send(mount, f"snapshot_destroy {quote(snap)}")
    except (SnapfsError, OSError) as exc:
        reply = {"ok": False, "error": str(exc)}
    if reply.get("ok") or reply.get("errno") == "ESRCH":
        repo.clear_lease()
    else:
        out.warn(f"could not destroy snapshot {snap}: {reply.get('error')}; "
                 "the next backup create on this repository retries")


def take_and_back_up(repo: Repo, names: list[str], mount: str, snap: str, opts: CreateOptions,
                     out: Output) -> dict:
    started = time.time()
    take = command(mount, f"snapshot_take {quote(snap)}" + ("" if opts.freeze else " nofreeze"))
    frozen, not_frozen = take.get("frozen", []), take.get("not_frozen", [])
    out.say(f"snapshot {snap} taken" + (f", froze {', '.join(frozen)}" if frozen else "")
            + (f", could NOT freeze {', '.join(not_frozen)}" if not_frozen else ""))
    meta = {"snapshot": snap, "consistency": "frozen" if frozen and not not_frozen else "crash-consistent",
            "frozen": frozen, "not_frozen": not_frozen}
    images = {name: os.path.join(mount, "snapshots", snap, name) for name in names}
    return back_up(repo, names, mount, images, opts, out, started, meta)


def back_up(repo: Repo, names: list[str], mount: str, images: dict[str, str], opts: CreateOptions,
            out: Output, started: float, meta: dict) -> dict:
    """Read every device's image into the repository and write the manifest (with
    ``meta``: snapshot, consistency, frozen, not_frozen, and ``at`` for a past instant)."""
    begun = time.time()
    point = repo.new_point_id(started)
    store, stored = ChunkStore(repo, deferred=True), []
    devices = {}
    try:
        for name in names:
            info, cbt_map = read_cbt(mount, name)
            devices[name] = backup_device(repo, store, point, name, images[name], info, cbt_map, opts, out,
                                          stored)
        try:
            store.sync()                  # the committer's first error, if any
        except OSError as exc:
            raise repo_error(exc, repo, "storing chunks") from None
    except BaseException:
        store.close()                     # no commit runs while the run's chunks are removed
        discard(repo, point, stored, out)
        raise
    store.close()
    totals = {k: sum(d[k] for d in devices.values())
              for k in ("bytes_read", "repo_bytes_read", "bytes_new", "plain_new", "chunks_new")}
    manifest = {
        "format": 1, "point": point, "unix_time": started,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "tool_version": __version__, "mount": mount, **meta, "chunk_size": repo.chunk_size,
        "devices": devices, "stats": {**totals, "duration": round(time.time() - begun, 3)},
    }
    try:
        repo.write_manifest(manifest)
    except OSError as exc:
        discard(repo, point, stored, out)
        raise repo_error(exc, repo, "writing the manifest") from None
    return manifest
