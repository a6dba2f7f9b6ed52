"""What both of our pyfuse3 file systems (fs.py, backup/mountfs.py) share: errors into
errnos (a handler may raise only FUSEError, anything else ends the mount), and the
handlers they answer alike (``BaseOperations``).

SnapfsError becomes its errno (logged at debug: the caller gets it), OSError its errno
(a warning), anything else is a bug (errors.py): logged once with its traceback and
answered with EIO, and the mount keeps serving.
"""

import errno
import functools
import logging

import pyfuse3

from .errors import SnapfsError


def fuse_errors(log: logging.Logger, loud: tuple[type[SnapfsError], ...] = ()):
    """A decorator for the async handlers of an Operations class; errors of the
    ``loud`` kinds are logged as errors (damaged data the caller cannot see)."""

    def decorate(handler):
        @functools.wraps(handler)
        async def wrapper(*args, **kwargs):
            try:
                return await handler(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except SnapfsError as exc:
                if isinstance(exc, loud):
                    log.error("%s", exc.message)
                else:
                    log.debug("%s: %s", handler.__name__, exc)
                raise pyfuse3.FUSEError(exc.errno) from None
            except OSError as exc:
                log.warning("%s: %s", handler.__name__, exc)
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            except Exception:
                log.exception("internal error in %s", handler.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return wrapper

    return decorate


class BaseOperations(pyfuse3.Operations):
    """Directory handles need no release; statfs reports nothing but sizes of names."""

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s
