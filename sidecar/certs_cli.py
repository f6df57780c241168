"""`sidecar certs`: make CAs and leaf certificates, inspect and verify them (placeholder)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    print("sidecar certs: not built yet", file=sys.stderr)
    return 2
