"""What the sidecar tells operators: logs, rate-limited logging, the access log."""
