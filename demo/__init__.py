"""The demo: the seeds' services (a plain, insecure app and its clients) and `make demo`."""
