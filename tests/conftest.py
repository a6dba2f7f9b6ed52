"""Fixtures for real-mount tests (helpers.py has the rest): a snapfs daemon in a
subprocess per mount, a random device file, a storage directory."""

import contextlib

import pytest
from helpers import SnapMount, is_mounted, make_device


@pytest.fixture
def mounter(tmp_path):
    """Factory: ``mounter({"d0": path}, options=[...])`` -> started SnapMount.
    Stops every mount cleanly at the end of a passing test; cleans up always."""
    mounts: list[SnapMount] = []

    def start(sources, options=None, state_dir=None, sub="m") -> SnapMount:
        base = tmp_path / f"{sub}{len(mounts)}"
        base.mkdir()
        m = SnapMount(base, sources, options, state_dir).start()
        mounts.append(m)
        return m

    try:
        yield start
        for m in mounts:
            if m.proc is not None and m.proc.poll() is None and is_mounted(m.path):
                m.stop()
    finally:
        for m in mounts:
            with contextlib.suppress(Exception):
                m.cleanup()


@pytest.fixture
def device(tmp_path):
    """One 8 MiB random device file; returns (path, content)."""
    path = tmp_path / "disk0.img"
    return str(path), make_device(path, 8 * 1024 * 1024 + 4096 + 512, seed=1)


@pytest.fixture
def storage_dir(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    return str(d)
