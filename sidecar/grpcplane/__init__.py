"""The per-call data plane (--data-plane grpc): a grpc.aio generic relay."""
