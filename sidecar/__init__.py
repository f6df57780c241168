"""sidecar: mutual TLS, caller allowlists and gRPC-aware relaying in front of plain gRPC services."""

__version__ = "0.1.0"
