"""Test support: real services (NATS, PostgreSQL) and processes for the suite."""
