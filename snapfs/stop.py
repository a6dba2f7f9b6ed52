"""A stop: SIGINT/SIGTERM or the ``stop`` command -> a clean end of the request loop.

1. **Open files first.** While device or image files are open (a filesystem on a loop
   device over a device file, a backup copying an image) the mount keeps serving
   them: cutting them off would fail the I/O of a live filesystem. New opens of
   device and image files get ESHUTDOWN; commands keep working (a backup can still
   destroy its snapshot). The log says once which files are open, who opened them
   and who holds them now (procs.holders: descriptors, loop devices); the stop goes
   on when the last one is closed.
   **Forced** (a second signal within FORCE_WINDOW seconds of the previous one, or
   ``stop force``, which ``snapfs umount --force`` sends): no waiting; the users of
   those files get I/O errors.
2. ``Registry.stop``: refuse commands, destroy the snapshots, wait for takes in
   progress (at most PREPARE_LIMIT).
3. End the request loop (``pyfuse3.terminate``); what is still blocked STOP_GRACE
   later is cancelled (the kernel fails it once the daemon closes /dev/fuse).

Later signals are logged, never fatal. mount.py then fsyncs the sources, saves CBT
and unmounts.
"""

import logging
import os
import signal
from collections.abc import Callable

import pyfuse3
import trio

from . import procs, workers
from .fs import Operations
from .registry import Registry

log = logging.getLogger(__name__)

FORCE_WINDOW = 5.0     # seconds: a second signal this soon after the previous one forces
STOP_GRACE = 3.0       # seconds the request loop gets to finish after the snapshots are gone
REPLY_GRACE = 0.2      # for clients to read the replies of commands ended by the stop
PREPARE_LIMIT = 60.0   # a take's freeze that long is stuck: stop anyway


class Stopper:
    """Stop requests of one mount -> one stop. ``scope`` is the serving nursery's
    (cancelled at the end); ``notify`` sends systemd a state (mount.sd_notify)."""

    def __init__(self, registry: Registry, ops: Operations, scope: trio.CancelScope,
                 notify: Callable[[str], object]):
        self.registry, self.ops, self.scope, self.notify = registry, ops, scope, notify
        self.requested = trio.Event()
        self.forced = False
        self._waiting: trio.CancelScope | None = None   # the wait for open files
        self._last_signal: float | None = None
        registry.on_stop = self.request

    def request(self, force: bool, why: str = "stop command") -> None:
        """Ask for a stop (trio thread, synchronous); ``force``: do not wait for open files."""
        if force and not self.forced and self._waiting is not None:
            log.warning("%s: forcing the stop; %d device and image files still open get I/O errors",
                        why, len(self.ops.data_files))
            self._waiting.cancel()
        self.forced = self.forced or force
        if not self.requested.is_set():
            log.info("%s: stopping %s", why, self.registry.mountpoint)
            self.requested.set()
        elif not force:
            log.info("%s: already stopping", why)

    async def watch_signals(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """SIGINT/SIGTERM -> ``request``; a second one within FORCE_WINDOW forces."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                now = trio.current_time()
                soon = self._last_signal is not None and now - self._last_signal <= FORCE_WINDOW
                self._last_signal = now
                self.request(soon, f"received {signal.Signals(signum).name}")
                if not soon and self._waiting is not None:
                    log.warning("still %d device and image files open; another signal within "
                                "%.0f s forces the stop", len(self.ops.data_files), FORCE_WINDOW)

    async def run(self) -> None:
        """Wait for a request, then stop (module docstring)."""
        await self.requested.wait()
        self.notify("STOPPING=1")
        self.ops.stopping = True
        with trio.CancelScope() as self._waiting:
            if self.forced:
                self._waiting.cancel()
            await self._wait_for_files()
        self._waiting = None
        with trio.move_on_after(PREPARE_LIMIT):
            await self.registry.stop()
        await trio.sleep(REPLY_GRACE)
        pyfuse3.terminate()
        await trio.sleep(STOP_GRACE)
        log.warning("requests still blocked %.0f s after the stop: cancelling them", STOP_GRACE)
        self.scope.cancel()

    async def _wait_for_files(self) -> None:
        if not self.ops.data_files:
            return
        files = sorted({str(f) for f in self.ops.data_files.values()})
        mount = self.registry.mountpoint
        paths = tuple(sorted({os.path.join(mount, f.path) for f in self.ops.data_files.values()}))
        held = await workers.run(procs.holders, paths)
        log.warning("stop requested while %d device and image files are open: serving them until "
                    "they are closed: %s; held now by: %s. A second SIGINT/SIGTERM within %.0f s, "
                    "or 'snapfs umount --force', stops at once: their users get I/O errors",
                    len(self.ops.data_files), "; ".join(files), "; ".join(held) or "nobody visible",
                    FORCE_WINDOW)
        self.notify(f"STATUS=stopping: waiting for {len(self.ops.data_files)} open files")
        while self.ops.data_files:
            await self.ops.data_file_closed()
        log.info("every device and image file is closed: stopping")
