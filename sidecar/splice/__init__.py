"""The spliced data plane: listener, handshake, admission, the splice, the refusal."""
