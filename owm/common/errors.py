"""The exceptions owm raises for user and client mistakes, each a plain sentence and an errno.

Every error a user or an NBD client can cause is an OwmError: its message is one plain sentence
fit to print as is, and its ``errno`` is what the NBD server answers with.  Anything else that
escapes is a bug.
"""

from __future__ import annotations

import errno as _errno


class OwmError(Exception):
    """Base class: a plain one-sentence message and the errno an NBD client is told."""

    errno: int = _errno.EIO

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidRequest(OwmError):
    """A malformed request: zero length, bad alignment, an unknown flag, a bad argument."""

    errno = _errno.EINVAL


class OutOfRange(InvalidRequest):
    """A request that reaches past the end of the volume."""


class ReadOnly(OwmError):
    """A write to something that is read-only (a preserved image)."""

    errno = _errno.EPERM


class NoSpace(OwmError):
    """The pool's disk is full."""

    errno = _errno.ENOSPC


class NotFound(OwmError):
    """An unknown volume, image, session or backup."""

    errno = _errno.ENOENT


class AlreadyExists(OwmError):
    """A name that is already taken."""

    errno = _errno.EEXIST


class WrongState(OwmError):
    """An operation that the object's current state does not allow (e.g. release before drain)."""

    errno = _errno.EBUSY


class ImageBroken(OwmError):
    """A preserved image that lost data (e.g. a full disk under the break-image policy)."""

    errno = _errno.EIO


class ImageDamaged(ImageBroken):
    """An image or volume whose chunk table was found corrupt: its reads are refused (EIO)."""


class Timeout(OwmError):
    """A wait that ran out of time."""

    errno = _errno.ETIMEDOUT


class DaemonNotRunning(OwmError):
    """Nothing is serving the pool's control socket."""


class Unavailable(OwmError):
    """A service the pool depends on (its catalog in etcd, say) cannot be reached just now;
    the request changed nothing that owm knows of and may be tried again."""

    errno = _errno.EIO
