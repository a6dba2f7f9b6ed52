"""The difference storage, its failures and the event log, without FUSE.

These drive ``snapfs.control.Controller`` (commands as the control file runs them),
``DiffStorage`` and ``DiffArea`` directly inside trio (pytest-trio, ``trio_mode``),
with real temporary files as sources and storage. Storage I/O failures are injected
with the ``DiffStorage.fault`` hook (called with "write", "read" or "grow" before
the real operation; it may raise OSError).

Semantics under test (docs/design.md section 4): a storage failure corrupts the image of
the device whose chunk was being copied (event ``corrupted`` with the errno, image
I/O fails with EIO, ``snapshot_info`` error_code -errno), sticky until destroy; the
original's write always lands; destroy always works and closes the storage; a failed
growth (fallocate) is only logged.
"""

import errno
import logging
import os
import random
import threading
import time

import pytest
import trio

from snapfs import control
from snapfs.diffstorage import DiffStorage
from snapfs.errors import SnapfsError
from snapfs.events import EventLog
from snapfs.params import KiB, MiB, Params
from snapfs.registry import Registry
from snapfs.source import Source

CHUNK = 64 * KiB
# small portions so growth and overflow happen within a few MiB
PARAMS = Params(chunk_minimum=CHUNK, diff_storage_minimum=1 * MiB).validate()


# ----- fixtures and helpers ------------------------------------------------------------------

class Fault:
    """``DiffStorage.fault``: counts calls per operation; raises OSError(code) on ``op``
    once it has been called more than ``after`` times for it."""

    def __init__(self, op: str, after: int = 0, code: int = errno.EIO):
        self.op, self.after, self.code = op, after, code
        self.calls = {"write": 0, "read": 0, "grow": 0}

    def __call__(self, op: str) -> None:
        self.calls[op] += 1
        if op == self.op and self.calls[op] > self.after:
            raise OSError(self.code, os.strerror(self.code))


class Env:
    def __init__(self, tmp_path, sizes: dict[str, int]):
        self.tmp = tmp_path
        self.reg = Registry(PARAMS)
        self.initial: dict[str, bytes] = {}
        self.model: dict[str, bytearray] = {}
        self.store = tmp_path / "store"
        self.store.mkdir()
        for i, (name, size) in enumerate(sizes.items()):
            data = random.Random(i).randbytes(size)
            path = tmp_path / f"{name}.img"
            path.write_bytes(data)
            self.initial[name] = data
            self.model[name] = bytearray(data)
            self.reg.add_device(name, Source.open(str(path)))

    async def execute(self, line: str) -> dict:
        return await control.execute(self.reg, line)

    async def snapshot(self, limit: str, *names: str, storage: str | None = None):
        names = names or tuple(self.reg.devices)
        target = storage or str(self.store)
        snap_id = (await self.execute(f"snapshot_create {target} {limit} {' '.join(names)}"))["id"]
        await self.execute(f"snapshot_take {snap_id} nofreeze")
        return self.reg.snapshots[snap_id]

    async def write(self, name: str, offset: int, data: bytes) -> None:
        """A device write; it must land in full whatever happens to the snapshot."""
        n = await self.reg.devices[name].write(offset, data)
        assert n == len(data)
        self.model[name][offset : offset + n] = data

    async def touch_chunks(self, name: str, chunks, seed: int = 0) -> None:
        rnd = random.Random(seed)
        for i in chunks:
            await self.write(name, i * CHUNK + rnd.randrange(CHUNK - 100), rnd.randbytes(100))

    def source(self, name: str) -> bytes:
        t = self.reg.devices[name]
        return t.source.pread(0, t.capacity)

    def check_devices(self) -> None:
        for name in self.reg.devices:
            assert self.source(name) == bytes(self.model[name]), name

    def close(self) -> None:
        for snap in list(self.reg.snapshots.values()):
            snap.destroy().close()
        for t in self.reg.devices.values():
            t.source.close()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, {"d": 4 * MiB, "e": 2 * MiB + 4096})
    try:
        yield e
    finally:
        e.close()


