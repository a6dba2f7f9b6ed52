"""systemd (issue 12 item 7): tools/systemd/snapfs@.service runs the mount in the
foreground with Type=notify. systemd is not PID 1 on the test machines, so the unit's
own ExecStartPre/ExecStart lines are run here as the service manager would run them
(EnvironmentFile variables expanded, %i replaced), with a real AF_UNIX datagram socket
as $NOTIFY_SOCKET: READY=1 once the mount answers, STOPPING=1 at SIGTERM, a clean
stop that saves CBT, and a restart after a crash (the dead mount cleared by
ExecStartPre). ``systemd-analyze verify`` checks the unit file when it is installed."""

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from helpers import FUSERMOUNT, MiB, bounded, is_mounted, make_device, requires_fuse, snapfs_cli, state_files

pytestmark = requires_fuse

UNIT = Path(__file__).parent.parent / "tools" / "systemd" / "snapfs@.service"
LISTING = ["audit", "cbt", "control", "devices", "snapshots", "status"]


def service_lines(key: str) -> list[str]:
    lines, section = [], ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.startswith(key + "="):
            lines.append(line.split("=", 1)[1])
    return lines


def expand(line: str, env: dict, instance: str, log_dir: str) -> tuple[list[str], bool]:
    """A unit's command line as systemd runs it: a leading '-' ignores failure,
    ``$VAR`` as a word splits, ``${VAR}`` is one word, %i is the instance."""
    ignore = line.startswith("-")
    words = []
    for word in shlex.split(line.lstrip("-").replace("%i", instance)):
        if word.startswith("$") and not word.startswith("${"):
            words += env.get(word[1:], "").split()
            continue
        for name, value in env.items():
            word = word.replace("${" + name + "}", value)
        words.append(word)
    words = [w.replace("/var/log/snapfs", log_dir) for w in words]
    if words[0] == "/usr/local/bin/snapfs":
        words = [*snapfs_cli(), *words[1:]]
    return words, ignore


class Service:
    """One instance of the unit, started and stopped the way systemd would."""

    def __init__(self, tmp_path: Path, env: dict, notify: str):
        self.tmp, self.env, self.notify = tmp_path, env, notify
        self.proc: subprocess.Popen | None = None

    def start(self, sock: socket.socket) -> str:
        environ = {**os.environ, **self.env, "NOTIFY_SOCKET": self.notify}
        for line in service_lines("ExecStartPre"):
            cmd, ignore = expand(line, self.env, "test", str(self.tmp))
            result = subprocess.run(cmd, env=environ, capture_output=True, timeout=30)
            assert ignore or result.returncode == 0, (cmd, result)
        cmd, _ = expand(service_lines("ExecStart")[0], self.env, "test", str(self.tmp))
        self.proc = subprocess.Popen(cmd, env=environ, stdin=subprocess.DEVNULL)
        return sock.recv(4096).decode()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if is_mounted(self.env["MOUNTPOINT"]):
            subprocess.run([FUSERMOUNT, "-u", "-z", self.env["MOUNTPOINT"]], check=False)


def notify_socket(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(20)
    if abstract:
        name = f"snapfs-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        return sock, "@" + name
    path = str(tmp_path / "notify")
    sock.bind(path)
    return sock, path


def test_the_unit_file_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/snapfs", snapfs_cli()[0]))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_stopping_and_restart_after_a_crash(tmp_path, abstract):
    disk = tmp_path / "d.img"
    make_device(disk, 4 * MiB)
    mnt = str(tmp_path / "snap")
    env = {"MOUNTPOINT": mnt, "SOURCES": f"d0={disk}",
           "OPTIONS": f"-o allow_other --state-dir {tmp_path / 'state'}"}
    sock, address = notify_socket(tmp_path, abstract)
    service = Service(tmp_path, env, address)
    abort = service.cleanup
    try:
        ready = bounded(lambda: service.start(sock), 30, abort)
        assert ready.splitlines() == ["READY=1", f"STATUS=serving {mnt}"], ready
        assert sorted(bounded(lambda: os.listdir(mnt), 10, abort)) == LISTING   # ready means ready
        service.signal(signal.SIGKILL)                      # a crash: the mount is left dead
        service.proc.wait(timeout=30)
        with pytest.raises(OSError):
            os.stat(mnt)
        result = subprocess.run([*snapfs_cli(), "mount", mnt, f"d0={disk}"], capture_output=True,
                                text=True, timeout=30)          # without the unit's ExecStartPre
        assert result.returncode == 1 and f"fusermount3 -u -z {mnt}" in result.stderr, result.stderr
        ready = bounded(lambda: service.start(sock), 30, abort)   # Restart=on-failure
        assert ready.startswith("READY=1"), ready
        assert sorted(bounded(lambda: os.listdir(mnt), 10, abort)) == LISTING
        service.signal(signal.SIGTERM)                      # systemctl stop
        assert bounded(lambda: sock.recv(4096), 30, abort) == b"STOPPING=1"
        assert bounded(service.proc.wait, 30, abort) == 0
        assert not is_mounted(mnt)
        assert len(state_files(tmp_path / "state")) == 1    # CBT saved by the clean stop
    finally:
        service.cleanup()
        with contextlib.suppress(OSError):
            sock.close()
