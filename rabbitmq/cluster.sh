#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this host, from the system's rabbitmq-server (no Docker):
#   cluster.sh start     start whichever node is down (the first start joins them into one
#                        cluster; a node started again rejoins by itself), wait until all three
#                        run, and print the B24QUEUE_BROKER_URL line to paste into the environment
#   cluster.sh stop      stop all three (never a broker this script did not start)
#   cluster.sh status    each node: running or not, and the cluster as the first running sees it
#   cluster.sh pid N     the OS pid of node N (1-3), for fault tests that SIGKILL it
#   cluster.sh stop-node N / start-node N
# Nodes b24c1..3@localhost; AMQP ports BASE_PORT+1..3 (default 5681-5683), management
# BASE_PORT+10001.. (15681-15683), Prometheus BASE_PORT+10101.. (15781-15783), Erlang
# distribution AMQP+20000; data and logs in .broker/cluster/ (git-ignored). The machine's own
# RabbitMQ on 5672 is left alone. Each node is capped at 512 MB of memory (2-core, 24 GiB hosts).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE_PORT="${BASE_PORT:-5680}"
BASE="$ROOT/.broker/cluster"
PLUGINS="[rabbitmq_management,rabbitmq_prometheus,rabbitmq_consistent_hash_exchange]."

amqp_port() { echo $((BASE_PORT + $1)); }
mgmt_port() { echo $((BASE_PORT + 10000 + $1)); }
prom_port() { echo $((BASE_PORT + 10100 + $1)); }
node() { echo "b24c$1@localhost"; }
dir() { echo "$BASE/node$1"; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_node() {
  local n=$1
  shift
  local d
  d="$(dir "$n")"
  env RABBITMQ_NODENAME="$(node "$n")" RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT="$(($(amqp_port "$n") + 20000))" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_PID_FILE="$d/pid" "$@"
}

ctl() { local n=$1; shift; as_node "$n" rabbitmqctl -n "$(node "$n")" "$@"; }

running() { ctl "$1" -q ping >/dev/null 2>&1; }

configure() {
  local n=$1 d
  d="$(dir "$n")"
  mkdir -p "$d/mnesia" "$d/log"
  sed -e "s/^listeners.tcp.default = .*/listeners.tcp.default = $(amqp_port "$n")/" \
      -e "s/^management.tcp.port = .*/management.tcp.port = $(mgmt_port "$n")/" \
      -e "s/^prometheus.tcp.port = .*/prometheus.tcp.port = $(prom_port "$n")/" \
      -e "s/^vm_memory_high_watermark.relative = .*/vm_memory_high_watermark.absolute = 512MB/" \
      "$ROOT/rabbitmq/rabbitmq.conf" > "$d/rabbitmq.conf"
  cat >> "$d/rabbitmq.conf" <<EOF
# A lost node is noticed within seconds (the default waits about a minute).
net_ticktime = 10
EOF
  echo "$PLUGINS" > "$d/enabled_plugins"
  if [[ "$(id -u)" == 0 ]] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$ROOT/.broker"
  fi
}

# Launch a node that is down (not waiting for it to finish booting: a node that was not the last
# to stop waits for its peers, so all of them are launched before any is waited for).
launch() {
  local n=$1
  running "$n" && return 0
  if listening "$(amqp_port "$n")"; then
    echo "port $(amqp_port "$n") is taken by something else; set BASE_PORT" >&2
    exit 1
  fi
  configure "$n"
  echo "starting $(node "$n") (AMQP $(amqp_port "$n"), management $(mgmt_port "$n"))"
  as_node "$n" rabbitmq-server -detached
  for _ in $(seq 1 120); do
    running "$n" && return 0
    sleep 0.5
  done
  echo "$(node "$n") did not come up; see $(dir "$n")/log" >&2
  exit 1
}

member() {  # is node $1 a member of the cluster node 1 sees?
  ctl 1 -q cluster_status --formatter json 2>/dev/null | grep -q "\"$(node "$1")\""
}

join() {
  local n=$1
  member "$n" && return 0
  echo "joining $(node "$n") to $(node 1)"
  ctl "$n" -q stop_app
  # Whatever happens to the join, the node's app runs again (a stopped app answers ping, and
  # the next start would take it for a running node).
  ctl "$n" -q join_cluster "$(node 1)" || { ctl "$n" -q start_app; return 1; }
  ctl "$n" -q start_app
}

wait_all() {
  for n in 1 2 3; do
    ctl "$n" -q await_startup --timeout 120 >/dev/null
    for _ in $(seq 1 120); do
      listening "$(amqp_port "$n")" && listening "$(mgmt_port "$n")" && continue 2
      sleep 0.5
    done
    echo "$(node "$n") runs but does not listen on $(amqp_port "$n") / $(mgmt_port "$n")" >&2
    exit 1
  done
}

start() {
  command -v rabbitmq-server >/dev/null || { echo "rabbitmq-server is not installed" >&2; exit 1; }
  for n in 1 2 3; do
    launch "$n"
    ctl "$n" -q start_app >/dev/null 2>&1 || true  # a node left with its app stopped
  done
  ctl 1 -q await_startup --timeout 300 >/dev/null
  for n in 2 3; do
    ctl "$n" -q await_startup --timeout 300 >/dev/null
    join "$n"
  done
  wait_all
  local urls=() mgmt=()
  for n in 1 2 3; do
    urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/")
    mgmt+=("http://127.0.0.1:$(mgmt_port "$n")")
  done
  (IFS=,; echo "B24QUEUE_BROKER_URL=${urls[*]}")
  (IFS=,; echo "B24QUEUE_MANAGEMENT_URL=${mgmt[*]}")
}

stop_node() {
  local n=$1
  running "$n" || { rm -f "$(dir "$n")/pid"; return 0; }
  if [[ -f "$(dir "$n")/pid" ]]; then
    ctl "$n" -q stop "$(dir "$n")/pid" >/dev/null 2>&1 || ctl "$n" -q stop >/dev/null 2>&1 || true
  else
    ctl "$n" -q stop >/dev/null 2>&1 || true  # started from another checkout
  fi
  running "$n" && { echo "$(node "$n") did not stop" >&2; return 1; }
  rm -f "$(dir "$n")/pid"
}

stop() {
  for n in 3 2 1; do
    stop_node "$n"
  done
}

status() {
  for n in 1 2 3; do
    if running "$n"; then echo "$(node "$n"): running"; else echo "$(node "$n"): down"; fi
  done
  for n in 1 2 3; do
    if running "$n"; then ctl "$n" -q cluster_status; return 0; fi
  done
}

pid() { ctl "$1" -q eval 'list_to_integer(os:getpid()).'; }

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  pid) pid "$2" ;;
  stop-node) stop_node "$2" ;;
  start-node) launch "$2"; ctl "$2" -q await_startup --timeout 300 ;;
  *) echo "usage: $0 start|stop|status|pid N|stop-node N|start-node N" >&2; exit 2 ;;
esac
