"""gurutunnel gateway: holds agent WebSockets and bridges them onto NATS (see server.py)."""
