"""The ingress: Bitrix24 posts events here, and each is answered 200 once it is stored.

- `app`: the aiohttp app (`POST /b24/events`, health, readiness, metrics) and its server.
- `process`: the ingress process, `b24queue ingress`: what it opens in which order, how it stops.
- `spool`, `fallback`: the local spool, and the sink that falls back to it while the queue is
  unavailable; `spool_ops`: `b24queue spool`, operating the spools on this host.
- `prefork`: several ingress processes on one port.
"""
