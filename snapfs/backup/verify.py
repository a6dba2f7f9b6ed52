"""``backup verify``: check every chunk that a point (or every point) references, each
unique chunk once, and say which points and devices a damaged chunk breaks.

A chunk passes when its file exists, its header and CRC (the stored bytes) are right,
it decompresses to its recorded length, and its BLAKE3 equals its name. An index or
manifest that fails its own checks breaks its point too.
"""

from collections import defaultdict

from .chunks import ChunkStore, digest_of
from .output import Output
from .parallel import run_window
from .repo import DIGEST_SIZE, ZERO, Damaged, Repo


def references(repo: Repo, manifests: list[dict]) -> tuple[dict, list[dict]]:
    """({digest: {(point, device): [chunk indexes]}}, broken indexes)."""
    refs: dict[bytes, dict] = defaultdict(lambda: defaultdict(list))
    broken = []
    for manifest in manifests:
        for name in manifest["devices"]:
            try:
                digests = repo.read_index(manifest, name, digest_of)
            except Damaged as exc:
                broken.append({"point": manifest["point"], "device": name, "error": exc.message})
                continue
            for i in range(len(digests) // DIGEST_SIZE):
                digest = digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
                if digest != ZERO:
                    refs[digest][(manifest["point"], name)].append(i)
    return refs, broken


def check_all(store: ChunkStore, digests: list[bytes], workers: int, progress) -> dict[bytes, str]:
    """{digest: why} for the damaged ones, checked in parallel."""
    def check(digest: bytes) -> tuple[int, str | None]:
        try:
            return len(store.load(digest)[0]), None
        except Damaged as exc:
            return 0, exc.message

    damaged = {}

    def collect(digest: bytes, result: tuple[int, str | None]) -> None:
        length, error = result
        progress.update(length)
        if error:
            damaged[digest] = error

    run_window(workers, "backup-verify", ((d, check, d) for d in digests), collect)
    return damaged


def verify(repo: Repo, out: Output, spec: str | None = None, workers: int = 4) -> dict:
    """The report: points and chunks checked, damaged chunks with the points and
    devices (and offsets) they break, broken indexes. ``ok`` is False if anything is."""
    with repo.lock("readers.lock", shared=True):
        manifests = [repo.resolve(spec)] if spec else repo.points()
        refs, broken = references(repo, manifests)
        progress = out.progress(len(refs) * repo.chunk_size, "verify")
        try:
            damaged = check_all(ChunkStore(repo), list(refs), workers, progress)
        finally:
            progress.close()
    chunk_size = repo.chunk_size
    report = [{"chunk": digest.hex(), "error": why,
               "used_by": [{"point": p, "device": d, "offsets": [i * chunk_size for i in idx]}
                           for (p, d), idx in sorted(refs[digest].items())]}
              for digest, why in damaged.items()]
    hit = sorted({(u["point"], u["device"]) for r in report for u in r["used_by"]}
                 | {(b["point"], b["device"]) for b in broken})
    return {"ok": not report and not broken, "points": len(manifests), "chunks": len(refs),
            "damaged": report, "broken_indexes": broken,
            "broken": [{"point": p, "device": d} for p, d in hit]}
