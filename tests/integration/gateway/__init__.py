"""Gateway integration tests (real NATS, real sockets) and helpers the lead reuses."""
