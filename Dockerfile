# syntax=docker/dockerfile:1.7
# One image for either end of a link, chosen by build arguments, as the template seed did:
#
#   ingress (next to a server):  --build-arg ROLE=server --build-arg COMMON_NAME=app
#   egress  (next to a client):  --build-arg ROLE=client --build-arg COMMON_NAME=web
#
# With AUTH=true the image's own certificate is issued at build time by
# `sidecar certs provision`, which signs iff AUTH and (CLIENT_AUTH or ROLE=server).
# The CA key is mounted only for that one RUN, as a BuildKit secret, so it is in
# no layer of any stage:
#
#   DOCKER_BUILDKIT=1 docker build --build-arg ROLE=server --build-arg COMMON_NAME=app \
#       --secret id=ca_cert,src=ca/ca.pem --secret id=ca_key,src=ca/ca.key -t sidecar:app .
#
# With AUTH=false nothing is issued: mount certificates at run time instead and
# point SIDECAR_CERT, SIDECAR_KEY and SIDECAR_CA at them (or pass them as PEM text).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- the program and its dependencies, in a virtual environment ------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sidecar
WORKDIR /src
# Dependencies first, from pyproject.toml's pinned list: this layer is rebuilt only
# when the pins change, not on every code change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/sidecar/bin/pip install -r requirements.txt
COPY README.md ./
COPY sidecar ./sidecar
RUN /opt/sidecar/bin/pip install --no-deps .

# ---- build-time issuance: the CA key exists only during this RUN -------------------------------
FROM build AS certs
ARG AUTH=true
ARG CLIENT_AUTH=true
ARG ROLE=server
ARG COMMON_NAME=app
# Extra DNS names for the certificate, space-separated (the CN is always one).
ARG DNS_NAMES=""
RUN --mount=type=secret,id=ca_cert,required=false \
    --mount=type=secret,id=ca_key,required=false \
    mkdir -p /out \
    && set -- \
    && for name in $DNS_NAMES; do set -- "$@" --dns "$name"; done \
    && AUTH="$AUTH" CLIENT_AUTH="$CLIENT_AUTH" ROLE="$ROLE" COMMON_NAME="$COMMON_NAME" \
       /opt/sidecar/bin/sidecar certs provision \
         --ca-cert /run/secrets/ca_cert --ca-key /run/secrets/ca_key --name tls --out /out "$@" \
    && if [ -f /run/secrets/ca_cert ]; then cp /run/secrets/ca_cert /out/ca.pem; fi

# ---- the demo app and client (compose.yaml), the seeds' services -------------------------------
FROM build AS demo
COPY demo ./demo
RUN useradd --system --uid 10002 --home-dir /nonexistent --shell /usr/sbin/nologin demo \
    && mkdir /data && chown 10002:10002 /data
ENV PATH=/opt/sidecar/bin:$PATH
USER 10002:10002

# ---- the image that runs -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG ROLE=server
# ingress: the port callers reach with mTLS; egress: the local plaintext port.
ARG PORT=8443
# ingress: the app next to the sidecar (same network namespace, so loopback).
ARG UPSTREAM=localhost:50051
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/sidecar /opt/sidecar
COPY --from=certs --chown=10001:10001 /out/ /etc/sidecar/tls/
COPY config/docker.sh /usr/local/lib/sidecar/docker.sh
# The role becomes a config file (ROLE=server: ingress on 0.0.0.0:PORT in front of
# UPSTREAM; ROLE=client: egress on 127.0.0.1:PORT). Settings from SIDECAR_* variables
# at run time win over it (SIDECAR_UPSTREAM for an egress's remote, SIDECAR_ALLOW_CN).
RUN sh /usr/local/lib/sidecar/docker.sh "$ROLE" "$PORT" "$UPSTREAM" > /etc/sidecar/sidecar.yaml
# The admin listener on loopback: /healthz, /readyz, /metrics and /status, for the
# health check below and for whoever shares the network namespace (a metrics agent).
ENV PATH=/opt/sidecar/bin:$PATH \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml \
    SIDECAR_ADMIN=127.0.0.1:9901
USER 10001:10001
EXPOSE ${PORT}
# Healthy when ready: listening, its certificate valid, and (ingress) its app answering.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["sidecar", "probe", "/readyz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
