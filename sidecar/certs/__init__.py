"""The `sidecar certs` toolkit: mint, inspect, verify and provision certificates.

Imported only by the command line (lazily): the running sidecar never needs it.
"""

from sidecar.certs.build import Issued, init_ca, issue, make_crl, new_key, write_private

__all__ = ["Issued", "init_ca", "issue", "make_crl", "new_key", "write_private"]
