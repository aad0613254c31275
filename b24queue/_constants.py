"""Names shared by the ingress, the workers and the tools: one place, so they cannot drift."""

from __future__ import annotations

APP_ID = "b24queue"
# Exchange and queue names: what RabbitMQ and the management UI show well.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,200}$"
# Every connection (and SQLite worker) we open is named so: status finds ours by it.
CONNECTION_PREFIX = "b24queue "
# Headers a broker adds on its own (RabbitMQ's dead-letter history and delivery count).
BROKER_HEADER_PREFIXES = ("x-death", "x-first-death", "x-last-death")
DELIVERY_COUNT = "x-delivery-count"
CONTENT_TYPE = "application/json"

# Message headers we set. Kept short and prefixed so they sort together in the management UI.
H_DOMAIN = "x-b24-domain"
H_MEMBER_ID = "x-b24-member-id"
H_EVENT_HANDLER_ID = "x-b24-event-handler-id"
# SHA-256 (hex) of the application token the event came with: the body leaves the token out, and
# the worker's portal client needs to know the event spoke with its portal's own token.
H_TOKEN_DIGEST = "x-b24-token-sha256"  # noqa: S105 - a header's name
H_ATTEMPT = "x-b24queue-attempt"  # the attempt the next delivery will be (1 = first)
H_FIRST_FAILED_AT = "x-b24queue-first-failed-at"
H_LAST_FAILED_AT = "x-b24queue-last-failed-at"
H_ERROR_TYPE = "x-b24queue-error-type"
H_ERROR_MESSAGE = "x-b24queue-error-message"
H_ORIGINAL_ROUTING_KEY = "x-b24queue-original-routing-key"
H_ORIGINAL_QUEUE = "x-b24queue-original-queue"
H_DEAD_LETTER_REASON = "x-b24queue-dead-letter-reason"
# A robot's or activity's return values (JSON), kept while their bizproc.event.send is retried
# (b24queue.bizproc): a retry sends them again without running the handler.
H_BIZPROC_RESULT = "x-b24queue-bizproc-result"
# What the workflow of a dead-lettered robot or activity call was told (b24queue.bizproc).
H_WORKFLOW_TOLD = "x-b24queue-workflow-told"
# A message the app published (b24queue.publishing): the message id of the delivery whose handler
# published it, and the id shared by a whole chain (the first event's message id).
H_CAUSED_BY = "x-b24queue-caused-by"
H_CORRELATION_ID = "x-b24queue-correlation-id"

RETRY_SUFFIX = ".retry."
DLQ_SUFFIX = ".dlq"
# A fair queue on RabbitMQ: its consistent-hash exchange and its shard queues (`<queue>.s<i>`).
FAIR_SUFFIX = ".fair"
SHARD_SUFFIX = ".s"

MAX_ERROR_MESSAGE_CHARS = 1000
