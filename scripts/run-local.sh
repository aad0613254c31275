#!/usr/bin/env bash
# `make run`: the ingress and the example workers in one terminal; Ctrl-C stops them cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT="${B24QUEUE_HTTP_PORT:-8080}"

# The queue: RabbitMQ when one runs here or can be started (rabbitmq/local-node.sh), else the
# embedded SQLite queue, which needs no server at all.
if [[ "${B24QUEUE_BROKER_URL:-}" != sqlite:* ]]; then
  if ! PYTHON="$BIN/python" bash rabbitmq/local-node.sh start; then
    export B24QUEUE_BROKER_URL="sqlite:.b24queue/queue.sqlite3"
    echo "RabbitMQ is not usable here: running on the embedded SQLite queue ($B24QUEUE_BROKER_URL)."
  fi
fi
QUEUE_UI="Management UI:  http://127.0.0.1:15672   (guest / guest)"
if [[ "${B24QUEUE_BROKER_URL:-}" == sqlite:* ]]; then
  QUEUE_UI="Queue:          ${B24QUEUE_BROKER_URL#sqlite:} (SQLite; b24queue status shows it)"
fi

if [[ -z "${B24QUEUE_APP_TOKENS:-}" && -z "${B24QUEUE_ALLOW_UNVERIFIED:-}" ]]; then
  export B24QUEUE_APP_TOKENS="local-dev-token"
  echo "No B24QUEUE_APP_TOKENS set: using 'local-dev-token' for this local run."
fi

# Children in their own process groups: Ctrl-C reaches only this script, which then asks each
# child once (SIGTERM) to stop gracefully. A second Ctrl-C would make them exit at once.
set -m
pids=()
stop() {
  trap - INT TERM
  echo; echo "stopping..."
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  exit 0
}
trap stop INT TERM

METRICS_PORT="${B24QUEUE_WORKER_METRICS_PORT:-9464}"
"$BIN/b24queue" worker examples.deals:DealSync examples.logger:EventLogger --metrics-port "$METRICS_PORT" &
pids+=($!)
"$BIN/b24queue" ingress --port "$PORT" &
pids+=($!)

for _ in $(seq 1 50); do
  if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.2
done

token="${B24QUEUE_APP_TOKENS%%,*}"
cat <<MSG

  Ingress:        http://127.0.0.1:$PORT/b24/events   (ready: http://127.0.0.1:$PORT/readyz)
  $QUEUE_UI
  Metrics:        http://127.0.0.1:$PORT/metrics (ingress)   http://127.0.0.1:$METRICS_PORT/metrics (workers)
  Status:         $BIN/b24queue status      Dead letters: $BIN/b24queue dlq list example.deal-sync
  Send an event:  B24QUEUE_SEND_TOKEN='$token' $BIN/b24queue send ONCRMDEALADD --url http://127.0.0.1:$PORT/b24/events --field 'data[FIELDS][ID]=42'
  A rejected one: ... --field 'data[FIELDS][ID]=0'   (lands in example.deal-sync.dlq)
  Ctrl-C stops everything.

MSG
wait -n "${pids[@]}" || true
stop
