"""Lifecycle: check, build, mount, serve, stop cleanly, persist CBT.

``run`` is the whole life of a mount:
    check arguments -> open sources (restoring CBT) -> pyfuse3.init (mount) ->
    trio.run(serve) -> on a clean end (umount, or a stop: SIGINT, SIGTERM, the stop
    command, which waits for open device and image files: stop.py): fsync sources,
    save CBT, unmount. On a crash the mount is *not* unmounted (a vanishing mountpoint
    looks empty to a running rsync) and no CBT is saved, so the next mount starts new
    generations: CBT never claims to be complete when it might not be.
"""

import errno
import logging
import os
import select
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass, field

import pyfuse3
import trio

from . import mountinfo, osutil, workers
from .cbtstate import StateStore
from .commands import check_name
from .detach import detach
from .errors import SnapfsError
from .fs import Operations
from .journal import JournalStates
from .params import Params
from .registry import Registry
from .source import Source
from .stop import Stopper

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    mountpoint: str
    sources: list[str]
    params: Params = field(default_factory=Params)
    state_dir: str = ""
    allow_other: bool = False
    read_ahead_kb: int = 4096
    image_group: int | None = None     # images and CBT files: this group, group-readable


def parse_sources(specs: list[str]) -> list[tuple[str, str]]:
    """``[NAME=]SOURCE`` -> (name, path); the default name is the file's base name."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(spec.rstrip("/")), spec
        pairs.append((check_name(name), path))
    names = [n for n, _ in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SnapfsError(errno.EINVAL, f"device name used twice: {', '.join(dupes)}")
    return pairs


def check_mountpoint(path: str) -> str:
    """The mountpoint must be an existing, empty directory that is not a mount.
    Returns its real path (what mountinfo lists: symlinks resolved)."""
    path = os.path.realpath(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise SnapfsError(errno.ENOENT, f"mountpoint {path} does not exist (mkdir -p {path})") from None
        if exc.errno == errno.ENOTCONN:
            raise SnapfsError(errno.ENOTCONN, f"{path} is a dead FUSE mount (its daemon is gone): "
                              f"clear it with 'fusermount3 -u -z {path}', then mount again") from None
    if not os.path.isdir(path):
        raise SnapfsError(errno.ENOTDIR, f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise SnapfsError(errno.EBUSY, f"mountpoint {path} is already a mount")
    if os.listdir(path):
        raise SnapfsError(errno.ENOTEMPTY, f"mountpoint {path} is not empty")
    return path


def check_source(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"source {path}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SnapfsError(errno.EINVAL, f"source {path} is not a regular file or block device")


def check_fuse() -> None:
    """FUSE is usable here: /dev/fuse exists and opens, and a non-root user has
    fusermount3. One line saying what is wrong and how to fix it otherwise."""
    if not os.path.exists("/dev/fuse"):
        raise SnapfsError(errno.ENODEV, "/dev/fuse is missing: load the fuse module (modprobe fuse); "
                          "in a container pass the device (docker run --device /dev/fuse, "
                          "bwrap --dev-bind /dev/fuse /dev/fuse)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise SnapfsError(exc.errno or errno.EIO, f"cannot open /dev/fuse ({os.strerror(exc.errno or 5)}): "
                          "a container needs the device (--device /dev/fuse) and the right to "
                          "mount FUSE (root or CAP_SYS_ADMIN)") from None
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        raise SnapfsError(errno.ENOENT, "fusermount3 is missing: apt-get install fuse3")


def check_state_dir(path: str) -> str:
    """The state directory (CBT is saved there at a clean stop) must be a writable
    directory; it is created (0700) when missing. Returns the absolute path."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise SnapfsError(errno.ENOTDIR, f"state directory {path} is not a directory")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"state directory {path}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SnapfsError(errno.EACCES, f"state directory {path} is not writable")
    return path


def build(config: MountConfig) -> tuple[Registry, Operations, StateStore]:
    """Open every source and restore its CBT. Raises SnapfsError, closing what it
    opened."""
    mountpoint = check_mountpoint(config.mountpoint)
    check_fuse()
    config.state_dir = check_state_dir(config.state_dir)
    pairs = parse_sources(config.sources)
    for _, path in pairs:
        check_source(path)
    state = StateStore(config.state_dir, config.params)
    ops = Operations(os.getuid(), os.getgid(), image_group=config.image_group)
    registry = Registry(config.params, mountpoint, cbt_store=state, listener=ops,
                        journals=JournalStates(config.state_dir))
    try:
        for name, path in pairs:
            source = Source.open(path, served_by=mountpoint)
            try:
                tracker = registry.add_device(name, source)
            except BaseException:
                source.close()
                raise
            registry.resume_journal(tracker)
    except BaseException:
        registry.close_sources()
        raise
    return registry, ops.show(registry), state


