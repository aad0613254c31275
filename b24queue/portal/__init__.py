"""Calling the portal back from handlers: `await self.portal(event).call("crm.deal.get", ...)`.

- `api`: what handlers see (the `Portal` protocol) and the errors; no HTTP client here.
- `limits`: Bitrix24's per-portal leaky bucket; `state`: the buckets and the refresh leases,
  shared by every worker process on one store (`sqlite_state`, `redis_state`).
- `credentials`: which credentials an event's portal calls with (OAuth from the store, or an
  inbound webhook from the settings), and where its REST endpoint is; `tenant`: choosing them
  for one event.
- `oauth`: refreshing a portal's tokens, one refresh per portal at a time across processes;
  `oauth_server`: the one request to the OAuth server and its answer.
- `client`: the REST client (call, batch, list) on aiohttp; `clients`: one per worker process.
"""
