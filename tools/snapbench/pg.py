"""PostgreSQL for the benchmark's database tables: ext4 mounted from a device, a server
on a Unix socket, pgbench's tables (used by ``interpose`` and ``underload``)."""

import contextlib
import shutil
import subprocess
from pathlib import Path

from .common import BenchError
from .procs import shielded

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SCALE = 20                 # pgbench scale: ~300 MiB of tables
CLIENTS = 4


def pg_available() -> bool:
    """PostgreSQL 15 server binaries and pgbench are installed."""
    return (PG_BIN / "initdb").exists() and shutil.which("pgbench") is not None


def as_postgres(*cmd: str, **kw) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program as the postgres user (initdb refuses root)."""
    done = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=False,
                          capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise BenchError(f"{Path(cmd[0]).name} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done


@contextlib.contextmanager
def mounted(dev: Path, where: Path, mkfs: bool = False):
    """ext4 of ``dev`` (made first when ``mkfs``) mounted at ``where``; yields its
    pgdata directory (owned by postgres)."""
    if mkfs:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(dev)], check=True)
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", str(dev), str(where)], check=True)
    try:
        data = where / "pgdata"
        if not data.exists():
            data.mkdir()
            shutil.chown(data, "postgres", "postgres")
        yield data
    finally:
        with shielded():
            subprocess.run(["umount", str(where)], capture_output=True, check=False)


@contextlib.contextmanager
def server(data: Path, work: Path, init: bool = False):
    """PostgreSQL on ``data`` (initdb first, then a ``bench`` database with pgbench's
    tables, when ``init``), on a Unix socket in ``work``; yields the socket directory;
    stopped at the end."""
    sock = work / "pgsock"
    sock.mkdir(exist_ok=True)
    shutil.chown(sock, "postgres", "postgres")
    if init:
        as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust")
    opts = f"-k {sock} -c listen_addresses='' -c fsync=on -c shared_buffers=64MB"
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(data / "log"), "-w",
                "start")
    try:
        if init:
            as_postgres("createdb", "-h", str(sock), "bench")
            as_postgres("pgbench", "-h", str(sock), "-i", "-q", "-s", str(PG_SCALE), "bench", timeout=600)
        yield sock
    finally:
        with shielded():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data),
                            "-m", "fast", "-w", "stop"], capture_output=True, check=False)
