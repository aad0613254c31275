"""The `b24queue` command. `main`: the parser, logging and the exit code; one module per command
(`services`: ingress, worker, offline; `topology`, `status`, `dlq`, `spool`, `portals`, `send`),
each with what it prints; `consumers` (the `MODULE:CLASS` a command names) and `terminal` (what
it prints made safe, what it asks) serve several. Nothing but `python -m b24queue` and the
console script imports it."""
