"""Detaching a FUSE server from the terminal once its mount is ready: ``snapfs mount
--daemon`` and ``snapfs backup mount --daemon`` both use ``detach``."""

import logging
import os
import sys
from collections.abc import Callable

from .errors import SnapfsError


def detach(serve: Callable[[Callable[[], None]], int], setup_logging: Callable[[], None],
           name: str) -> int:
    """Fork. The parent waits on a pipe and returns only once the child reported:
    0 when it is ready, 1 (with the child's error on stderr) when it failed first.
    The child starts a session, sets up logging (before stdio goes to /dev/null), runs
    ``serve(ready)``, which calls ``ready()`` once the mount answers, and exits with
    its status; an error before ``ready`` is sent to the parent, anything else logged."""
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
        if message.startswith("ready"):
            return 0
        print(f"{name}: {message.strip() or 'the daemon died before the mount was ready'}",
              file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    setup_logging()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def ready() -> None:
        os.write(write_end, b"ready\n")
        os.close(write_end)

    try:
        status = serve(ready)
    except SnapfsError as exc:
        os.write(write_end, str(exc).encode())
        os._exit(1)
    except BaseException:
        logging.getLogger("snapfs").exception("daemon failed")
        os._exit(1)
    os._exit(status)
