"""How long a route takes to load a CRL (read, verified against the CA, indexed): the time the
event loop relays nothing when a CRL changes, for CRLs of growing size.

    .venv/bin/python -m bench.crl_load [--entries 10000 100000]

The CRL is made in memory by `sidecar certs`' own builder and loaded by the function a route
uses (pki/revocation.load_revocations); no process or socket is involved.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

from cryptography.hazmat.primitives import serialization

from sidecar.certs import build
from sidecar.config.pem import PemSource
from sidecar.pki.revocation import load_revocations


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.crl_load")
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    ca = build.init_ca("Bench CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    source = PemSource("crl", inline=b"(in memory)")
    for count in args.entries:
        revoked = {index * 7919 + 1: now for index in range(count)}
        der = build.make_crl(ca, revoked, number=1).public_bytes(serialization.Encoding.DER)
        timings = []
        for _ in range(args.trials):
            started = time.perf_counter()
            loaded = load_revocations((source,), (der,), ca.cert_pem, "ca", "warn")
            timings.append(time.perf_counter() - started)
        assert sum(len(crl.serials) for crl in loaded.lists) == count
        print(
            f"{count} entries ({len(der) / 1e6:.1f} MB DER): loaded in "
            f"{statistics.median(timings) * 1000:.0f} ms (median of {args.trials})"
        )


if __name__ == "__main__":
    main()
