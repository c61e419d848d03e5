#!/usr/bin/env bash
# Local PostgreSQL for sagaline development and tests, as a plain process.
#
#   postgres.sh start    start (idempotent); stdout: the env line
#   postgres.sh stop     stop, keeping data (idempotent)
#   postgres.sh status   exit 0 if running and accepting connections
#   postgres.sh env      print SAGALINE_POSTGRES_DSN=...
#   postgres.sh reset    stop and delete the data
#
# If SAGALINE_POSTGRES_DSN is set and answers `select 1`, that server is used
# as is and nothing is started. Otherwise a project-local server runs from
# ${SAGALINE_STACK_DIR:-<repo>/.stack}/postgres, on 127.0.0.1 and a port picked
# once, with trust auth, role and database "sagaline". PostgreSQL refuses to
# run as root, so as root it runs as the `postgres` system user; if that user
# cannot reach the state dir (a parent dir without o+x, e.g. /root), data goes
# to /var/lib/sagaline/postgres-<hash> instead (recorded in <state>/pg_home).
# Binaries: the highest /usr/lib/postgresql/*/bin (or $SAGALINE_PG_BINDIR);
# if there is none, `apt-get install postgresql` (as root).
# Progress goes to stderr; stdout carries only the env line, for scripts.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
START_TIMEOUT=${SAGALINE_POSTGRES_START_TIMEOUT:-60}
readonly PG_USER=postgres   # OS user the server runs as (when we are root)
readonly DB_NAME=sagaline   # role and database created for the project

log() { printf 'postgres: %s\n' "$*" >&2; }
die() { printf 'postgres: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -eq 1 ]] || usage
CMD=$1

mkdir -p "${SAGALINE_STACK_DIR:-$REPO_ROOT/.stack}"
STACK_DIR=$(cd "${SAGALINE_STACK_DIR:-$REPO_ROOT/.stack}" && pwd)
readonly STACK_DIR
readonly STATE=$STACK_DIR/postgres
readonly ENV_FILE=$STACK_DIR/postgres.env
readonly PORT_FILE=$STATE/port

# ---------------------------------------------------------------- helpers
is_root() { [[ $EUID -eq 0 ]]; }

# The server and its tools must not run as root; as a normal user they run as that user.
# cd /: the caller's cwd may be unreadable for the postgres user (e.g. /root).
as_pg() {
  if is_root; then
    (cd / && runuser -u "$PG_USER" -- "$@")
  else
    "$@"
  fi
}

# shellcheck source=../ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/../ports.sh"

# psql of any installed version, only to probe an externally provided DSN.
any_psql() {
  if [[ -n ${BINDIR:-} && -x $BINDIR/psql ]]; then echo "$BINDIR/psql"; return 0; fi
  command -v psql 2>/dev/null && return 0
  local d
  d=$(find_bindir) && [[ -x $d/psql ]] && echo "$d/psql"
}

# Succeeds if the user-provided SAGALINE_POSTGRES_DSN should be used instead of ours.
external_dsn_ok() {
  [[ -n ${SAGALINE_POSTGRES_DSN:-} ]] || return 1
  # Our own DSN from a sourced stack.env is not "external": manage our server as usual.
  if [[ -f $PORT_FILE && $SAGALINE_POSTGRES_DSN == "$(local_dsn)" ]]; then return 1; fi
  local psql
  if ! psql=$(any_psql); then
    log "no psql available to check SAGALINE_POSTGRES_DSN; using it unchecked"
    return 0
  fi
  if PGCONNECT_TIMEOUT=5 "$psql" "$SAGALINE_POSTGRES_DSN" -XqAtc 'select 1' >/dev/null 2>&1; then
    return 0
  fi
  log "SAGALINE_POSTGRES_DSN is set but not reachable; using a project-local server instead"
  return 1
}

find_bindir() {
  if [[ -n ${SAGALINE_PG_BINDIR:-} ]]; then
    [[ -x $SAGALINE_PG_BINDIR/pg_ctl ]] || die "SAGALINE_PG_BINDIR=$SAGALINE_PG_BINDIR has no pg_ctl"
    echo "$SAGALINE_PG_BINDIR"
    return 0
  fi
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/pg_ctl && -x $d/initdb ]] && best+="$d"$'\n'
  done
  [[ -n $best ]] || return 1
  printf '%s' "$best" | sort -V | tail -n 1
}