async def until(pred) -> None:
    """Poll ``pred`` for up to 10 s: the state it looks at is changed by worker threads
    and tasks of the code under test, which offer no event to wait on."""
    with trio.fail_after(10):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.01)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


async def assert_eio(fn, *args) -> None:
    with pytest.raises(SnapfsError) as info:
        await fn(*args)
    assert info.value.errno == errno.EIO, info.value


def corrupted_events(snap) -> list[tuple[str, int]]:
    return [(e["device"], e["error_code"]) for e in snap.events.events if e["event"] == "corrupted"]


# ----- storage I/O errors -------------------------------------------------------------------------

@pytest.mark.parametrize("after", [0, 3])
async def test_storage_write_eio_corrupts_image_never_the_device(env, after):
    snap = await env.snapshot("64M", "d")
    area, storage = snap.areas["d"], snap.storage
    storage.fault = fault = Fault("write", after=after)

    await env.touch_chunks("d", range(after + 4))
    env.check_devices()                                        # every write landed
    assert area.error == errno.EIO
    assert corrupted_events(snap) == [("d", errno.EIO)]
    assert snap.events.events[0]["time"] > 0
    assert area.cow_copies == len(area.slots) == after         # copies before the failure
    assert fault.calls["write"] == after + 1                   # no copy attempted after it
    await assert_eio(area.read, 0, 4096)
    await assert_eio(area.read, 3 * MiB, 10)                         # a chunk never copied
    await assert_eio(env.reg.devices["d"].image_write, area, 5 * CHUNK, b"x")
    assert (await env.execute("snapshot_info d"))["error_code"] == -errno.EIO
    info = snap.info()
    assert info["state"] == "corrupted"
    assert info["devices"]["d"]["error_code"] == -errno.EIO
    assert info["devices"]["d"]["state"] == "corrupted"

    # sticky: the storage works again, the image stays corrupted, no second event
    storage.fault = None
    await env.touch_chunks("d", range(10, 14), seed=1)
    env.check_devices()
    assert area.error == errno.EIO and len(snap.events.events) == 1
    await assert_eio(area.read, 10 * CHUNK, 10)

    fd = storage.fd
    await env.execute(f"snapshot_destroy {snap.id}")
    assert storage.closed and not fd_is_open(fd)
    assert os.listdir(env.store) == []
    assert env.reg.devices["d"].area is None and env.reg.devices["d"].snapshot_id is None
    await env.touch_chunks("d", range(20, 22))                 # tracking goes on
    env.check_devices()


async def test_storage_read_eio_corrupts_image(env):
    snap = await env.snapshot("64M", "d")
    area, storage = snap.areas["d"], snap.storage
    await env.touch_chunks("d", [0, 1])
    assert await area.read(0, 2 * CHUNK) == env.initial["d"][: 2 * CHUNK]
    storage.fault = Fault("read")

    await assert_eio(area.read, 100, 10)
    assert area.error == errno.EIO
    assert corrupted_events(snap) == [("d", errno.EIO)]
    await assert_eio(area.read, 5 * CHUNK, 10)                       # sticky, also for uncopied chunks
    storage.fault = None
    await assert_eio(area.read, 100, 10)
    await env.touch_chunks("d", [7, 8])                        # no COW any more, writes land
    assert area.cow_copies == 2
    env.check_devices()
    assert (await env.execute("snapshot_info d"))["error_code"] == -errno.EIO
    await env.execute(f"snapshot_destroy {snap.id}")
    assert storage.closed


async def test_image_write_with_failing_storage(env):
    snap = await env.snapshot("64M", "d")
    area = snap.areas["d"]
    tracker = env.reg.devices["d"]
    await tracker.image_write(area, 3, b"ok")                       # works before the fault
    assert await area.read(0, 8) == env.initial["d"][:3] + b"ok" + env.initial["d"][5:8]
    snap.storage.fault = Fault("write", code=errno.ENOSPC)
    await assert_eio(tracker.image_write, area, 3 * CHUNK, b"x" * 10)
    assert area.error == errno.ENOSPC
    assert corrupted_events(snap) == [("d", errno.ENOSPC)]
    assert env.source("d") == env.initial["d"]                  # image writes never reach it
    await assert_eio(area.read, 0, 8)


