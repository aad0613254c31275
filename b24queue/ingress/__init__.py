"""The ingress beyond its HTTP app: the local spool and its fallback sink, operating the spool,
and several ingress processes on one port."""
