"""The qemu-storage-daemon contender: a minimal QMP client and image fleecing
(copy-before-write filter, snapshot-access node, FUSE exports)."""

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .common import BenchError
from .contenders import Contender, Take
from .procs import finish_process, lazy_unmount, shielded, spawn, tail, wait_until


class QMP:
    """A minimal QMP client: JSON lines over a unix socket; events are queued."""

    def __init__(self, path: Path, timeout: float = 120):
        """Connect, read the greeting, negotiate capabilities."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.rfile = self.sock.makefile("rb")
            self.events: list[dict] = []
            self._recv()                      # greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _recv(self) -> dict:
        """One message; EOFError when the daemon closed the socket."""
        line = self.rfile.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def execute(self, cmd: str, args: dict | None = None):
        """Run a command; return its "return" value. BenchError on a QMP error."""
        msg = {"execute": cmd} | ({"arguments": args} if args else {})
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise BenchError(f"QMP {cmd}: {reply['error'].get('desc', reply['error'])}")
            else:
                return reply.get("return")

    def wait_event(self, name: str, key: str) -> dict:
        """Wait for event ``name`` whose data id is ``key`` (socket timeout applies)."""
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name and ev.get("data", {}).get("id") == key:
                    return self.events.pop(i)
            self.events.append(self._recv())

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class Qemu(Contender):
    """qemu-storage-daemon: file node ``file0`` under raw node ``live`` (FUSE export
    ``live.img``); a snapshot = cbw filter with a sparse raw target slid under ``live``
    by blockdev-reopen, plus a snapshot-access node exported as ``snap.img``."""

    name = "qemu"
    driver = "file"        # of the protocol node file0

    def __init__(self, directory: Path, source: Path, size: int):
        """Paths of the exports, the target and the QMP socket in ``directory``."""
        super().__init__(directory, source, size)
        self.live, self.snap = directory / "live.img", directory / "snap.img"
        self.mountpoints = [self.live, self.snap]
        self.fleece, self.sock = directory / "fleece.img", directory / "qmp.sock"
        self.log = directory / "qsd.log"
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self.count = 0
        self.undo: list[Callable[[], None]] = []

    @property
    def device(self) -> Path:
        """The live export."""
        return self.live

    def start(self) -> None:
        """Start the daemon with the plain export; connect QMP."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.mountpoints:
            path.touch()
        self._reset_target()
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver={self.driver},node-name=file0,filename={self.source}",
               "--blockdev", "driver=raw,node-name=live,file=file0",
               "--export", f"type=fuse,id=exp-live,node-name=live,mountpoint={self.live},writable=on",
               "--chardev", f"socket,path={self.sock},server=on,wait=off,id=qmp0",
               "--monitor", "chardev=qmp0"]
        self.proc = spawn(cmd, self.log)
        self.qmp = wait_until(self._connect, 30, "qemu-storage-daemon QMP")
        self.pid = self.proc.pid

    def _connect(self) -> QMP | None:
        """A QMP connection once the socket listens (the export is up by then)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"qemu-storage-daemon exited with {self.proc.returncode}: {tail(self.log)}")
        try:
            return QMP(self.sock)
        except OSError:
            return None

    def _step(self, cmd: str, args: dict, undo: Callable[[], None]) -> None:
        """Run a QMP command and remember how to undo it."""
        self.qmp.execute(cmd, args)
        self.undo.append(undo)

    def take(self) -> Take:
        """blockdev-add target; [blockdev-add cbw; blockdev-reopen live on cbw] (timed:
        the snapshot point); blockdev-add snapshot-access; FUSE export of it."""
        self.count += 1
        n = self.count
        self._add({"driver": "file", "node-name": f"tmp{n}", "filename": str(self.fleece),
                   "discard": "unmap"})
        t0 = time.monotonic_ns()
        self._add({"driver": "copy-before-write", "node-name": f"cbw{n}", "file": "file0",
                   "target": f"tmp{n}", "on-cbw-error": "break-snapshot", "cbw-timeout": 30})
        self._step("blockdev-reopen", self._live_on(f"cbw{n}"),
                   partial(self.qmp.execute, "blockdev-reopen", self._live_on("file0")))
        t1 = time.monotonic_ns()
        self._add({"driver": "snapshot-access", "node-name": f"snap{n}", "file": f"cbw{n}"})
        self._step("block-export-add", {"type": "fuse", "id": f"exp-snap{n}", "node-name": f"snap{n}",
                                        "mountpoint": str(self.snap), "writable": False},
                   partial(self._del_export, f"exp-snap{n}"))
        self.image = self.snap
        return Take(t0, t1)

    def _add(self, node: dict) -> None:
        """blockdev-add, undone by blockdev-del."""
        self._step("blockdev-add", node,
                   partial(self.qmp.execute, "blockdev-del", {"node-name": node["node-name"]}))

    @staticmethod
    def _live_on(child: str) -> dict:
        """blockdev-reopen arguments: the raw node ``live`` over ``child``."""
        return {"options": [{"driver": "raw", "node-name": "live", "file": child}]}

    def copied_bytes(self) -> int:
        """Allocated bytes of the sparse target."""
        return os.stat(self.fleece).st_blocks * 512

    def _del_export(self, export_id: str) -> None:
        """block-export-del and wait until the export is really gone."""
        self.qmp.execute("block-export-del", {"id": export_id})
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", export_id)

    def release(self) -> None:
        """Undo the take in reverse order; empty the sparse target."""
        self.image = None
        while self.undo:
            self.undo.pop()()
        self._reset_target()

    def _reset_target(self) -> None:
        """An empty sparse copy-before-write target of the device's size."""
        with open(self.fleece, "wb") as f:
            f.truncate(self.size)

    def stop(self) -> None:
        """QMP quit, wait; kill if needed; unmount exports left behind (QEMU 7.2 may
        leave its FUSE mounts after quit)."""
        with shielded():
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    self.qmp.execute("quit")
                self.qmp.close()
                self.qmp = None
            finish_process(self.proc, 10)
            self.proc = None
            for path in self.mountpoints:
                lazy_unmount(path)


class QemuDevice(Qemu):
    """Qemu over a block device (the real-device section): file0 is a host_device node,
    also exported read-only by itself as ``dev.img`` for the plain reads; writes and
    fleecing go through ``live`` as in Qemu."""

    driver = "host_device"

    def __init__(self, directory: Path, source: Path, size: int):
        """One more export: ``dev.img``."""
        super().__init__(directory, source, size)
        self.direct = directory / "dev.img"
        self.mountpoints.append(self.direct)

    @property
    def reader(self) -> Path:
        """The host_device node's own export."""
        return self.direct

    def start(self) -> None:
        """Qemu's start, then the read-only export of file0."""
        super().start()
        self.qmp.execute("block-export-add", {"type": "fuse", "id": "exp-dev", "node-name": "file0",
                                              "mountpoint": str(self.direct), "writable": False})
