#!/usr/bin/env bash
# A local Ray cluster for tests and for trying mixlab's Ray paths on one machine: a head node with a fixed CPU
# count and no dashboard, started with the venv's `ray` (the workers then run the venv's Python and mixlab).
#
#   pipelines/engines/ray_local.sh up      # start (if not running); prints the address to pass as RAY_ADDRESS
#   pipelines/engines/ray_local.sh down    # stop it
#   pipelines/engines/ray_local.sh status  # the address (exit 0) when it is up
#   pipelines/engines/ray_local.sh env     # when up: the variables a client needs, one KEY=VALUE a line
#                                          #   (e.g. `env $(pipelines/engines/ray_local.sh env) mixlab curate ...`)
#
# Authentication is chosen here, never left to Ray's default: Ray >= 2.5x turns token authentication on when
# ~/.ray/auth_token exists (any earlier `ray.init()` writes one), and a client without the mode and token is then
# refused. This cluster uses its own token ($DIR/auth_token, made at the first `up`, readable by its owner only).
#
# MIXLAB_RAY_CPUS (default: nproc) sets the CPU count, MIXLAB_RAY_PORT (default 6390) the GCS port, and
# MIXLAB_RAY_DIR (default /tmp/mixlab-ray) holds Ray's session files. RAY (default .venv/bin/ray) is the binary.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
PORT="${MIXLAB_RAY_PORT:-6390}"
CPUS="${MIXLAB_RAY_CPUS:-$(nproc)}"
DIR="${MIXLAB_RAY_DIR:-/tmp/mixlab-ray}"
ADDRESS="127.0.0.1:${PORT}"
TOKEN="$DIR/auth_token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"

log() { echo "ray_local: $*" >&2; }

[ -x "$RAY" ] || { log "$RAY not found: install ray into the venv (make setup does) or set RAY"; exit 1; }

is_up() { [ -s "$TOKEN" ] && RAY_ADDRESS="$ADDRESS" "$RAY" status >/dev/null 2>&1; }

case "${1:-}" in
    up)
        if is_up; then
            log "already up at $ADDRESS"
        else
            mkdir -p "$DIR"
            "$RAY" stop --force >/dev/null 2>&1 || true  # a head left from an earlier token or mode
            (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$TOKEN")
            RAY_USAGE_STATS_ENABLED=0 "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
                --num-cpus="$CPUS" --include-dashboard=false --disable-usage-stats --temp-dir="$DIR" >"$DIR/start.log" 2>&1 \
                || { log "ray start failed:"; tail -20 "$DIR/start.log" >&2; exit 1; }
            is_up || { log "ray started but does not answer \`ray status\` at $ADDRESS:"; \
                       RAY_ADDRESS="$ADDRESS" "$RAY" status 2>&1 | tail -3 >&2; exit 1; }
            log "up at $ADDRESS ($CPUS CPUs, no dashboard, token auth with $TOKEN)"
        fi
        echo "$ADDRESS"
        ;;
    down)
        "$RAY" stop --force >/dev/null 2>&1 || true
        log "down"
        ;;
    status)
        is_up && echo "$ADDRESS"
        ;;
    env)
        is_up && printf 'RAY_ADDRESS=%s\nRAY_AUTH_MODE=token\nRAY_AUTH_TOKEN_PATH=%s\n' "$ADDRESS" "$TOKEN"
        ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
