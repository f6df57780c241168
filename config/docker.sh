#!/bin/sh
# Writes the image's /etc/sidecar/sidecar.yaml from the Dockerfile's build arguments:
#   docker.sh ROLE PORT UPSTREAM
# ROLE=server: an ingress route on 0.0.0.0:PORT in front of UPSTREAM (the app, on loopback);
# ROLE=client: an egress route on 127.0.0.1:PORT (its remote comes from SIDECAR_UPSTREAM).
# The certificate is the one `sidecar certs provision` issued at build time, or one mounted
# at /etc/sidecar/tls at run time. SIDECAR_* variables override any of these keys.
set -eu
role=$1 port=$2 upstream=$3
case "$port" in
    ''|*[!0-9]*) echo "docker.sh: PORT must be a number, not '$port'" >&2; exit 2 ;;
esac
tls='cert: /etc/sidecar/tls/tls.pem
key: /etc/sidecar/tls/tls.key
ca: /etc/sidecar/tls/ca.pem'
case "$role" in
    server)
        printf '# ingress, written at image build time (ROLE=server)\nmode: ingress\nlisten: 0.0.0.0:%s\nupstream: %s\n%s\n' \
            "$port" "$upstream" "$tls" ;;
    client)
        printf '# egress, written at image build time (ROLE=client)\nmode: egress\nlisten: 127.0.0.1:%s\n%s\n' \
            "$port" "$tls" ;;
    *)
        echo "docker.sh: ROLE must be server or client, not '$role'" >&2; exit 2 ;;
esac
