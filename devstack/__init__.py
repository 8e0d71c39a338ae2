"""Development stack: run gurutunnel's processes on one machine (demo and end-to-end tests)."""
