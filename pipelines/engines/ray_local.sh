#!/usr/bin/env bash
# A local Ray cluster for tests and for trying mixlab's Ray paths on one machine: a head node with a fixed CPU
# count and no dashboard, started with the venv's `ray` (the workers then run the venv's Python and mixlab).
#
#   pipelines/engines/ray_local.sh up      # start (if not running); prints the address to pass as RAY_ADDRESS
#   pipelines/engines/ray_local.sh down    # stop it
#   pipelines/engines/ray_local.sh status  # the address (exit 0) when it is up
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

log() { echo "ray_local: $*" >&2; }

[ -x "$RAY" ] || { log "$RAY not found: install ray into the venv (make setup does) or set RAY"; exit 1; }

is_up() { RAY_ADDRESS="$ADDRESS" "$RAY" status >/dev/null 2>&1; }

case "${1:-}" in
    up)
        if is_up; then
            log "already up at $ADDRESS"
        else
            mkdir -p "$DIR"
            RAY_USAGE_STATS_ENABLED=0 "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
                --num-cpus="$CPUS" --include-dashboard=false --disable-usage-stats --temp-dir="$DIR" >"$DIR/start.log" 2>&1 \
                || { log "ray start failed:"; tail -20 "$DIR/start.log" >&2; exit 1; }
            log "up at $ADDRESS ($CPUS CPUs, no dashboard)"
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
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
