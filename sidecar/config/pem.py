"""Where PEM material comes from: a file, or the PEM text itself given inline.

A setting such as `cert` takes either; a value starting with `-----BEGIN` is PEM
contents, so `SIDECAR_CERT="$(cat app.pem)"` works as well as a path. The source
remembers which setting it came from, so every error can name it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.errors import ConfigError

_PEM_START = "-----BEGIN"


# Larger than any certificate bundle or key (a CA bundle of 200 certificates is ~300 KiB),
# and than any config file: past it, a file is refused unread (`--cert /dev/zero`).
MAX_FILE_BYTES = 1024 * 1024


def read_bytes(path: Path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, or a ConfigError naming `what`
    and the file: `what: no such file: PATH` and the like. A FIFO, a device or a directory
    is refused without being opened (opening one could block, or do something; reading one
    could never end)."""
    try:
        _check_regular(os.stat(path).st_mode, path, what)
        # Not blocking, no controlling terminal: should the path have been swapped for a
        # FIFO or a device since the stat, the check after the open refuses it at once.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file: {path}") from None
    except PermissionError:
        raise ConfigError(f"{what}: cannot read {path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    try:
        _check_regular(os.fstat(descriptor).st_mode, path, what)
        file = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with file:
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{what}: {path} is larger than {_size(limit)}")
    return data


def _check_regular(mode: int, path: Path, what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = "a directory, not a file" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(f"{what}: {path} is {kind}")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if not limit % (1 << 20) else f"{limit >> 10} KiB"


@dataclass(frozen=True)
class PemSource:
    """A file path or inline PEM bytes, and the setting (`--cert`, `SIDECAR_KEY`) that gave it."""

    setting: str
    path: Path | None = None
    inline: bytes | None = field(default=None, repr=False)  # may be a private key

    @classmethod
    def parse(cls, text: str, setting: str, base: Path | None = None) -> PemSource:
        """Inline PEM if text starts with -----BEGIN, else a path (relative to base, if given)."""
        if text.lstrip().startswith(_PEM_START):
            return cls(setting, inline=text.strip().encode() + b"\n")
        if not text.strip():
            raise ConfigError(f"{setting}: must name a file or hold PEM text")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user that does not exist
            raise ConfigError(f"{setting}: cannot expand the ~ in {text!r}") from None
        if "\0" in text:
            raise ConfigError(f"{setting}: a path cannot hold a NUL character")
        if base is not None and not path.is_absolute():
            path = base / path
        return cls(setting, path=path)

    @property
    def origin(self) -> str:
        """How errors refer to the contents: the path, or `inline PEM`."""
        return str(self.path) if self.path is not None else "inline PEM"

    def read(self, limit: int = MAX_FILE_BYTES) -> bytes:
        """The bytes (PEM, or DER for a CRL); a file that cannot be read, or larger than
        limit, is a ConfigError naming the setting."""
        if self.inline is not None:
            return self.inline
        assert self.path is not None
        return read_bytes(self.path, self.setting, limit)