async def _tune_connection(registry: Registry, kib: int) -> None:
    """After the kernel's INIT (which sets the read-ahead and the background limit from
    the handshake): a stat of the mount from a worker thread waits for it, then the
    bdi and the connection are tuned."""
    try:
        await workers.run(os.stat, registry.mountpoint)
    except OSError as exc:
        log.warning("mount not answering (%s): read-ahead left as it is", exc)
        return
    if kib:
        await workers.run(set_read_ahead, registry.mount_dev, kib)
    await workers.run(set_background, registry.mount_dev)


# Asynchronous requests (read-ahead, direct I/O: libfuse turns on async_dio, and the
# I/O of a loop device stacked on a device file) the kernel keeps in flight on the
# connection; libfuse asks for 12. Past the limit the kernel queues them first in,
# first out: image reads waiting in the daemon for their turn (workers.bulk) would fill
# it, and a device request would wait in the kernel behind every image request queued
# before it, out of reach of the daemon's priorities. So the limit is far above what
# image reads keep waiting.
MAX_BACKGROUND = 512


FUSECTL = "/sys/fs/fuse/connections"


def mount_fusectl() -> None:
    """Mount the FUSE control file system where nothing did (systemd mounts it at boot;
    a minimal VM or a container may not): without it ``set_background`` cannot work
    and the kernel's 12 requests in flight stay (docs/performance.md has what that
    costs). Root only; a failure is logged, not fatal."""
    if not os.path.isdir(FUSECTL) or os.listdir(FUSECTL):
        return
    done = subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        log.info("cannot mount fusectl on %s: %s", FUSECTL, done.stderr.strip())


