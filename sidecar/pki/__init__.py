"""Certificates and TLS at run time: loading and checking material, SSL contexts, diagnosis."""