async def test_source_read_error_during_copy_corrupts_image(env):
    """A failing read of the old chunk (the source) must not fail the device write
    either: the image is corrupted with that errno instead."""
    snap = await env.snapshot("64M", "d")
    area = snap.areas["d"]

    def failing(offset, size):
        raise OSError(errno.EIO, "injected source read error")

    area.source.io.inline = False            # as if not cached: the blocking read fails
    area.source.io.pread = failing
    await env.touch_chunks("d", [2])
    env.check_devices()
    assert area.error == errno.EIO and corrupted_events(snap) == [("d", errno.EIO)]


async def test_destroy_always_works_and_removes_named_storage(env):
    named = env.tmp / "diff.bin"
    snap = await env.snapshot("8M", "d", "e", storage=str(named))
    storage = snap.storage
    assert storage.description == f"{named} (unlinked)" and not named.exists()
    assert os.fstat(storage.fd).st_size == 1 * MiB
    storage.fault = Fault("write")
    await env.touch_chunks("d", [0])
    await env.touch_chunks("e", [0])
    assert corrupted_events(snap) == [("d", errno.EIO), ("e", errno.EIO)]
    storage.fault = Fault("read")        # even with every storage operation failing
    await env.execute(f"snapshot_destroy {snap.id}")
    assert storage.closed and not named.exists()
    assert env.reg.snapshots == {}
    with pytest.raises(SnapfsError) as info:
        await env.execute(f"snapshot_destroy {snap.id}")
    assert info.value.errno == errno.ESRCH
    storage.close()                      # idempotent
    env.check_devices()


async def test_destroy_corrupted_keeps_existing_storage_file(env):
    existing = env.tmp / "pre.bin"
    existing.write_bytes(b"\0" * (2 * MiB))
    snap = await env.snapshot("8M", "d", storage=str(existing))
    snap.storage.fault = Fault("write")
    await env.touch_chunks("d", [0])
    assert snap.areas["d"].error == errno.EIO
    await env.execute(f"snapshot_destroy {snap.id}")
    assert existing.exists()             # a file snapfs did not create is left in place


# ----- overflow ----------------------------------------------------------------------------------

async def test_overflow_no_space_then_corrupted_sticky_for_every_device(env):
    """LIMIT 1M = one portion: no_space once 512K are used, overflow at 1M. The
    overflow is sticky for the whole storage: another device corrupts as soon as it
    needs a new slot, but keeps working for chunks it already has."""
    snap = await env.snapshot("1M", "d", "e")
    storage = snap.storage
    assert (storage.capacity, storage.requested, storage.limit) == (1 * MiB, 1 * MiB, 1 * MiB)
    await env.touch_chunks("e", [0])
    await env.touch_chunks("d", range(6))
    assert [e["event"] for e in snap.events.events] == []
    await env.touch_chunks("d", range(6, 7))                   # used 512K: half left
    assert [e["event"] for e in snap.events.events] == ["no_space"]
    assert snap.events.events[0]["requested_bytes"] == 1 * MiB
    await env.touch_chunks("d", range(7, 20))
    assert [e["event"] for e in snap.events.events] == ["no_space", "corrupted"]
    assert corrupted_events(snap) == [("d", errno.ENOSPC)]
    assert storage.overflow and storage.filled == 1 * MiB
    assert snap.areas["d"].cow_copies == 15

    await env.touch_chunks("e", [0], seed=5)                   # copied already: stays intact
    assert snap.areas["e"].error == 0
    assert await snap.areas["e"].read(0, CHUNK) == env.initial["e"][:CHUNK]
    await env.touch_chunks("e", [3])                           # needs a slot: corrupted
    assert corrupted_events(snap) == [("d", errno.ENOSPC), ("e", errno.ENOSPC)]
    assert [(await env.execute(f"snapshot_info {n}"))["error_code"] for n in "de"] == [-28, -28]
    env.check_devices()
    assert len([e for e in snap.events.events if e["event"] == "no_space"]) == 1
    assert os.fstat(storage.fd).st_size <= storage.limit
    await env.execute(f"snapshot_destroy {snap.id}")


