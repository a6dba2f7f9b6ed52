"""``backup prune`` (which points to keep) and ``backup gc`` (remove chunks no point
references), both under the writer lock, so a concurrent create waits for neither and
cannot lose a chunk: it fails with EBUSY instead.

Keep rules (borg's semantics): ``keep_last`` keeps the N newest points; ``keep_daily``
the newest point of each of the N newest days that have points (local time), and the
same for ISO weeks and months. A point kept by any rule stays; the others go (their
manifest first, so each is gone at once, then their indexes).

gc is mark and sweep: mark every digest of every index of every point; if any index
cannot be read, stop without deleting anything (what it references is unknown); else
sweep the chunk files not marked, index directories without a manifest (left by an
interrupted create), and tmp/. It also holds readers.lock exclusively, so a running
restore or verify never loses a chunk under it.
"""

import errno
import os
import time

from ..errors import SnapfsError
from .chunks import digest_of
from .output import Output
from .repo import DIGEST_SIZE, ZERO, Damaged, Repo

PERIODS = {
    "daily": lambda t: time.strftime("%Y-%m-%d", t),
    "weekly": lambda t: time.strftime("%G-W%V", t),
    "monthly": lambda t: time.strftime("%Y-%m", t),
}


def select(manifests: list[dict], keep: dict[str, int]) -> dict[str, list[str]]:
    """{point: [rules that keep it]} for the points to keep (``keep``: rule -> N)."""
    newest_first = sorted(manifests, key=lambda m: (m["unix_time"], m["point"]), reverse=True)
    kept: dict[str, list[str]] = {}
    for m in newest_first[: keep.get("last", 0)]:
        kept.setdefault(m["point"], []).append("last")
    for rule, key in PERIODS.items():
        seen: list[str] = []
        for m in newest_first:
            period = key(time.localtime(m["unix_time"]))
            if len(seen) >= keep.get(rule, 0):
                break
            if period not in seen:
                seen.append(period)
                kept.setdefault(m["point"], []).append(rule)
    return kept


def prune(repo: Repo, keep: dict[str, int], out: Output, dry_run: bool = False) -> dict:
    """Delete the points no rule keeps, then gc (unless ``dry_run``)."""
    if not any(keep.values()):
        raise SnapfsError(errno.EINVAL, "give at least one --keep-* rule (refusing to delete every point)")
    with repo.lock():
        manifests = repo.points()
        kept = select(manifests, keep)
        removed = [m["point"] for m in manifests if m["point"] not in kept]
        for point in removed:
            out.say(f"{'would remove' if dry_run else 'removing'} point {point}")
            if not dry_run:
                repo.delete_point(point)
        result = {"kept": {p: kept[p] for p in sorted(kept)}, "removed": removed, "dry_run": dry_run}
        if not dry_run:
            result["gc"] = collect(repo)
    return result


def gc(repo: Repo) -> dict:
    with repo.lock():
        return collect(repo)


def collect(repo: Repo) -> dict:
    """Mark and sweep (module docstring); the caller holds the writer lock."""
    with repo.lock("readers.lock"):
        marked: set[bytes] = set()
        for manifest in repo.points():
            for name in manifest["devices"]:
                try:
                    digests = repo.read_index(manifest, name, digest_of)
                except Damaged as exc:
                    raise Damaged(f"gc stopped, nothing deleted: {exc.message}") from None
                marked.update(digests[i:i + DIGEST_SIZE] for i in range(0, len(digests), DIGEST_SIZE))
        marked.discard(ZERO)
        removed = freed = kept_bytes = 0
        for digest, path, size in list(repo.chunk_files()):
            if digest in marked:
                kept_bytes += size
                continue
            os.unlink(path)
            removed += 1
            freed += size
        live = {m["point"] for m in repo.points()}
        for point in os.listdir(repo.p("indexes")):
            if point not in live:
                repo.remove_indexes(point)
        repo.clear_tmp()
    return {"chunks_removed": removed, "bytes_freed": freed, "chunks_kept": len(marked),
            "bytes_kept": kept_bytes}
