#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N workers, each a separate `ray start` with its own temp dir.
#
#   cluster/local.sh start [N_WORKERS=1] [CPUS_PER_NODE=1]   # then submit stages with `ray job submit` (printed)
#   cluster/local.sh stop                                    # stops this cluster's processes only
#   cluster/local.sh stop --all                              # `ray stop`: every Ray process on the machine
#
# Why the settings (STACK.md §8):
# - RAY_AUTH_MODE must be the same for every ray command of a cluster (token auth is on by default since 2.5x and
#   a `ray start --address` or `ray job submit` with another mode is rejected). Default here: disabled, a
#   throwaway cluster on a dev box; export RAY_AUTH_MODE=token to keep auth (token in ~/.ray/auth_token).
# - Each node gets its own --temp-dir: nodes sharing one unpack the same working_dir package and delete the job
#   driver's cwd from under it (FileNotFoundError on every first submission).
# - Temp dirs stay short (unix socket paths must be < 107 chars).
set -euo pipefail

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8266}"
ROOT="${RAY_LOCAL_ROOT:-/tmp/rayl}"
RAY="${RAY:-ray}"

case "${1:-}" in
  start)
    workers="${2:-1}"
    cpus="${3:-1}"
    mkdir -p "$ROOT"
    "$RAY" start --head --port="$PORT" --num-cpus="$cpus" --temp-dir="$ROOT/head" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats
    for i in $(seq 1 "$workers"); do
      "$RAY" start --address="127.0.0.1:$PORT" --num-cpus="$cpus" --temp-dir="$ROOT/w$i" --disable-usage-stats
    done
    cat <<EOF

Cluster up: head + $workers worker(s), $cpus CPU(s) each. In this shell:
  export RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
  ray job submit --working-dir . -- python -m jobs.collect_dcot --model <model dir> --concurrency $((workers + 1))
Stop with: $0 stop
EOF
    ;;
  stop)
    if [[ "${2:-}" == "--all" || ! -d /proc/self/fd ]]; then
      "$RAY" stop
    else
      # Every process of this cluster logs under $ROOT (agents rename themselves, so match open files, not names);
      # `ray stop` would also kill other Ray instances on the machine (test sessions, other users' clusters).
      pids=$(for d in /proc/[0-9]*; do
               ls -l "$d/fd" 2>/dev/null | grep -q "$ROOT/" && echo "${d#/proc/}"; done || true)
      if [[ -n "$pids" ]]; then
        kill $pids 2>/dev/null || true
        sleep 5
        kill -9 $pids 2>/dev/null || true
      fi
    fi
    rm -rf "$ROOT"
    ;;
  *)
    echo "usage: $0 start [N_WORKERS] [CPUS_PER_NODE] | stop [--all]" >&2
    exit 2
    ;;
esac