async def test_growth_inline_respects_limit(env):
    """No nursery: growth happens inline. Portions of 1M up to LIMIT 3M."""
    snap = await env.snapshot("3M", "d")
    storage = snap.storage
    sizes = []
    for i in range(60):
        await env.touch_chunks("d", [i])
        sizes.append(storage.capacity)
        assert storage.filled <= storage.requested <= storage.limit
        assert os.fstat(storage.fd).st_size == storage.capacity <= storage.limit
    # 1M at create; +1M at 512K used, +1M at 1.5M used; no_space at 2.5M; overflow at 3M
    assert sorted(set(sizes)) == [1 * MiB, 2 * MiB, 3 * MiB]
    assert sizes.index(2 * MiB) == 512 * KiB // CHUNK - 1
    assert sizes.index(3 * MiB) == 1536 * KiB // CHUNK - 1
    assert [e["event"] for e in snap.events.events] == ["no_space", "corrupted"]
    assert snap.areas["d"].cow_copies == 48
    env.check_devices()


async def test_growth_worker_extends_storage(env):
    async with trio.open_nursery() as nursery:
        await nursery.start(env.reg.serve)
        snap = await env.snapshot("8M", "d")
        storage = snap.storage
        # The worker runs while writers go on (their copies wait in threads too):
        # 1.5 MiB of slots past the trigger keep writers going.
        await env.touch_chunks("d", range(20))                 # 1.25M used: grow to 2M
        assert storage.requested == 2 * MiB and storage.capacity in (1 * MiB, 2 * MiB)
        await until(lambda: storage.capacity == 2 * MiB)
        await env.touch_chunks("d", range(20, 39))             # 2.44M used: grow to 3M
        assert storage.requested == 3 * MiB
        await until(lambda: storage.capacity == 3 * MiB)
        await trio.sleep(0.05)
        assert storage.requested == 3 * MiB                    # 576K free: no more growth
        assert os.fstat(storage.fd).st_size == 3 * MiB
        assert await snap.areas["d"].read(0, 4 * MiB) == env.initial["d"]
        assert snap.events.events == []
        await env.execute(f"snapshot_destroy {snap.id}")
        nursery.cancel_scope.cancel()


# ----- growth failures --------------------------------------------------------------------------

@pytest.mark.parametrize("worker", [False, True], ids=["inline", "worker"])
async def test_growth_failure_is_logged_not_fatal(env, caplog, worker):
    caplog.set_level(logging.WARNING, logger="snapfs.diffstorage")
    async with trio.open_nursery() as nursery:
        if worker:
            await nursery.start(env.reg.serve)
        snap = await env.snapshot("8M", "d")
        storage, area = snap.storage, snap.areas["d"]
        storage.fault = fault = Fault("grow", code=errno.ENOSPC)
        for batch, calls in ((range(12), 1), (range(12, 39), 2)):   # growth wanted twice
            await env.touch_chunks("d", batch)
            await until(lambda calls=calls: fault.calls["grow"] == len(caplog.records) == calls)
        assert "growing storage" in caplog.text and "No space left" in caplog.text
        assert storage.capacity == 1 * MiB                     # fallocate never succeeded
        assert storage.requested == 3 * MiB                    # slots still handed out...
        assert os.fstat(storage.fd).st_size == 39 * CHUNK       # ...pwrite extended the file
        assert area.error == 0 and snap.events.events == []
        assert await area.read(0, 4 * MiB) == env.initial["d"]
        env.check_devices()
        await env.execute(f"snapshot_destroy {snap.id}")
        assert storage.closed
        nursery.cancel_scope.cancel()


async def test_destroy_waits_for_running_growth(env):
    """Destroy must never close the storage fd under a running fallocate."""
    trace: list[str] = []
    lock = threading.Lock()

    def note(what):
        with lock:
            trace.append(what)

    async with trio.open_nursery() as nursery:
        await nursery.start(env.reg.serve)
        snap = await env.snapshot("8M", "d")
        storage = snap.storage
        real_grow, real_close = storage.grow_blocking, storage.close

        def slow_grow(target):
            note("grow-start")
            time.sleep(0.3)
            note("fd-open" if fd_is_open(storage.fd) and not storage.closed else "fd-closed")
            real_grow(target)
            note("grow-end")

        def close():
            note("close")
            real_close()

        storage.grow_blocking, storage.close = slow_grow, close
        await env.touch_chunks("d", range(8))                  # triggers growth
        await until(lambda: "grow-start" in trace)
        await env.execute(f"snapshot_destroy {snap.id}")
        nursery.cancel_scope.cancel()
    assert trace == ["grow-start", "fd-open", "grow-end", "close"], trace


