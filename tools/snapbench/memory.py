"""Memory: daemon RSS with a sparse device attached, a snapshot, scattered writes."""

from .common import Config, human, log
from .contenders import Contender
from .fio import fio, scatter_job
from .procs import rss_mib
from .report import Results


def run_memory_test(c: Contender, cfg: Config, res: Results) -> None:
    """Daemon RSS with a sparse device attached, after a take, and after scattered
    writes (fio 64 KiB random writes, ``cfg.scatter`` bytes)."""
    log(f"memory on {c.name}: {human(cfg.mem_device)} sparse device")
    c.dir.mkdir(parents=True, exist_ok=True)
    with open(c.source, "wb") as f:
        f.truncate(cfg.mem_device)
    try:
        c.start()
        res.add("mem_attached", c.name, rss_mib(c.pid))
        c.take()
        res.add("mem_snapshot", c.name, rss_mib(c.pid))
        job = fio(scatter_job(c.device, cfg))
        res.add("mem_written", c.name, rss_mib(c.pid))
        res.extra[c.name]["scatter_write_iops"] = job["write"]["iops"]
        rss = [res.median(k, c.name) for k in ("mem_attached", "mem_snapshot", "mem_written")]
        log(f"  {c.name}: RSS " + ", ".join(f"{v:.1f}" for v in rss) + " MiB"
            f" (scattered 64K writes: {job['write']['iops']:.0f} IOPS)")
    finally:
        c.stop()
        c.source.unlink(missing_ok=True)
