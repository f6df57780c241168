"""sidecar: mutual TLS, caller allowlists and gRPC-aware relaying for plain gRPC services."""

__version__ = "0.1.0"
