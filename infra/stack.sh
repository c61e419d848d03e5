#!/usr/bin/env bash
# The sagaline local stack: a single-node Kafka and a PostgreSQL, as plain processes.
#
#   infra/stack.sh up      start both (idempotent); writes and prints stack.env
#   infra/stack.sh down    stop both, keeping their data
#   infra/stack.sh env     print stack.env (SAGALINE_KAFKA_BOOTSTRAP, SAGALINE_POSTGRES_DSN)
#   infra/stack.sh status  status of both; exit 0 only if both answer
#
# Typical use:  set -a; . <(infra/stack.sh up); set +a
# State lives in ${SAGALINE_STACK_DIR:-<repo>/.stack}; see infra/kafka/kafka.sh and
# infra/postgres/postgres.sh (their `reset` wipes the data, and kafka.sh also
# runs a 3-broker cluster with --brokers 3).
set -euo pipefail

INFRA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly INFRA_DIR
REPO_ROOT=$(cd "$INFRA_DIR/.." && pwd)
readonly REPO_ROOT
readonly KAFKA=$INFRA_DIR/kafka/kafka.sh
readonly POSTGRES=$INFRA_DIR/postgres/postgres.sh

mkdir -p "${SAGALINE_STACK_DIR:-$REPO_ROOT/.stack}"
# Exported absolute, so both child scripts agree on the same state dir.
SAGALINE_STACK_DIR=$(cd "${SAGALINE_STACK_DIR:-$REPO_ROOT/.stack}" && pwd)
export SAGALINE_STACK_DIR
readonly STACK_ENV=$SAGALINE_STACK_DIR/stack.env

die() { printf 'stack: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

cmd_up() {
  local kafka_line pg_line t0=$SECONDS
  # Each script prints exactly its env line on stdout (progress goes to stderr).
  kafka_line=$("$KAFKA" start --brokers 1)
  pg_line=$("$POSTGRES" start)
  [[ $kafka_line == SAGALINE_KAFKA_BOOTSTRAP=* ]] || die "unexpected output from kafka.sh start: $kafka_line"
  [[ $pg_line == SAGALINE_POSTGRES_DSN=* ]] || die "unexpected output from postgres.sh start: $pg_line"
  printf '%s\n%s\n' "$kafka_line" "$pg_line" >"$STACK_ENV.tmp"
  mv "$STACK_ENV.tmp" "$STACK_ENV"
  printf 'stack: up in %ss; env in %s\n' "$((SECONDS - t0))" "$STACK_ENV" >&2
  cat "$STACK_ENV"
}

cmd_down() {
  # Stop both even if the first fails, then report.
  local rc=0
  "$KAFKA" stop --brokers 1 || rc=1
  "$POSTGRES" stop || rc=1
  return "$rc"
}

cmd_env() {
  [[ -f $STACK_ENV ]] || die "no $STACK_ENV yet; run: $0 up"
  cat "$STACK_ENV"
}

cmd_status() {
  local rc=0
  "$KAFKA" status --brokers 1 >/dev/null || rc=1
  "$POSTGRES" status >/dev/null || rc=1
  return "$rc"
}

[[ $# -eq 1 ]] || usage
case $1 in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  -h|--help|help) usage ;;
  *) die "unknown command '$1' (up|down|env|status)" ;;
esac
