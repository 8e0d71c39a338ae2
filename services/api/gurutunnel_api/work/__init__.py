"""Work inside a session: one-shot commands (REST, NDJSON), the live WebSocket, limits."""
