"""A seeded fuzz of the control file: a few thousand writes mixing the command
vocabulary with random and oversized arguments, binary junk and partial lines.

Every write must be answered with a documented errno and a JSON reply (never EIO),
the log must stay free of tracebacks, the mount must keep serving, both devices'
data must be unchanged, and nothing may be created outside the scratch directory.
"""

import errno
import json
import os
import random
import time
import uuid

from helpers import MiB, abort_fuse, bounded, make_device, requires_fuse

pytestmark = requires_fuse

SEED = 20261123
INPUTS = 3000
SECONDS = 40          # the fuzz stops early rather than run long on a slow machine

# the command table's errnos, and what path resolution may add (ENOTDIR, ...)
DOCUMENTED = {"EINVAL", "E2BIG", "ENOENT", "EEXIST", "EBUSY", "ESRCH", "EALREADY", "ENODEV",
              "ETIMEDOUT", "ENOSPC", "EACCES", "ENOTDIR", "ENAMETOOLONG", "ELOOP"}
COMMANDS = ["version", "status", "attach", "detach", "cbtinfo", "markdirtyblock", "snapshot_create",
            "snapshot_add", "snapshot_take", "snapshot_destroy", "snapshot_collect", "snapshot_info",
            "snapshot_waitevent"]


class Words:
    """Random arguments: mostly plausible, often hostile."""

    def __init__(self, rng: random.Random, scratch: str, ids: list[str]):
        self.rng, self.scratch, self.ids = rng, scratch, ids

    def pick(self, *choices):
        return self.rng.choice(choices)()

    def junk(self) -> str:
        r = self.rng
        return self.pick(
            lambda: "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(1, 40))),
            lambda: "9" * r.choice([20, 21, 400, 5000]),
            lambda: r.choice(["\u00b2", "\u0663", "-1", "+5", "0x10", "1e9", "\u221e", "NaN", "1.5"]),
            lambda: "x" * r.choice([64, 65, 255, 4096, 9000]),
            lambda: "'unterminated", lambda: '"a b" c\\', lambda: "",
        )

    def name(self) -> str:
        return self.pick(lambda: self.rng.choice(["d0", "d1", "nosuch", "x1", ".", "..", "../d0"]),
                         self.junk)

    def snap(self) -> str:
        return self.pick(lambda: self.rng.choice(self.ids) if self.ids else "none",
                         lambda: str(uuid.uuid4()), self.junk)

    def path(self) -> str:
        s, r = self.scratch, self.rng
        return self.pick(lambda: f"{s}/store", lambda: f"{s}/new{r.randrange(5)}.bin",
                         lambda: f"{s}/exist.bin", lambda: f"{s}/odd.img", lambda: f"{s}/dev.img",
                         lambda: f"{s}/store/../nosuchdir/x", lambda: "relative/path",
                         lambda: f"{s}/exist.bin/sub", lambda: f"{s}/" + "n" * 300, self.junk)

    def size(self) -> str:
        return self.pick(lambda: self.rng.choice(["16M", "8M", "64K", "0", "1T"]), self.junk)

    def ranges(self) -> list[str]:
        r = self.rng
        return [self.pick(lambda: f"{r.randrange(20000)}:{r.randrange(1, 64)}",
                          lambda: f"{r.randrange(1 << 40)}:{r.randrange(1 << 20)}", self.junk)
                for _ in range(r.randrange(1, 8))]

    def timeout(self) -> str:
        return self.pick(lambda: str(self.rng.randrange(0, 20)), self.junk)

    def args(self, command: str) -> list[str]:
        table = {
            "attach": lambda: [self.name(), self.path()], "detach": lambda: [self.name()],
            "cbtinfo": lambda: [self.name()], "markdirtyblock": lambda: [self.name(), *self.ranges()],
            "snapshot_create": lambda: [self.path(), self.size(),
                                        *[self.name() for _ in range(self.rng.randrange(3))]],
            "snapshot_add": lambda: [self.snap(), self.name()],
            "snapshot_take": lambda: [self.snap(), *self.rng.choice([[], ["nofreeze"], [self.junk()]])],
            "snapshot_destroy": lambda: [self.snap()], "snapshot_info": lambda: [self.name()],
            "snapshot_waitevent": lambda: [self.snap(), self.timeout()],
        }
        words = table.get(command, list)()
        if self.rng.random() < 0.1:                      # wrong argument counts
            words = words[:-1] if words and self.rng.random() < 0.5 else [*words, self.junk()]
        return words


def quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'" if word and all(c not in word for c in "'\n") else word


def one_input(rng: random.Random, words: Words) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return rng.randbytes(rng.randrange(1, 9000))                       # binary junk
    if kind < 0.08:
        return b"x" * rng.choice([8192, 8193, 9000, 200_000])              # oversized
    command = rng.choice(COMMANDS) if rng.random() < 0.95 else words.junk()
    line = " ".join([command, *(quote(w) if rng.random() < 0.8 else w for w in words.args(command))])
    data = line.encode("utf-8", "surrogateescape")
    if rng.random() < 0.05:
        data = data[: rng.randrange(len(data) + 1)]                        # partial line
    data += b"\n" if rng.random() < 0.7 else b""
    return data or b"\n"          # a write of 0 bytes never reaches the daemon


def send(control: str, data: bytes) -> tuple[str | None, dict]:
    fd = os.open(control, os.O_RDWR)
    try:
        try:
            os.write(fd, data)
            code = None
        except OSError as exc:
            code = errno.errorcode[exc.errno]
        reply = b""
        while chunk := os.read(fd, 1 << 20):
            reply += chunk
    finally:
        os.close(fd)
    return code, json.loads(reply)


def listing(*dirs: str) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(d)) for d in dirs}


def test_fuzz_control_file(mounter, tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "store").mkdir(parents=True)
    (scratch / "exist.bin").write_bytes(bytes(16 * MiB))
    (scratch / "odd.img").write_bytes(bytes(1000))
    make_device(scratch / "dev.img", MiB, seed=5)
    d0, d1 = tmp_path / "d0.img", tmp_path / "d1.img"
    data0, data1 = make_device(d0, 4 * MiB, seed=1), make_device(d1, MiB, seed=2)
    m = mounter({"d0": str(d0), "d1": str(d1)})
    outside = [str(tmp_path), os.getcwd()]     # the scratch's parent, the daemon's cwd
    before = listing(*outside)
    sent, counts, wrong = bounded(lambda: fuzz(m, str(scratch)), SECONDS + 60,
                                  lambda: abort_fuse(m.path))
    print(sent, counts)
    assert not wrong, wrong[:10]
    assert sent >= 1000, (sent, counts)
    assert counts["ok"] > 100 and counts["EINVAL"] > 100, counts
    assert m.proc.poll() is None
    assert send(m.p("control"), b"version")[1]["ok"]
    for snap_id in send(m.p("control"), b"snapshot_collect")[1]["ids"]:
        send(m.p("control"), f"snapshot_destroy {snap_id}".encode())
    assert d0.read_bytes() == data0 and d1.read_bytes() == data1
    assert listing(*outside) == before
    m.check_log()


def fuzz(m, scratch: str) -> tuple[int, dict[str, int], list]:
    """Send the seeded inputs; return how many, the count per errno, the wrong ones."""
    rng, ids = random.Random(SEED), []
    words = Words(rng, scratch, ids)
    wrong, counts = [], {}
    deadline = time.monotonic() + SECONDS
    sent = 0
    while sent < INPUTS and time.monotonic() < deadline:
        data = one_input(rng, words)
        code, reply = send(m.p("control"), data)
        sent += 1
        name = code or "ok"
        counts[name] = counts.get(name, 0) + 1
        if code is None:
            if reply.get("ok") is not True:
                wrong.append((data[:100], code, reply))
            elif "id" in reply and data.startswith(b"snapshot_create"):
                ids.append(reply["id"])
        elif code not in DOCUMENTED or reply.get("errno") != code or not reply.get("error"):
            wrong.append((data[:100], code, reply))
        while len(ids) > 3:                  # bound the storage the fuzz reserves
            send(m.p("control"), f"snapshot_destroy {ids.pop(0)}".encode())
    return sent, counts, wrong
