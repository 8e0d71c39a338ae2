"""Integration tests of the API against real NATS and databases."""