def set_background(dev: int) -> None:
    """The connection's ``max_background`` (and its congestion threshold, 3/4 of it)
    through fusectl (mounted here if it is not); otherwise the kernel's default stays."""
    base = f"{FUSECTL}/{os.minor(dev)}"
    if not os.path.exists(base):
        mount_fusectl()
    try:
        for name, value in (("max_background", MAX_BACKGROUND),
                            ("congestion_threshold", MAX_BACKGROUND * 3 // 4)):
            with open(f"{base}/{name}", "w") as f:
                f.write(str(value))
    except OSError as exc:
        log.info("cannot raise max_background through %s (%s): the kernel's 12 stays", base, exc)


def set_read_ahead(dev: int, kib: int) -> None:
    """The kernel's read-ahead on this mount's files (its bdi; 128 KiB by default).
    Buffered sequential reads of a device or an image (``cp``, ``dd``) then arrive as
    requests of up to 1 MiB, several in flight (figures: docs/performance.md,
    "Request size")."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.warning("cannot set read-ahead of the mount to %d KiB (%s): slower sequential reads",
                    kib, exc)


def run(config: MountConfig, ready=None) -> int:
    """Mount and serve until unmounted or signalled. ``ready()`` is called once the
    mount answers requests. Returns the exit status."""
    registry, ops, state = build(config)
    options = set(pyfuse3.default_options) | {"fsname=snapfs", "subtype=snapfs"}
    if config.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, registry.mountpoint, options)
    except RuntimeError as exc:
        registry.close_sources()
        raise SnapfsError(errno.EIO, f"mounting {registry.mountpoint} failed: {exc} (not permitted "
                          "to mount here? root or CAP_SYS_ADMIN is needed)") from None
    state.consume()
    workers.set_queue_probe(fuse_queue_probe())
    found = mountinfo.at(registry.mountpoint)   # never stat our own mount from its thread
    if found is None:   # without its device number the storage guard and freeze are blind
        pyfuse3.close(unmount=True)
        registry.close_sources()
        raise SnapfsError(errno.EIO, f"{registry.mountpoint} is not in /proc/self/mountinfo after mounting")
    registry.mounted(found.dev)

    def announce() -> None:
        sd_notify(f"READY=1\nSTATUS=serving {registry.mountpoint}")
        if ready is not None:
            ready()

    try:
        trio.run(serve, registry, ops, announce, config.read_ahead_kb)
    except BaseException:
        log.critical("snapfs crashed; leaving %s mounted (fusermount3 -u -z to clear)",
                     registry.mountpoint)
        pyfuse3.close(unmount=False)
        raise
    sd_notify("STOPPING=1")
    stop_cleanly(registry, state)
    pyfuse3.close(unmount=True)
    log.info("unmounted %s", registry.mountpoint)
    return 0


def fuse_queue_probe():
    """A probe of the FUSE device pyfuse3 just opened: ``probe()`` is True while a
    request waits in the kernel's queue (``poll``, no wait). None if the descriptor is
    not found as the one open /dev/fuse of this process (then no read is ever taken
    as alone)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.append(int(name))
        except OSError:
            continue
    if len(fds) != 1:
        log.info("%d /dev/fuse descriptors open: reads that miss never wait on the loop", len(fds))
        return None
    poller = select.poll()
    poller.register(fds[0], select.POLLIN)
    return lambda: bool(poller.poll(0))


# Request tasks pyfuse3 keeps alive. With its default of 1, a task that finishes a
# request ends whenever another one waits, and a new one is started for the next
# request that finds none waiting: with requests waiting on worker threads that is
# one task start and end per request, on the one trio thread.
FUSE_TASKS = 48
# At most this many requests in the daemon at once (pyfuse3's default is 99). Image
# reads wait for their turn (workers.bulk) in a request task; with too few tasks, many
# parked image reads would leave none to take the devices' next request from /dev/fuse.
FUSE_MAX_TASKS = 1024


async def serve(registry: Registry, ops: Operations, ready, read_ahead_kb: int = 0) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.serve)
        stopper = Stopper(registry, ops, nursery.cancel_scope, sd_notify)
        await nursery.start(stopper.watch_signals)
        nursery.start_soon(stopper.run)
        nursery.start_soon(_tune_connection, registry, read_ahead_kb)
        nursery.start_soon(_trim_memory)
        if ready is not None:
            nursery.start_soon(_call_ready, ready)
        log.info("serving %s with %d devices", registry.mountpoint, len(registry.devices))
        await pyfuse3.main(min_tasks=FUSE_TASKS, max_tasks=FUSE_MAX_TASKS)
        nursery.cancel_scope.cancel()


# How often the daemon hands the C allocator's free pages back (osutil.release_free_memory).
TRIM_EVERY = 30.0


async def _trim_memory() -> None:
    """Task: ``malloc_trim`` in a worker thread every TRIM_EVERY seconds."""
    while True:
        await trio.sleep(TRIM_EVERY)
        await workers.run(osutil.release_free_memory)


async def _call_ready(ready) -> None:
    ready()


def sd_notify(state: str) -> bool:
    """Tell systemd (``Type=notify``) ``state`` (``READY=1``, ``STOPPING=1``): one
    datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading ``@`` names an
    abstract socket). Without $NOTIFY_SOCKET nothing is sent; a failure is logged.
    Returns whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s (%s)", os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True


def stop_cleanly(registry: Registry, state: StateStore) -> None:
    """Destroy snapshots, fsync sources, persist CBT. A device whose fsync or save
    fails gets no state file (new generation next time)."""
    for snap in list(registry.snapshots.values()):
        snap.destroy().close()
    registry.snapshots.clear()
    for migration in registry.migrations.values():
        if migration.active:        # not cancelled by the stop (an unmount from outside)
            migration.abandon()
    registry.close_journals()          # the journals are durable before the sources
    for tracker in registry.devices.values():
        try:
            tracker.source.fsync()
            state.save(tracker.source, tracker.cbt, tracker.rules.listing() if tracker.rules else [])
        except OSError as exc:
            log.error("saving CBT of %s failed: %s (next mount: new generation)", tracker.name, exc)
        tracker.source.close()


def run_daemon(config: MountConfig, log_level: str, log_file: str | None) -> int:
    """``snapfs mount --daemon``: fork; the child mounts and reports readiness (or its
    error) through a pipe; the parent returns only then (0 ready, 1 failed)."""
    check_mountpoint(config.mountpoint)
    check_fuse()
    config.state_dir = check_state_dir(config.state_dir)
    log_file = os.path.abspath(log_file or os.path.join(config.state_dir, "snapfs.log"))
    try:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        with open(log_file, "a"):
            pass
    except OSError as exc:
        raise SnapfsError.from_oserror(exc, f"log file {log_file}") from None
    return detach(lambda ready: run(config, ready), lambda: setup_logging(log_level, log_file), "snapfs")


def setup_logging(level: str, log_file: str | None) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
