#!/usr/bin/env bash
# Local Apache Kafka for sagaline development and tests, run as plain JVM
# processes (no Docker): KRaft, every node broker+controller, 127.0.0.1 only.
#
#   kafka.sh start  [--brokers 1|3]   start (idempotent); stdout: the env line
#   kafka.sh stop   [--brokers 1|3]   stop, keeping data (idempotent)
#   kafka.sh status [--brokers 1|3]   exit 0 if every node runs and answers
#   kafka.sh env    [--brokers 1|3]   print SAGALINE_KAFKA_BOOTSTRAP=...
#   kafka.sh reset  [--brokers 1|3]   stop and delete all state of that cluster
#
# State: ${SAGALINE_STACK_DIR:-<repo>/.stack}/kafka-N (N = broker count), so the
# single node and the 3-broker cluster can run side by side. Jars come from
# Maven Central via infra/kafka/pom.xml and are cached in .../kafka-lib.
# Progress goes to stderr; stdout carries only the env line, for scripts.
set -euo pipefail

readonly KAFKA_VERSION=4.3.1 # must match <kafka.version> in pom.xml
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

START_TIMEOUT=${SAGALINE_KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=${SAGALINE_KAFKA_STOP_TIMEOUT:-30}
# Kept small: tests may run the 3-broker cluster next to the single node on 2 cores.
# 1 GiB: a local broker that has seen many test and benchmark runs holds thousands of
# partitions, and 512 MiB ran out of heap after a day of them.
KAFKA_HEAP_OPTS=${SAGALINE_KAFKA_HEAP_OPTS:--Xms128m -Xmx1g}

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { printf 'kafka: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 ]] || usage
CMD=$1
shift
BROKERS=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --brokers) [[ $# -ge 2 ]] || usage; BROKERS=$2; shift 2 ;;
    --brokers=*) BROKERS=${1#*=}; shift ;;
    -h|--help) usage ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ $BROKERS == 1 || $BROKERS == 3 ]] || die "--brokers must be 1 or 3 (got '$BROKERS')"

mkdir -p "${SAGALINE_STACK_DIR:-$REPO_ROOT/.stack}"
# Absolute, because the paths end up in configs and in process command lines.
STACK_DIR=$(cd "${SAGALINE_STACK_DIR:-$REPO_ROOT/.stack}" && pwd)
readonly STACK_DIR
readonly CLUSTER_DIR=$STACK_DIR/kafka-$BROKERS
readonly PORTS_FILE=$CLUSTER_DIR/ports.env
readonly ENV_FILE=$STACK_DIR/kafka-$BROKERS.env
readonly LIB_DIR=$STACK_DIR/kafka-lib

node_dir() { echo "$CLUSTER_DIR/node-$1"; }

# ---------------------------------------------------------------- helpers
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH ($2)"; }

java_bin() {
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    echo "$JAVA_HOME/bin/java"
  else
    need java "install a Java 17+ runtime"
    command -v java
  fi
}

# Serialise start/stop/reset of one cluster, e.g. two test sessions racing on `start`.
lock_cluster() {
  mkdir -p "$CLUSTER_DIR"
  exec 9>"$CLUSTER_DIR/.lock"
  flock -w 300 9 || die "timed out waiting for $CLUSTER_DIR/.lock"
}

# shellcheck source=../ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/../ports.sh"

# Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding; Kafka
# itself never hands out ids starting with '-' (they look like CLI flags).
new_uuid() {
  python3 -c '
import base64, os
while True:
    u = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not u.startswith("-"):
        print(u)
        break'
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# -------------------------------------------------------- jar resolution
# The lib dir is rebuilt only when pom.xml changes (stamp = the pom's checksum).
ensure_lib() {
  local sum
  sum=$(sha256sum "$SCRIPT_DIR/pom.xml" | cut -d' ' -f1)
  [[ -f $LIB_DIR/.stamp && $(<"$LIB_DIR/.stamp") == "$sum" ]] && return 0
  # The lib dir is shared by both clusters: take a separate lock for it.
  exec 8>"$STACK_DIR/kafka-lib.lock"
  flock -w 600 8 || die "timed out waiting for $STACK_DIR/kafka-lib.lock"
  if [[ -f $LIB_DIR/.stamp && $(<"$LIB_DIR/.stamp") == "$sum" ]]; then
    exec 8>&-
    return 0
  fi
  need mvn "install Maven 3.8+"
  log "resolving Kafka $KAFKA_VERSION jars from Maven Central (first run only)..."
  local tmp=$LIB_DIR.tmp mvnlog=$STACK_DIR/kafka-lib.mvn.log
  rm -rf "$tmp"
  if ! mvn -q -B -f "$SCRIPT_DIR/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
    tail -n 30 "$mvnlog" >&2
    die "Maven could not resolve the Kafka jars (full log: $mvnlog)"
  fi
  [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] \
    || die "Maven ran but kafka_2.13-$KAFKA_VERSION.jar is missing from $tmp; does pom.xml match KAFKA_VERSION?"
  echo "$sum" >"$tmp/.stamp"
  # Swap in whole, so a crash mid-copy never leaves a half-filled lib dir looking complete.
  rm -rf "$LIB_DIR"
  mv "$tmp" "$LIB_DIR"
  exec 8>&-
}

# Short-lived JVM running a Kafka CLI class; quiet logging, tuned for fast startup.
# TOOL_TIMEOUT bounds it: an admin client retries forever against a broker that hangs.
kafka_tool() {
  local java
  java=$(java_bin)
  timeout "${TOOL_TIMEOUT:-120}" "$java" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/log4j2-tools.xml" \
    -cp "$LIB_DIR/*" "$@"
}

# ------------------------------------------------------------ processes
# "Ours" = the pid file names a live JVM running kafka.Kafka on this node's config,
# so a recycled pid or some other Kafka never counts.
node_pid() {
  local pidfile pid
  pidfile=$(node_dir "$1")/kafka.pid
  [[ -s $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka $(node_dir "$1")/server.properties" || return 1
  echo "$pid"
}

node_running() { node_pid "$1" >/dev/null; }

bootstrap_servers() {
  local i out=""
  for ((i = 1; i <= BROKERS; i++)); do
    local v="NODE${i}_PORT"
    out+="${out:+,}127.0.0.1:${!v}"
  done
  echo "$out"
}

env_line() { echo "SAGALINE_KAFKA_BOOTSTRAP=$(bootstrap_servers)"; }

load_ports() {
  [[ -f $PORTS_FILE ]] || return 1
  # shellcheck disable=SC1090
  source "$PORTS_FILE"
}

# Ports are picked once and persisted so clients keep their bootstrap string across
# restarts; a port is re-picked only if its node is down and something else holds it.
ensure_ports() {
  local i changed=0
  load_ports || true
  for ((i = 1; i <= BROKERS; i++)); do
    local p="NODE${i}_PORT" c="NODE${i}_CONTROLLER_PORT"
    if [[ -z ${!p:-} || -z ${!c:-} ]]; then
      read -r "${p?}" "${c?}" <<<"$(free_ports 2)"
      changed=1
      continue
    fi
    node_running "$i" && continue
    if ! port_free "${!p}"; then
      log "node $i: port ${!p} is taken by another process; picking a new client port"
      read -r "${p?}" <<<"$(free_ports 1)"
      changed=1
    fi
    if ! port_free "${!c}"; then
      # A formatted multi-node quorum keeps each voter's controller endpoint in its
      # metadata log; moving one was seen to leave the cluster unable to create topics.
      if ((BROKERS > 1)) && [[ -f $(node_dir "$i")/data/meta.properties ]]; then
        die "node $i: controller port ${!c} is held by another process (see: ss -ltnp 'sport = :${!c}'); free it, or wipe this cluster with: $0 reset --brokers $BROKERS"
      fi
      log "node $i: controller port ${!c} is taken by another process; picking a new one"
      read -r "${c?}" <<<"$(free_ports 1)"
      changed=1
    fi
  done
  if ((changed)); then
    {
      echo "# Ports of the local Kafka cluster; written by kafka.sh, reused on restart."
      for ((i = 1; i <= BROKERS; i++)); do
        local p="NODE${i}_PORT" c="NODE${i}_CONTROLLER_PORT"
        echo "$p=${!p}"
        echo "$c=${!c}"
      done
    } >"$PORTS_FILE.tmp"
    mv "$PORTS_FILE.tmp" "$PORTS_FILE"
  fi
}

controller_bootstrap() {
  local i out=""
  for ((i = 1; i <= BROKERS; i++)); do
    local c="NODE${i}_CONTROLLER_PORT"
    out+="${out:+,}127.0.0.1:${!c}"
  done
  echo "$out"
}

# Regenerated on every start so a re-picked port takes effect; identity (node.id,
# cluster id, log dirs) lives in data/meta.properties and never changes.
write_config() {
  local i=$1 dir rf isr
  dir=$(node_dir "$i")
  local p="NODE${i}_PORT" c="NODE${i}_CONTROLLER_PORT"
  if ((BROKERS == 1)); then rf=1 isr=1; else rf=3 isr=2; fi
  mkdir -p "$dir/data" "$dir/logs"
  cat >"$dir/server.properties" <<EOF
# Generated by infra/kafka/kafka.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=$i
controller.quorum.bootstrap.servers=$(controller_bootstrap)
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:${!p},CONTROLLER://127.0.0.1:${!c}
advertised.listeners=PLAINTEXT://127.0.0.1:${!p},CONTROLLER://127.0.0.1:${!c}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data

# Topics are created explicitly by sagaline; a typo must not create a topic.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
log.cleaner.enable=true

# Internal topics: few partitions so a fresh node is ready fast.
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr

# Abort transactions of a killed producer soon after their timeout expires.
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000

# Tests use short session timeouts and want groups to form without delay.
group.min.session.timeout.ms=1000
group.initial.rebalance.delay.ms=0

# Modest thread counts: the machine has 2 cores and may run 4 brokers.
num.network.threads=2
num.io.threads=4
EOF
}

# Storage is formatted once; a node with data/meta.properties is left alone (data kept).
format_storage() {
  local i cid cid_file dir initial=""
  cid_file=$CLUSTER_DIR/cluster.id
  [[ -s $cid_file ]] || new_uuid >"$cid_file"
  cid=$(<"$cid_file")
  if ((BROKERS > 1)); then
    # Dynamic quorum (KIP-853): every node must be formatted with the same voter set,
    # each voter named by node id, controller endpoint and metadata directory id.
    for ((i = 1; i <= BROKERS; i++)); do
      local c="NODE${i}_CONTROLLER_PORT" dfile
      dfile=$(node_dir "$i")/directory.id
      [[ -s $dfile ]] || new_uuid >"$dfile"
      initial+="${initial:+,}$i@127.0.0.1:${!c}:$(<"$dfile")"
    done
  fi
  for ((i = 1; i <= BROKERS; i++)); do
    dir=$(node_dir "$i")
    [[ -f $dir/data/meta.properties ]] && continue
    log "formatting storage of node $i (cluster id $cid)"
    local args=(--standalone)
    ((BROKERS > 1)) && args=(--initial-controllers "$initial")
    if ! kafka_tool kafka.tools.StorageTool format -t "$cid" -c "$dir/server.properties" \
        "${args[@]}" >"$dir/logs/format.log" 2>&1; then
      cat "$dir/logs/format.log" >&2
      die "formatting $dir/data failed"
    fi
  done
}

start_node() {
  local i=$1 dir java
  dir=$(node_dir "$i")
  java=$(java_bin)
  rm -f "$dir/kafka.pid"
  echo "=== $(date -Is) starting Kafka $KAFKA_VERSION node $i" >>"$dir/logs/kafka.out"
  # setsid+nohup: the broker must outlive the calling shell and its Ctrl-C/SIGHUP.
  # The inner shell records its own pid, which exec hands on to the JVM. The lock fds
  # are closed for it, else the broker would hold the cluster lock for its lifetime.
  # shellcheck disable=SC2016
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$dir/kafka.pid" \
    "$java" $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/log4j2-server.xml" \
    -Dkafka.logs.dir="$dir/logs" \
    -cp "$LIB_DIR/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >>"$dir/logs/kafka.out" 2>&1 8>&- 9>&- &
  local t
  for ((t = 0; t < 50; t++)); do
    [[ -s $dir/kafka.pid ]] && return 0
    sleep 0.1
  done
  die "node $i did not start (see $dir/logs/kafka.out)"
}

# One real client round trip: ApiVersions against every broker. Prints how many
# brokers answered (the tool asks each broker listed in the cluster metadata).
brokers_answering() {
  local out
  out=$(TOOL_TIMEOUT=30 kafka_tool org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$(bootstrap_servers)" 2>/dev/null) || { echo 0; return; }
  # A dead broker still listed in the metadata shows as "-> ERROR: ..."; count replies only.
  grep -cE '^127\.0\.0\.1:[0-9]+ \(id: [0-9]+ .*\) -> \($' <<<"$out" || true
}

wait_ready() {
  local deadline=$((SECONDS + START_TIMEOUT)) i
  while :; do
    local all_open=1
    for ((i = 1; i <= BROKERS; i++)); do
      if ! node_running "$i"; then
        local d
        d=$(node_dir "$i")
        tail -n 20 "$d/logs/server.log" "$d/logs/kafka.out" >&2 2>/dev/null || true
        die "node $i exited during startup; see $d/logs/server.log and $d/logs/kafka.out"
      fi
      local p="NODE${i}_PORT"
      tcp_open "${!p}" || all_open=0
    done
    if ((all_open)) && [[ $(brokers_answering) -ge $BROKERS ]]; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      die "Kafka not ready after ${START_TIMEOUT}s; see $(node_dir 1)/logs/server.log (and the other nodes' logs)"
    fi
    sleep 1
  done
}

# ------------------------------------------------------------- commands
cmd_start() {
  lock_cluster
  ensure_lib
  local i all_up=1
  for ((i = 1; i <= BROKERS; i++)); do node_running "$i" || all_up=0; done
  if ((all_up)) && load_ports && [[ $(brokers_answering) -ge $BROKERS ]]; then
    log "Kafka $KAFKA_VERSION already running on $(bootstrap_servers)"
  else
    ensure_ports
    for ((i = 1; i <= BROKERS; i++)); do node_running "$i" || write_config "$i"; done
    format_storage
    local t0=$SECONDS
    for ((i = 1; i <= BROKERS; i++)); do node_running "$i" || start_node "$i"; done
    wait_ready
    log "Kafka $KAFKA_VERSION on $(bootstrap_servers) ($BROKERS broker(s), ready in $((SECONDS - t0))s, state $CLUSTER_DIR)"
  fi
  env_line >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
  env_line
}

cmd_stop() {
  # Never started: nothing to stop, and no reason to create the state dir.
  [[ -d $CLUSTER_DIR ]] || { log "Kafka ($BROKERS broker(s)) not running"; return 0; }
  lock_cluster
  local i pids=()
  # SIGTERM all nodes at once: combined nodes need a live controller quorum for their
  # controlled shutdown, which stopping them one by one would take away.
  for ((i = 1; i <= BROKERS; i++)); do
    local pid
    if pid=$(node_pid "$i"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$i:$pid")
    fi
  done
  if ((${#pids[@]} == 0)); then
    log "Kafka ($BROKERS broker(s)) not running"
  else
    local deadline=$((SECONDS + STOP_TIMEOUT)) entry
    for entry in "${pids[@]}"; do
      local n=${entry%%:*}
      while node_running "$n" && ((SECONDS < deadline)); do sleep 0.2; done
      if node_running "$n"; then
        log "node $n did not stop within ${STOP_TIMEOUT}s; killing it"
        kill -KILL "${entry#*:}" 2>/dev/null || true
        while node_running "$n"; do sleep 0.1; done
      fi
    done
    log "Kafka ($BROKERS broker(s)) stopped; data kept in $CLUSTER_DIR"
  fi
  for ((i = 1; i <= BROKERS; i++)); do rm -f "$(node_dir "$i")/kafka.pid"; done
}

cmd_status() {
  if ! load_ports; then
    log "Kafka ($BROKERS broker(s)): never started (no $PORTS_FILE)"
    return 3
  fi
  local i up=0
  for ((i = 1; i <= BROKERS; i++)); do
    local pid p="NODE${i}_PORT"
    if pid=$(node_pid "$i"); then
      up=$((up + 1))
      log "node $i: running (pid $pid) on 127.0.0.1:${!p}"
    else
      log "node $i: stopped (port 127.0.0.1:${!p})"
    fi
  done
  ((up == 0)) && return 3
  local answering
  answering=$(brokers_answering)
  log "$answering of $BROKERS broker(s) answer client requests"
  ((up == BROKERS && answering >= BROKERS)) || return 1
  env_line
}

cmd_env() {
  load_ports || die "Kafka ($BROKERS broker(s)) has never been started; run: $0 start --brokers $BROKERS"
  env_line
}

cmd_reset() {
  cmd_stop
  exec 9>&- || true
  rm -rf "$CLUSTER_DIR" "$ENV_FILE"
  log "deleted $CLUSTER_DIR"
}

case $CMD in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  reset) cmd_reset ;;
  -h|--help|help) usage ;;
  *) die "unknown command '$CMD' (start|stop|status|env|reset)" ;;
esac
