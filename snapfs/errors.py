"""The one exception type of snapfs.

Every expected failure in the domain core is a :class:`SnapfsError` carrying an errno
and a message for humans. The FUSE adapter (``fs.py``) turns it into ``FUSEError`` in
one place; the control file (``control.py``) turns it into a JSON reply. Anything that
is not a ``SnapfsError`` is a bug and is allowed to propagate.
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
