"""The one exception type of snapfs.

Every expected failure in the domain core is a :class:`SnapfsError` carrying an errno
and a message for humans. The FUSE adapter (``fs._fuse_errors``) turns it into
``FUSEError`` in one place; the control file (``control.handle``) turns it into a JSON
reply and the write's errno. OSError from the kernel keeps its errno there too.

Anything else is a bug. Inside a request it is logged once, with its traceback, and
answered with EIO (a control command also gets a reply): the mount keeps serving, so
the workload's devices stay up. Outside requests (building the mount, the CLI) it
propagates: a mount that cannot start says so and exits.
"""

import errno as _errno
import os


class SnapfsError(Exception):
    """An expected failure: ``errno`` (positive int) plus a one-line message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code
        self.message = message

    @property
    def errno_name(self) -> str:
        """Symbolic errno name, e.g. ``"EBUSY"``."""
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.errno_name}: {self.message}"

    @classmethod
    def from_oserror(cls, exc: OSError, what: str) -> "SnapfsError":
        """Wrap an OSError with context (``what`` says which operation failed)."""
        code = exc.errno or _errno.EIO
        return cls(code, f"{what}: {os.strerror(code)}")
