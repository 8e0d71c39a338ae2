"""Gateway unit tests (no network)."""
