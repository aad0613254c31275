"""The embedded SQLite transport: one database file on one host, no server (see transport.py)."""
