# Sourced by scripts/test: makes sure the brokers the tests need are running on loopback,
# installing them from the distribution's packages when missing.

log() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "need root to apt-get install $*"; return 1
  fi
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# Redis on REDIS_PORT (default 6379): reuse a running server, else start one.
ensure_redis() {
  local port="${REDIS_PORT:-6379}"
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    log "installing redis-server"
    apt_install redis-server redis-tools
  fi
  if redis-cli -p "$port" ping >/dev/null 2>&1; then
    log "redis already running on 127.0.0.1:$port"
  else
    log "starting redis-server on 127.0.0.1:$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --logfile "${TMPDIR:-/tmp}/cqrs-redis-$port.log" >&2
    for _ in $(seq 1 50); do
      redis-cli -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli -p "$port" ping >/dev/null
  fi
  export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:$port/15}"
}

# Deletes what the conformance suite left in the test database (its keys start with `conf-`).
redis_cleanup() {
  local db="${REDIS_URL##*/}"
  redis-cli -u "$REDIS_URL" --scan --pattern 'conf-*' | xargs -r -n 500 redis-cli -u "$REDIS_URL" DEL >/dev/null
  log "removed the conformance suite's streams from database ${db:-0}"
}

# A local Redis Cluster of three masters (no replicas) on free loopback ports, stopped when the
# script exits; sets REDIS_CLUSTER_NODES to its seed list. Reused when REDIS_CLUSTER_NODES is set.
REDIS_CLUSTER_PIDS=()
stop_redis_cluster() {
  for pid in "${REDIS_CLUSTER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}

ensure_redis_cluster() {
  if [ -n "${REDIS_CLUSTER_NODES:-}" ]; then
    log "using the Redis Cluster at $REDIS_CLUSTER_NODES"
    return 0
  fi
  local dir ports=() addrs=() urls=() port
  dir="$(mktemp -d "${TMPDIR:-/tmp}/cqrs-redis-cluster.XXXXXX")"
  # Each node also listens on its port + 10000 (the cluster bus): pick ports where both are free.
  for port in $(python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
ports = []
while len(ports) < 3:
    p = random.randrange(20000, 50000)
    if p not in ports and free(p) and free(p + 10000):
        ports.append(p)
print(*ports)
PY
  ); do
    mkdir -p "$dir/$port"
    (cd "$dir/$port" && exec redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout 5000 --save "" --appendonly no \
      --logfile "$dir/$port/redis.log") &
    REDIS_CLUSTER_PIDS+=($!)
    ports+=("$port"); addrs+=("127.0.0.1:$port"); urls+=("redis://127.0.0.1:$port")
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 50); do
      redis-cli -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 || {
    cat "$dir/create.log" >&2; log "creating the Redis Cluster failed"; return 1
  }
  for _ in $(seq 1 100); do
    redis-cli -p "${ports[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
    sleep 0.1
  done
  redis-cli -p "${ports[0]}" cluster info | grep -q '^cluster_state:ok' || {
    log "the Redis Cluster did not reach cluster_state:ok"; return 1
  }
  REDIS_CLUSTER_NODES="$(IFS=,; echo "${urls[*]}")"
  export REDIS_CLUSTER_NODES
  log "Redis Cluster of 3 masters on ${addrs[*]}"
}

stop_brokers() {
  stop_tansu
  stop_redis_cluster
}

TANSU_VERSION=0.6.0
export TANSU_BIN="${TANSU_BIN:-$HOME/.cache/tansu-$TANSU_VERSION/bin/tansu}"
TANSU_PIDS=()

stop_tansu() {
  for pid in "${TANSU_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}

install_tansu() {
  if [ ! -x "$TANSU_BIN" ]; then
    log "installing tansu $TANSU_VERSION (a Kafka-compatible broker) into $(dirname "$(dirname "$TANSU_BIN")"), ~7 minutes"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore \
      --root "$(dirname "$(dirname "$TANSU_BIN")")" -j2 --debug --quiet
  fi
}

# The official AsyncAPI parser (npm @asyncapi/parser), for scripts/asyncapi-validate.mjs: installed
# once into ASYNCAPI_PARSER_DIR (Node.js from Debian's packages if the machine has none).
ASYNCAPI_PARSER_VERSION=3.6.6
export ASYNCAPI_PARSER_DIR="${ASYNCAPI_PARSER_DIR:-$HOME/.cache/asyncapi-parser-$ASYNCAPI_PARSER_VERSION}"
install_asyncapi_parser() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "installing Node.js and npm (Debian packages)"
    apt-get install -y -qq nodejs npm >/dev/null
  fi
  if [ ! -f "$ASYNCAPI_PARSER_DIR/node_modules/@asyncapi/parser/package.json" ]; then
    log "installing @asyncapi/parser $ASYNCAPI_PARSER_VERSION into $ASYNCAPI_PARSER_DIR"
    mkdir -p "$ASYNCAPI_PARSER_DIR"
    npm install --prefix "$ASYNCAPI_PARSER_DIR" --no-audit --no-fund --silent \
      "@asyncapi/parser@$ASYNCAPI_PARSER_VERSION" >/dev/null
  fi
}

# Starts a fresh tansu with in-memory storage on a free loopback port (stopped when the script
# exits) and sets TANSU_ADDR to its address.
start_tansu() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"${TMPDIR:-/tmp}/cqrs-tansu-$port.log" 2>&1 &
  TANSU_PIDS+=($!)
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      TANSU_ADDR="127.0.0.1:$port"
      return 0
    fi
    sleep 0.1
  done
  log "tansu did not start on port $port"
  return 1
}

# Kafka-protocol brokers for the run: `KAFKA_BROKERS` if set, else a fresh tansu (installed from
# crates.io on first use); a second one for the two-cluster example.
ensure_kafka() {
  trap stop_brokers EXIT
  if [ -n "${KAFKA_BROKERS:-}" ]; then
    log "using Kafka at $KAFKA_BROKERS"
  else
    install_tansu
    start_tansu
    export KAFKA_BROKERS="$TANSU_ADDR"
    log "tansu $TANSU_VERSION on $KAFKA_BROKERS"
  fi
  if [ -z "${KAFKA_BROKERS_B:-}" ]; then
    install_tansu
    start_tansu
    export KAFKA_BROKERS_B="$TANSU_ADDR"
  fi
  export KAFKA_BROKERS_A="$KAFKA_BROKERS"
}
