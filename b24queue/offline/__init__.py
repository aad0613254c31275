"""Offline events: Bitrix24 keeps a queue per app on the portal while we are down or unreachable,
and `b24queue offline` pulls it into the same exchange as the ingress (docs/offline.md).

- `records`: what `event.offline.get` answers, validated and bounded, and the message made of
  each record (marked offline; its message_id stable across re-reads).
- `puller`: one portal's pull: reserve a batch (clear=0), publish every record confirmed, then
  clear; batches left reserved by a crash are found with event.offline.list and redone.
- `service`: the process: every enabled portal polled within its rate limit, woken at once by
  ONOFFLINEEVENT (through a small queue of its own on the transport), graceful stop.
- `bind`: `b24queue portals bind-offline`: event.bind with event_type=offline.
- `bindings`: the app's online bindings (event.bind to B24QUEUE_EVENTS_HANDLER_URL) kept on every
  installed portal by this process, and `b24queue portals bindings`.
"""