ensure_binaries() {
  if BINDIR=$(find_bindir); then return 0; fi
  is_root || die "no PostgreSQL server found in /usr/lib/postgresql/*/bin; install it (apt-get install postgresql) or set SAGALINE_POSTGRES_DSN"
  command -v apt-get >/dev/null || die "no PostgreSQL server found and no apt-get to install one; set SAGALINE_POSTGRES_DSN"
  log "installing PostgreSQL with apt-get (first run on this machine)..."
  local aptlog=$STACK_DIR/postgres-apt.log
  # Debian's package may also create and start its own 'main' cluster on 5432; we never use it.
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; } >"$aptlog" 2>&1; then
    tail -n 30 "$aptlog" >&2
    die "apt-get install postgresql failed (full log: $aptlog); set SAGALINE_POSTGRES_DSN to use another server"
  fi
  BINDIR=$(find_bindir) || die "apt-get installed postgresql but no server appeared in /usr/lib/postgresql/*/bin"
}

ensure_pg_user() {
  is_root || return 0
  id -u "$PG_USER" >/dev/null 2>&1 && return 0
  log "creating system user $PG_USER"
  useradd --system --user-group --no-create-home --home-dir /var/lib/postgresql \
    --shell /usr/sbin/nologin "$PG_USER" || die "could not create the $PG_USER user"
}

