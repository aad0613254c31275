"""Keeping secrets secret: what no output shows (`redaction`: tokens, client secrets, URL
passwords and webhook codes hidden in every log line, error and print) and the files that hold
secrets (`files`: portal tokens, spooled bodies; ours alone, never reached through a link), and
the stores opened on them (`stores`: a SQLite file of ours, a Redis of ours). No client library
at import (every layer uses it)."""
