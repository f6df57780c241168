"""What the sidecar asks of the host: memory return, open-file limits."""
