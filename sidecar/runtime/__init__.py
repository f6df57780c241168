"""The running process: routes and their data planes, lifecycle and signals, --check-config."""
