# Sourced by scripts/test: makes sure the brokers the tests need are running on loopback,
# installing them from the distribution's packages when missing.

log() { printf '==> %s %s\n' "$(date +%T)" "$*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "need root to apt-get install $*"; return 1
  fi
  local out
  out="$(mktemp)"
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$out" 2>&1 || { cat "$out" >&2; rm -f "$out"; return 1; }
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$out" 2>&1 || { cat "$out" >&2; rm -f "$out"; return 1; }
  rm -f "$out"
}

# Redis for the run: `REDIS_URL` if set, else a redis-server of the run's own on a free loopback
# port (installed from Debian's packages when missing), stopped when the script exits.
REDIS_PID=""
stop_redis() {
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true
}

ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    log "installing redis-server"
    apt_install redis-server redis-tools
  fi
  if [ -n "${REDIS_URL:-}" ]; then
    log "using Redis at $REDIS_URL"
    return 0
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log "starting redis-server on 127.0.0.1:$port"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --logfile "${TMPDIR:-/tmp}/cqrs-redis-$port.log" >&2 &
  REDIS_PID=$!
  for _ in $(seq 1 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$port" ping >/dev/null
  export REDIS_URL="redis://127.0.0.1:$port/15"
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
  stop_kafka
  stop_redis_cluster
  stop_redis
  stop_postgres
}

# PostgreSQL for the outbox tests: `DATABASE_URL` if set, else a cluster of the run's own
# (scripts/postgres: installed from Debian's packages when missing, a free loopback port),
# stopped and removed when the script exits.
PG_DIR=""
stop_postgres() {
  [ -n "$PG_DIR" ] || return 0
  scripts/postgres stop "$PG_DIR" || true
  rm -rf "$PG_DIR"
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    log "using PostgreSQL at ${DATABASE_URL##*@} (DATABASE_URL)"
    return 0
  fi
  PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/cqrs-postgres.XXXXXX")"
  DATABASE_URL="$(scripts/postgres start "$PG_DIR")" || { log "starting PostgreSQL failed"; return 1; }
  export DATABASE_URL
  log "PostgreSQL on ${DATABASE_URL##*@} (DATABASE_URL)"
}

# Apache Kafka brokers of the run (scripts/kafka), each from a directory of its own; stopped when
# the script exits.
KAFKA_DIRS=()
stop_kafka() {
  for dir in "${KAFKA_DIRS[@]}"; do scripts/kafka stop "$dir" || true; rm -rf "$dir"; done
}

# The official AsyncAPI parser (npm @asyncapi/parser), for scripts/asyncapi-validate.mjs: installed
# once into ASYNCAPI_PARSER_DIR (Node.js from Debian's packages if the machine has none).
ASYNCAPI_PARSER_VERSION=3.6.6
export ASYNCAPI_PARSER_DIR="${ASYNCAPI_PARSER_DIR:-$HOME/.cache/asyncapi-parser-$ASYNCAPI_PARSER_VERSION}"
install_asyncapi_parser() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "installing Node.js and npm (Debian packages)"
    apt_install nodejs npm
  fi
  if [ ! -f "$ASYNCAPI_PARSER_DIR/node_modules/@asyncapi/parser/package.json" ]; then
    log "installing @asyncapi/parser $ASYNCAPI_PARSER_VERSION into $ASYNCAPI_PARSER_DIR"
    mkdir -p "$ASYNCAPI_PARSER_DIR"
    npm install --prefix "$ASYNCAPI_PARSER_DIR" --no-audit --no-fund --silent \
      "@asyncapi/parser@$ASYNCAPI_PARSER_VERSION" >/dev/null
  fi
}

# Kafka brokers for the run: `KAFKA_BROKERS` if set, else a fresh Apache Kafka (installed from
# Maven Central on first use); a second, independent one for the two-cluster example
# (`KAFKA_BROKERS_B`).
ensure_kafka() {
  trap stop_brokers EXIT
  scripts/kafka install >/dev/null
  # The JVMs start at once: each takes seconds on 2 cores.
  local var dir pids=() vars=() dirs=() i
  # The third: TLS, SASL and ACLs (scripts/kafka start --secure) for the security tests, which
  # read its listeners and users from KAFKA_SECURE_DIR/secure.env.
  for var in KAFKA_BROKERS KAFKA_BROKERS_B KAFKA_SECURE_DIR; do
    if [ -n "${!var:-}" ]; then
      log "using Kafka at ${!var} ($var)"
      continue
    fi
    dir="$(mktemp -d "${TMPDIR:-/tmp}/cqrs-kafka.XXXXXX")"
    KAFKA_DIRS+=("$dir")
    if [ "$var" = KAFKA_SECURE_DIR ]; then
      scripts/kafka start "$dir" --secure >/dev/null && echo "$dir" >"$dir/address" &
    else
      scripts/kafka start "$dir" >"$dir/address" &
    fi
    pids+=($!); vars+=("$var"); dirs+=("$dir")
  done
  for i in "${!pids[@]}"; do
    var="${vars[$i]}"
    wait "${pids[$i]}" || { log "starting Kafka for $var failed"; return 1; }
    printf -v "$var" '%s' "$(cat "${dirs[$i]}/address")"
    export "${var?}"
    log "Apache Kafka on ${!var} ($var; its log: ${dirs[$i]}/server.log)"
  done
  export KAFKA_BROKERS_A="$KAFKA_BROKERS"
}
