"""Who may send events: static tokens, per-portal tokens learned at install, their store."""
