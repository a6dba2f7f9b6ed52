"""How a backup reads beside the workload: at an I/O priority (``ionice``'s classes;
the snapfs daemon sees the priority of the process that opens an image and gives its
reads that priority, and an idle-class reader its turn only as if the devices were
always busy), and at most at a rate (``--rate-limit``)."""

from .. import ioprio
from ..ioprio import BURST, RateLimit  # noqa: F401  (the rate limit lives beside the priorities)

PRIORITIES = {"idle": ioprio.IDLE << ioprio.CLASS_SHIFT | 7,
              "best-effort": 2 << ioprio.CLASS_SHIFT | 7,     # the lowest best-effort level
              "normal": 0}                                     # as the nice value says


def set_io_priority(name: str) -> None:
    """Give the calling thread, and the threads it starts from now on (Linux copies a
    thread's I/O priority to its children), the priority ``name`` of PRIORITIES."""
    ioprio.set_current_thread(PRIORITIES[name])
