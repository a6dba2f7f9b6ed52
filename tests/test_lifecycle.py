"""Mount lifecycle: checks before mounting, --daemon readiness, clean stops on
signals and umount, no unmount on a crash, umount refused while busy."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import FUSERMOUNT, is_mounted, make_device, requires_fuse, snapfs

pytestmark = requires_fuse



@pytest.mark.parametrize("case, message", [
    ("nonempty", "is not empty"),
    ("missing", "No such file"),
    ("directory", "not a regular file or block device"),
    ("duplicate", "used twice"),
    ("badname", "bad device name"),
])
def test_mount_refuses_bad_arguments_in_one_line(tmp_path, case, message):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = tmp_path / "d.img"
    make_device(disk, 1 << 20)
    sources = {
        "nonempty": [str(disk)], "missing": [str(tmp_path / "nope.img")],
        "directory": [f"d={tmp_path}"], "duplicate": [f"a={disk}", f"a={disk}"],
        "badname": [f"../x={disk}"],
    }[case]
    if case == "nonempty":
        (mnt / "file").write_text("x")
    result = snapfs("mount", "--state-dir", str(tmp_path / "st"), str(mnt), *sources)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not is_mounted(str(mnt))


def daemon_mount(tmp_path, disk) -> tuple[str, int]:
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    result = snapfs("mount", "--daemon", "--state-dir", str(tmp_path / "st"),
                    "--log-file", str(tmp_path / "log"), mnt, f"d={disk}")
    assert result.returncode == 0, result.stderr
    # ready means ready: no polling before the first use
    assert sorted(os.listdir(mnt)) == ["audit", "cbt", "control", "devices", "snapshots", "status"]
    status = snapfs("status", "-m", mnt, "--json")
    return mnt, json.loads(status.stdout)["pid"]


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still running")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_saves_cbt(tmp_path, sig):
    disk = tmp_path / "d.img"
    make_device(disk, 4 << 20)
    mnt, pid = daemon_mount(tmp_path, disk)
    try:
        with open(os.path.join(mnt, "devices", "d"), "r+b") as f:
            f.write(b"x" * 100)
        os.kill(pid, sig)
        wait_gone(pid)
        assert not is_mounted(mnt)
        assert len(os.listdir(tmp_path / "st" / "cbt")) == 1   # CBT persisted
        assert disk.read_bytes()[:100] == b"x" * 100
    finally:
        if is_mounted(mnt):
            subprocess.run([FUSERMOUNT, "-u", "-z", mnt], check=False)


def test_after_a_crash_the_next_mount_starts_a_new_generation(tmp_path):
    """What snapfs does about a crash: the running mount consumed its state file, so a
    SIGKILL leaves none, and the next mount cannot trust the CBT (a write may have
    been lost to it): a new generation. A clean stop, by contrast, keeps it."""
    disk = tmp_path / "d.img"
    make_device(disk, 4 << 20)
    cbt_dir = tmp_path / "st" / "cbt"

    def generation(mnt: str) -> tuple[str, int]:
        info = json.loads(snapfs("cbtinfo", "d", "-m", mnt, "--json").stdout)
        return info["generation_id"], info["changes_number"]

    mnt, pid = daemon_mount(tmp_path, disk)
    first = generation(mnt)
    assert snapfs("umount", mnt).returncode == 0
    wait_gone(pid)
    assert len(os.listdir(cbt_dir)) == 1                      # saved at the clean stop
    os.rmdir(mnt)
    mnt, pid = daemon_mount(tmp_path, disk)
    try:
        assert generation(mnt) == first                       # restored
        assert os.listdir(cbt_dir) == []                      # consumed while running
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        assert os.listdir(cbt_dir) == []                      # nothing saved by a crash
    finally:
        subprocess.run([FUSERMOUNT, "-u", "-z", mnt], check=False)
    os.rmdir(mnt)
    mnt, pid = daemon_mount(tmp_path, disk)
    try:
        again = generation(mnt)
        assert again[0] != first[0] and again[1] == 0           # a new generation
        assert "new generation" in (tmp_path / "log").read_text()
    finally:
        assert snapfs("umount", mnt).returncode == 0
        wait_gone(pid)


def test_umount_refuses_while_busy_then_stops_cleanly(tmp_path):
    disk = tmp_path / "d.img"
    make_device(disk, 4 << 20)
    mnt, pid = daemon_mount(tmp_path, disk)
    try:
        f = open(os.path.join(mnt, "devices", "d"), "rb")  # noqa: SIM115
        busy = snapfs("umount", mnt)
        assert busy.returncode == 1 and "busy" in busy.stderr, busy.stderr
        assert is_mounted(mnt) and f.read(10)             # nothing was changed
        f.close()
        done = snapfs("umount", mnt)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt)
        wait_gone(pid, 5)                                  # umount waits for the CBT save
        assert len(os.listdir(tmp_path / "st" / "cbt")) == 1
    finally:
        if is_mounted(mnt):
            subprocess.run([FUSERMOUNT, "-u", "-z", mnt], check=False)


def test_daemon_reports_mount_failure(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")                                   # empty source: refused in the child
    result = snapfs("mount", "--daemon", "--state-dir", str(tmp_path / "st"), str(mnt), str(disk))
    assert result.returncode == 1 and "empty" in result.stderr, result.stderr
    assert not is_mounted(str(mnt))


def test_a_dead_mount_says_how_to_clear_it(tmp_path):
    disk = tmp_path / "d.img"
    make_device(disk, 4 << 20)
    mnt, pid = daemon_mount(tmp_path, disk)
    try:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        for args in (["status", "-m", mnt], ["version", "-m", mnt], ["umount", mnt]):
            result = snapfs(*args)
            assert result.returncode == 1, (args, result)
            assert f"fusermount3 -u -z {mnt}" in result.stderr, (args, result.stderr)
    finally:
        subprocess.run([FUSERMOUNT, "-u", "-z", mnt], check=False)


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_missing_dev_fuse_is_one_clear_line(tmp_path, daemon):
    """As in a container started without the device: /dev/fuse hidden in a private
    mount namespace (a tmpfs over /dev)."""
    disk = tmp_path / "d.img"
    make_device(disk, 1 << 20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join([sys.executable, "-m", "snapfs", "mount", *(["--daemon"] if daemon else []),
                    "--state-dir", str(tmp_path / "st"), str(mnt), f"d={disk}"])
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs none /dev && exec {cmd}"],
                            capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "/dev/fuse is missing" in lines[0] and "--device /dev/fuse" in lines[0], lines
    assert not is_mounted(str(mnt))
