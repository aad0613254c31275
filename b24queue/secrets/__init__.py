"""Keeping secrets secret: what no output shows (`redaction`: tokens, client secrets, URL
passwords and webhook codes hidden in every log line, error and print) and the files that hold
secrets (`files`: portal tokens, spooled bodies; ours alone, never reached through a link).
Standard library only (every layer uses it)."""
