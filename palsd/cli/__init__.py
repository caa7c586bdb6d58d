"""Command-line entry points: `palsd` (the daemon and its tools) and `palsctl` (the client)."""
