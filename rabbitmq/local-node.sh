#!/usr/bin/env bash
# A project-local RabbitMQ node from the system's rabbitmq-server, for machines without Docker.
#   local-node.sh start    start one unless something already listens on the AMQP port; either
#                          way, see that the management API answers and the consistent-hash
#                          exchange is there (enabling the plugins on the machine's RabbitMQ when
#                          rabbitmq-plugins can), or say what to run
#   local-node.sh stop     stop the project-local node (never a broker this script did not start)
#   local-node.sh status
# Its data and logs live in .broker/ (git-ignored). Ports: AMQP_PORT (5672), MGMT_PORT (15672),
# PROM_PORT (15692);
# the Erlang distribution port is AMQP_PORT + 20000. DEFINITIONS=file boots it with that topology;
# CONSUMER_TIMEOUT_MS overrides consumer_timeout (the fault tests shorten it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
AMQP_PORT="${AMQP_PORT:-5672}"
MGMT_PORT="${MGMT_PORT:-15672}"
PROM_PORT="${PROM_PORT:-15692}"
NODE="b24queue${AMQP_PORT}@localhost"
DIR="$ROOT/.broker/node-$AMQP_PORT"

# rabbitmq_consistent_hash_exchange: the shard queues of a fair queue (docs/fairness.md).
PLUGINS=(rabbitmq_management rabbitmq_prometheus rabbitmq_consistent_hash_exchange)

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The management API answers as guest (what the tests, `b24queue status` and policies use), and
# the node has the consistent-hash exchange type (what a fair queue's shards are fed by).
mgmt_answers() {
  "${PYTHON:-python3}" - "$MGMT_PORT" 2>/dev/null <<'PY'
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/overview",
                             headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})  # guest:guest
no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with no_proxy.open(req, timeout=2) as resp:
    import json
    types = {t.get("name") for t in json.load(resp).get("exchange_types", [])}
    sys.exit(resp.status != 200 or "x-consistent-hash" not in types)
PY
}

await_mgmt() {
  for _ in $(seq 1 120); do
    mgmt_answers && return 0
    sleep 0.5
  done
  return 1
}

cannot_enable() {
  echo "RabbitMQ on 127.0.0.1:$AMQP_PORT lacks the management API on :$MGMT_PORT or the consistent-hash exchange ($1); run where it runs: sudo rabbitmq-plugins enable ${PLUGINS[*]}" >&2
  exit 1
}

# Enable the plugins on the node behind AMQP_PORT if it lacks them, then wait until the API answers.
ensure_management() {
  mgmt_answers && return 0
  local enable=(rabbitmq-plugins enable "${PLUGINS[@]}")
  if [[ -f "$DIR/pid" ]] && as_broker_env rabbitmqctl -n "$NODE" -q ping >/dev/null 2>&1; then
    # Our own node (its enabled_plugins lists them, unless someone disabled them since).
    enable=(as_broker_env rabbitmq-plugins -n "$NODE" enable "${PLUGINS[@]}")
  elif ! command -v rabbitmq-plugins >/dev/null; then
    cannot_enable "no rabbitmq-plugins on this machine"
  fi
  echo "Enabling ${PLUGINS[*]} on the RabbitMQ at 127.0.0.1:$AMQP_PORT"
  local out
  out="$("${enable[@]}" 2>&1)" || cannot_enable "rabbitmq-plugins: $(grep -m1 . <<<"$out")"
  await_mgmt || cannot_enable "enabled, but /api/overview does not answer as guest with x-consistent-hash"
  echo "Management API answers on http://127.0.0.1:$MGMT_PORT"
}

as_broker_env() {
  # CHANNEL_TICK_MS: how often channels check consumer_timeout (RabbitMQ's default: 60 s).
  env ${CHANNEL_TICK_MS:+RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-rabbit channel_tick_interval $CHANNEL_TICK_MS"} \
    RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$AMQP_PORT" \
    RABBITMQ_DIST_PORT="$((AMQP_PORT + 20000))" \
    RABBITMQ_MNESIA_BASE="$DIR/mnesia" RABBITMQ_LOG_BASE="$DIR/log" \
    RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
    RABBITMQ_PID_FILE="$DIR/pid" "$@"
}

start() {
  if listening "$AMQP_PORT"; then
    echo "RabbitMQ already listening on 127.0.0.1:$AMQP_PORT; using it."
    ensure_management
    return 0
  fi
  if ! command -v rabbitmq-server >/dev/null; then
    echo "Nothing listens on 127.0.0.1:$AMQP_PORT and rabbitmq-server is not installed." >&2
    echo "Install it (apt-get install rabbitmq-server) or run: docker compose -f rabbitmq/docker-compose.yml up -d" >&2
    exit 1
  fi
  mkdir -p "$DIR/mnesia" "$DIR/log"
  sed -e "s/^listeners.tcp.default = .*/listeners.tcp.default = $AMQP_PORT/" \
      -e "s/^management.tcp.port = .*/management.tcp.port = $MGMT_PORT/" \
      -e "s/^prometheus.tcp.port = .*/prometheus.tcp.port = $PROM_PORT/" \
      -e "s/^consumer_timeout = .*/consumer_timeout = ${CONSUMER_TIMEOUT_MS:-1800000}/" \
      "$ROOT/rabbitmq/rabbitmq.conf" > "$DIR/rabbitmq.conf"
  if [[ -n "${DEFINITIONS:-}" ]]; then
    # Boot with this topology (e.g. rabbitmq/definitions.json); it must bring its own users.
    cp "$DEFINITIONS" "$DIR/definitions.json"
    echo "load_definitions = $DIR/definitions.json" >> "$DIR/rabbitmq.conf"
  fi
  cp "$ROOT/rabbitmq/enabled_plugins" "$DIR/enabled_plugins"
  # Debian's wrapper runs the server as the rabbitmq user when started by root.
  if [[ "$(id -u)" == 0 ]] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$ROOT/.broker"
  fi
  echo "Starting project-local RabbitMQ node $NODE (AMQP $AMQP_PORT, management $MGMT_PORT, data $DIR)"
  as_broker_env rabbitmq-server -detached
  # await_startup needs a node that is already registered with epmd: ping until it is.
  for _ in $(seq 1 120); do
    as_broker_env rabbitmqctl -n "$NODE" -q ping >/dev/null 2>&1 && break
    sleep 0.5
  done
  as_broker_env timeout 120 rabbitmqctl -n "$NODE" -q await_startup
  if [[ -n "${DEFINITIONS:-}" ]]; then
    # The definitions bring their own users (maybe no guest): wait for the port only.
    for _ in $(seq 1 100); do
      listening "$MGMT_PORT" && break
      sleep 0.3
    done
  else
    await_mgmt || ensure_management
  fi
  echo "RabbitMQ is up: amqp://guest:guest@127.0.0.1:$AMQP_PORT/  management http://127.0.0.1:$MGMT_PORT"
}

stop() {
  if [[ ! -f "$DIR/pid" ]]; then
    echo "No project-local node for port $AMQP_PORT."
    return 0
  fi
  as_broker_env rabbitmqctl -n "$NODE" -q stop "$DIR/pid" || true
  rm -f "$DIR/pid"
}

status() {
  if listening "$AMQP_PORT"; then echo "AMQP port $AMQP_PORT: listening"; else echo "AMQP port $AMQP_PORT: closed"; fi
  if listening "$MGMT_PORT"; then echo "management port $MGMT_PORT: listening"; else echo "management port $MGMT_PORT: closed"; fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