async def test_destroy_right_after_growth_trigger(env, caplog):
    """Growth is triggered by a write and destroy follows before the growth task had a
    chance to start: the growth must then not run at all, or finish before the fd is
    closed (a fallocate on a closed -- or reused -- fd number would extend some other
    file of the daemon)."""
    caplog.set_level(logging.WARNING, logger="snapfs.diffstorage")
    trace: list[str] = []
    lock = threading.Lock()

    def note(what):
        with lock:
            trace.append(what)

    async with trio.open_nursery() as nursery:
        await nursery.start(env.reg.serve)
        snap = await env.snapshot("8M", "d")
        storage = snap.storage
        real_grow, real_close = storage.grow_blocking, storage.close

        def grow(target):
            note("grow-start")
            time.sleep(0.05)
            try:
                real_grow(target)
            finally:
                note("grow-end")

        def close():
            note("close-start")
            real_close()
            note("close-end")

        storage.grow_blocking, storage.close = grow, close
        await env.touch_chunks("d", range(7))
        assert "grow-start" not in trace
        await env.touch_chunks("d", [7])                       # 512K used: growth queued
        assert storage.requested == 2 * MiB
        await env.execute(f"snapshot_destroy {snap.id}")   # no checkpoint in between
        nursery.cancel_scope.cancel()
        # the daemon goes on opening files (a new storage, an attached source): the
        # lowest free fd number is the storage's old one
        victim = env.tmp / "victim.bin"
        victim_fd = os.open(victim, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(victim_fd)
    assert victim.stat().st_size == 0, "a late fallocate of the destroyed storage hit another file"
    assert "growing storage" not in caplog.text, caplog.text   # e.g. EBADF from fallocate
    if "grow-start" in trace:
        assert trace.index("grow-end") < trace.index("close-start"), trace
    assert trace[-1] == "close-end", trace


# ----- events -------------------------------------------------------------------------------------

async def test_wait_event_timeout_order_and_destroy(env):
    snap = await env.snapshot("1M", "d")
    with pytest.raises(SnapfsError) as info:
        await env.execute(f"snapshot_waitevent {snap.id} 100")
    assert info.value.errno == errno.ETIMEDOUT

    got: list[dict] = []

    async def waiter():
        got.append((await env.execute(f"snapshot_waitevent {snap.id} 10000"))["event"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        assert got == []
        await env.touch_chunks("d", range(20))                 # no_space, then overflow
    assert [e["event"] for e in got] == ["no_space"]
    second = (await env.execute(f"snapshot_waitevent {snap.id} 100"))["event"]
    assert second["event"] == "corrupted" and second["error_code"] == errno.ENOSPC
    assert second["device"] == "d" and got[0]["time"] <= second["time"]
    with pytest.raises(SnapfsError) as info:
        await env.reg.wait_event(snap.id, 0.05)
    assert info.value.errno == errno.ETIMEDOUT
    assert snap.events.listeners == [env.reg.listener.events_changed]   # waiters unregister

    async def destroy_soon():
        await trio.sleep(0.1)
        await env.execute(f"snapshot_destroy {snap.id}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(destroy_soon)
        with trio.fail_after(5), pytest.raises(SnapfsError) as info:
            await env.reg.wait_event(snap.id, 10)
    assert info.value.errno == errno.ESRCH


async def test_event_listener_called_for_every_event_and_close(env):
    calls: list[int] = []
    class Listener:
        def events_changed(self):
            calls.append(len(calls))

        async def snapshot_destroyed(self, snap):
            pass

        def device_detached(self, tracker):
            pass

    env.reg.listener = Listener()
    snap = await env.snapshot("1M", "d")
    await env.touch_chunks("d", range(20))
    assert len(calls) == 2
    await env.execute(f"snapshot_destroy {snap.id}")
    assert len(calls) == 3                                     # close wakes readers too
    snap.events.post("corrupted", device="d", error_code=5)    # ignored once closed
    assert len(snap.events.events) == 2 and len(calls) == 3


def test_event_log_streams_and_pop_cursor():
    log = EventLog()
    log.post("no_space", requested_bytes=7)
    log.post("corrupted", device="x", error_code=28)
    lines = log.read(0, 1 << 20).splitlines()
    assert len(lines) == 2 and log.read(len(log.text), 10) == b""
    first = log.read(0, 10) + log.read(10, 1 << 20)           # any reader, any offsets
    assert first == bytes(log.text)
    assert log.pop_nowait()["event"] == "no_space"
    assert log.pop_nowait()["event"] == "corrupted"
    assert log.pop_nowait() is None
    assert log.read(0, 1 << 20) == bytes(log.text)             # popping does not consume


# ----- DiffStorage alone --------------------------------------------------------------------------

def test_diffstorage_alloc_never_exceeds_limit(tmp_path):
    target = tmp_path / "s.bin"
    s = DiffStorage.open(str(target), 5 * MiB, 2 * MiB, lambda st: None)
    no_space: list[int] = []
    s.on_no_space = no_space.append
    try:
        offsets = []
        with pytest.raises(SnapfsError) as info:
            while True:
                offsets.append(s.alloc(CHUNK))
                s.write(offsets[-1], b"z" * CHUNK)
        assert info.value.errno == errno.ENOSPC
        assert offsets == list(range(0, 5 * MiB, CHUNK))       # in order, never reused
        assert no_space == [5 * MiB]
        assert s.capacity == s.requested == s.filled == 5 * MiB
        assert os.fstat(s.fd).st_size == 5 * MiB
        with pytest.raises(SnapfsError):                       # sticky
            s.alloc(1)
        assert s.statistics() == {"storage": f"{target} (unlinked)", "size": 5 * MiB, "requested": 5 * MiB,
                                  "used": 5 * MiB, "limit": 5 * MiB, "overflow": True}
    finally:
        s.close()
    assert not target.exists()


def test_diffstorage_short_io_raises(tmp_path):
    s = DiffStorage.open(str(tmp_path), 4 * MiB, 2 * MiB, lambda st: None)
    try:
        assert s.description == f"tmpfile in {tmp_path}"
        with pytest.raises(OSError) as info:
            s.read(2 * MiB - 10, 100)                          # beyond the end: short read
        assert info.value.errno == errno.EIO
        s.fault = Fault("read", code=errno.EIO)
        with pytest.raises(OSError):
            s.read(0, 10)
        s.fault = Fault("grow", code=errno.EIO)
        s.grow_now()                                            # logged, not raised
        assert s.capacity == 2 * MiB
    finally:
        s.close()
    assert os.listdir(tmp_path) == []


async def test_no_inline_storage_write_while_a_growth_fallocates(env):
    """fallocate holds the storage file's lock (ext4, xfs, tmpfs): while a growth runs,
    a copy into the storage must not be written inline (the trio thread would wait for
    the whole growth), and the growth, started from inside a device write, is no part
    of that request's priority accounting."""
    from snapfs import workers

    release, started = threading.Event(), threading.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(env.reg.serve)
        snap = await env.snapshot("8M", "d")
        storage = snap.storage
        real_grow = storage.grow_blocking

        def slow_grow(target):
            started.set()
            release.wait(5)
            real_grow(target)

        storage.grow_blocking = slow_grow
        await env.touch_chunks("d", range(12))                # fills half a portion: growth
        await until(started.is_set)
        try:
            assert storage.io.thread_calls > 0
            assert not storage.io._may_write_inline(storage.filled, CHUNK)
        finally:
            release.set()
        await until(lambda: storage.capacity == 2 * MiB)
        assert workers.priority.ready == 0
        await env.execute(f"snapshot_destroy {snap.id}")
        nursery.cancel_scope.cancel()