# PG_HOME holds data/, run/ (the unix socket) and log/, all owned by the server's user.
# The choice is recorded so that stop/reset find the data even if permissions change.
resolve_pg_home() {
  if [[ -s $STATE/pg_home ]]; then
    PG_HOME=$(<"$STATE/pg_home")
    return 0
  fi
  [[ $CMD == start ]] || { PG_HOME=$STATE; return 0; }
  PG_HOME=$STATE
  if is_root; then
    # Our own dirs may be opened for traversal; ancestors outside them are not ours to change.
    chmod o+x "$STACK_DIR" "$STATE"
    if ! runuser -u "$PG_USER" -- test -x "$STATE"; then
      PG_HOME=/var/lib/sagaline/postgres-$(printf '%s' "$STATE" | sha256sum | cut -c1-12)
      log "$PG_USER cannot traverse the parents of $STATE; keeping the data in $PG_HOME"
    fi
  fi
  # Unix socket paths are limited to ~107 bytes.
  if (( ${#PG_HOME} > 80 )); then
    PG_HOME=/var/tmp/sagaline-postgres-$(printf '%s' "$STATE" | sha256sum | cut -c1-12)
    log "state path too long for a unix socket; keeping the data in $PG_HOME"
  fi
  echo "$PG_HOME" >"$STATE/pg_home"
}

set_paths() {
  DATA=$PG_HOME/data
  SOCK_DIR=$PG_HOME/run
  LOG_FILE=$PG_HOME/log/postgres.log
}

load_port() { [[ -s $PORT_FILE ]] && PORT=$(<"$PORT_FILE"); }

local_dsn() { echo "postgresql://$DB_NAME@127.0.0.1:$(<"$PORT_FILE")/$DB_NAME"; }

server_running() {
  [[ -f $DATA/postmaster.pid ]] || return 1
  [[ -n ${BINDIR:-} ]] || BINDIR=$(find_bindir) || return 1
  as_pg "$BINDIR/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

server_ready() {
  "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 3
}

lock_state() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 300 9 || die "timed out waiting for $STATE/.lock"
}

psql_admin() {
  # Superuser over the private unix socket (trust); stdout = query result.
  "$BINDIR/psql" -XqAt -v ON_ERROR_STOP=1 -h "$SOCK_DIR" -p "$PORT" -U postgres -d postgres "$@"
}

write_env() {
  echo "SAGALINE_POSTGRES_DSN=$1" >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
  echo "SAGALINE_POSTGRES_DSN=$1"
}

# ------------------------------------------------------------- commands
init_cluster() {
  [[ -f $DATA/PG_VERSION ]] && return 0
  log "initdb $DATA"
  # initdb wants an empty dir; anything here is the leftover of a failed initdb.
  find "$DATA" -mindepth 1 -delete
  as_pg "$BINDIR/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=trust >"$PG_HOME/log/initdb.log" 2>&1 \
    || { cat "$PG_HOME/log/initdb.log" >&2; die "initdb failed"; }
  # Only the private socket and 127.0.0.1; no IPv6 or remote entries at all.
  cat >"$DATA/pg_hba.conf" <<'EOF'
# Written by infra/postgres/postgres.sh: local development server, trust auth,
# reachable only through its private unix socket and 127.0.0.1.
local   all   all                 trust
host    all   all   127.0.0.1/32  trust
EOF
  # Settings that depend on the port/paths live in sagaline.conf, rewritten on every start.
  echo "include_if_exists = 'sagaline.conf'" >>"$DATA/postgresql.conf"
  chown "$(stat -c %U "$DATA")" "$DATA/pg_hba.conf" "$DATA/postgresql.conf"
}

write_conf() {
  cat >"$DATA/sagaline.conf" <<EOF
# Written by infra/postgres/postgres.sh on every start.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK_DIR'
max_connections = 200
EOF
  chown "$(stat -c %U "$DATA")" "$DATA/sagaline.conf"
}

ensure_port() {
  if load_port; then
    port_free "$PORT" && return 0
    log "port $PORT is taken by another process; picking a new one"
  fi
  PORT=$(free_ports 1)
  echo "$PORT" >"$PORT_FILE"
}

ensure_role_and_db() {
  if [[ -z $(psql_admin -c "select 1 from pg_roles where rolname = '$DB_NAME'") ]]; then
    psql_admin -c "create role $DB_NAME login superuser" >/dev/null
  fi
  if [[ -z $(psql_admin -c "select 1 from pg_database where datname = '$DB_NAME'") ]]; then
    psql_admin -c "create database $DB_NAME owner $DB_NAME" >/dev/null
  fi
}

cmd_start() {
  if external_dsn_ok; then
    log "using SAGALINE_POSTGRES_DSN from the environment; not starting a local server"
    write_env "$SAGALINE_POSTGRES_DSN"
    return 0
  fi
  lock_state
  ensure_binaries
  ensure_pg_user
  resolve_pg_home
  set_paths
  if server_running && load_port && server_ready; then
    log "$("$BINDIR/postgres" --version) already running on 127.0.0.1:$PORT"
  else
    if ! server_running; then
      ensure_port
      # PG_HOME itself stays ours (it may be the state dir); the server owns what it writes.
      mkdir -p "$DATA" "$SOCK_DIR" "${LOG_FILE%/*}"
      is_root && chown "$PG_USER:" "$DATA" "$SOCK_DIR" "${LOG_FILE%/*}"
      chmod 700 "$DATA" "$SOCK_DIR"
      init_cluster
      write_conf
      log "starting $("$BINDIR/postgres" --version) on 127.0.0.1:$PORT"
      # pg_ctl detaches the server (setsid); fd 9 is closed so that the server does
      # not inherit, and hold forever, our lock.
      if ! as_pg "$BINDIR/pg_ctl" start -w -t "$START_TIMEOUT" -D "$DATA" -l "$LOG_FILE" \
          >/dev/null 9>&-; then
        tail -n 20 "$LOG_FILE" >&2 || true
        die "PostgreSQL did not start within ${START_TIMEOUT}s; see $LOG_FILE"
      fi
    fi
    load_port
    # pg_ctl -w may have used the unix socket; the contract is TCP on 127.0.0.1.
    local deadline=$((SECONDS + START_TIMEOUT))
    until server_ready; do
      server_running || die "PostgreSQL exited during startup; see $LOG_FILE"
      ((SECONDS < deadline)) || die "PostgreSQL not accepting connections on 127.0.0.1:$PORT after ${START_TIMEOUT}s; see $LOG_FILE"
      sleep 0.3
    done
  fi
  ensure_role_and_db
  log "PostgreSQL $(psql_admin -c 'show server_version') on 127.0.0.1:$PORT (data $DATA)"
  write_env "$(local_dsn)"
}

cmd_stop() {
  # Never started: nothing to stop, and no reason to create the state dir.
  [[ -d $STATE ]] || { log "local PostgreSQL not running"; return 0; }
  lock_state
  resolve_pg_home
  set_paths
  if ! server_running; then
    log "local PostgreSQL not running"
    return 0
  fi
  as_pg "$BINDIR/pg_ctl" stop -D "$DATA" -m fast -w -t 60 >/dev/null \
    || die "pg_ctl stop failed; see $LOG_FILE"
  log "local PostgreSQL stopped; data kept in $DATA"
}

cmd_status() {
  if external_dsn_ok; then
    log "using SAGALINE_POSTGRES_DSN from the environment (reachable)"
    echo "SAGALINE_POSTGRES_DSN=$SAGALINE_POSTGRES_DSN"
    return 0
  fi
  resolve_pg_home
  set_paths
  if ! server_running; then
    log "local PostgreSQL not running"
    return 3
  fi
  load_port || die "server runs but $PORT_FILE is missing"
  if ! server_ready; then
    log "local PostgreSQL running on 127.0.0.1:$PORT but not accepting connections"
    return 1
  fi
  log "local PostgreSQL running on 127.0.0.1:$PORT (data $DATA)"
  echo "SAGALINE_POSTGRES_DSN=$(local_dsn)"
}

cmd_env() {
  if external_dsn_ok; then
    echo "SAGALINE_POSTGRES_DSN=$SAGALINE_POSTGRES_DSN"
    return 0
  fi
  [[ -s $PORT_FILE ]] || die "local PostgreSQL has never been started; run: $0 start"
  echo "SAGALINE_POSTGRES_DSN=$(local_dsn)"
}

cmd_reset() {
  cmd_stop
  # PG_HOME is only resolved when the state dir existed.
  rm -rf "${PG_HOME:-$STATE}" "$STATE" "$ENV_FILE"
  log "deleted ${PG_HOME:-$STATE}"
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
