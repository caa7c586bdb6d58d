"""The local API: HTTP on a Unix socket (and optionally loopback TCP with a bearer token)."""
