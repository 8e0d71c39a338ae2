"""File transfer inside a session (upload and download streamed through the bus)."""
