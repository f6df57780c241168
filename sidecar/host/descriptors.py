"""The process's file descriptor budget: the limit raised at start, and a reserve for EMFILE.

Every caller of the spliced plane costs two descriptors (its own connection and
the one to the upstream), so the common soft limit of 1024 fits about 500
callers while the hard limit is usually far higher; the soft limit is raised to
the hard one at start. When descriptors run out all the same, accept() fails
with EMFILE while the connection stays in the listen queue: the caller would
wait for its deadline, and the listener's readiness would wake the loop again at
once (a spin). The classic answer is a descriptor held in reserve: on EMFILE it
is given up, the waiting connections are accepted and closed at once (their
callers fail fast and retry elsewhere), and it is taken back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket

logger = logging.getLogger("sidecar.server")

# accept() failures that mean "no descriptor (or kernel memory) for a new socket".
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# Connections shed in one go: a bounded amount of work per loop pass.
_SHED_PER_PASS = 1024


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log and return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as error:  # a sandbox may refuse even this
            logger.warning(
                "file descriptors: soft limit %d kept, raising it to %d failed: %s",
                soft,
                hard,
                error,
            )
            return soft
        logger.info("file descriptors: soft limit raised from %d to the hard limit %d", soft, hard)
        return hard
    logger.info("file descriptors: limit %d (the hard limit)", soft)
    return soft


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE in force (the descriptors this process may hold)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 2**31 - 1


class ReserveDescriptor:
    """One descriptor kept open so that a listener out of descriptors can still say no."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.restore()

    def restore(self) -> None:
        """Take the reserve back (it stays missing while descriptors are still short)."""
        if self._fd is None:
            with contextlib.suppress(OSError):
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def shed(self, listener: socket.socket) -> int:
        """With the reserve given up, accept the connections waiting on listener and close
        each at once; return how many were closed. The reserve is taken back after."""
        self.close()
        shed = 0
        try:
            while shed < _SHED_PER_PASS:
                try:
                    connection, _ = listener.accept()
                except OSError:  # none left waiting, or not even the reserve's slot is ours
                    break
                connection.close()
                shed += 1
        finally:
            self.restore()
        return shed
