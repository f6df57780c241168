"""The exception tree: expected failures the user can fix, kept apart from bugs; exit codes."""

from __future__ import annotations

EXIT_OK = 0  # served, then stopped cleanly
EXIT_RUNTIME = 1  # could not serve, or forced to stop
EXIT_USAGE = 2  # a flag, setting or file is wrong
EXIT_REJECTED = EXIT_RUNTIME  # `certs verify`: the certificate was read and is not good


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """A flag, setting or file the user gave is wrong.

    The message is one line that names the flag or file at fault; the command line
    prints it as `config error: <message>` and exits 2. `note`, when set, is one more line
    naming a likely cause elsewhere (a misspelled SIDECAR_ variable that was ignored).
    """

    note: str | None = None


class StartupError(SidecarError):
    """The configuration is valid but the sidecar cannot start (port in use, say): exit 1."""
