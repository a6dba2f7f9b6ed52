"""A snapshot's event log: append-only, JSON lines, with a pop cursor and waiters.

Events are dicts ``{"time": <unix ns>, "event": "no_space"|"corrupted", ...}``.
Two ways to consume them:

* ``snapshots/ID/events`` readers: each open handle reads the byte stream
  ``text`` from its own offset, so every reader sees every event.
* ``snapshot_waitevent``: ``pop_nowait`` returns the next event not yet popped
  (one shared cursor, like blksnap's queue).

Waking waiters is the adapter's job: ``listeners`` are plain callables invoked
synchronously after every change (post or close). They must not raise.
"""

import json
import time
from collections.abc import Callable


class EventLog:
    """Append-only event log of one snapshot (trio thread only)."""

    def __init__(self, listeners: list[Callable[[], None]] | None = None) -> None:
        self.events: list[dict] = []
        self.text = bytearray()
        self.closed = False
        self._popped = 0
        self.listeners: list[Callable[[], None]] = list(listeners or [])

    def post(self, event: str, **fields) -> dict:
        """Append an event and wake listeners. Ignored once closed."""
        record = {"time": time.time_ns(), "event": event, **fields}
        if self.closed:
            return record
        self.events.append(record)
        self.text += json.dumps(record).encode() + b"\n"
        self._notify()
        return record

    def pop_nowait(self) -> dict | None:
        """The next unconsumed event for ``snapshot_waitevent``, or None."""
        if self._popped < len(self.events):
            self._popped += 1
            return self.events[self._popped - 1]
        return None

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of the JSON-lines stream from ``offset`` (may be empty)."""
        return bytes(self.text[offset : offset + size])

    def close(self) -> None:
        """The snapshot is gone: readers at the end get EOF from now on."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()
