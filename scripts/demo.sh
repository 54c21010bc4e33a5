#!/usr/bin/env bash
# The demo (README step 1): creates .venv, starts a throwaway local Redis
# Cluster (3 masters + 3 replicas on free loopback ports), runs a real
# `taskiq worker` and a producer through ClusterStreamBroker, prints a short
# summary, and cleans everything up, also on failure or Ctrl-C.
source "$(dirname "$0")/_env.sh"
ensure_redis_server
ensure_venv
cd "$ROOT"

WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/tqrc-demo.XXXXXX")"
PORT="$("$VENV/bin/python" -c 'from taskiq_redis_cluster.testing import find_free_base_port; print(find_free_base_port(6))')"
CLI="$VENV/bin/taskiq-redis-cluster"
WORKER_PID=""

cleanup() {
    if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM -- "-$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$WORKER_PID" 2>/dev/null || true
    fi
    "$CLI" cluster down --dir "$WORKDIR/cluster" --base-port "$PORT" >/dev/null 2>&1 || true
    rm -rf "$WORKDIR"
}
trap cleanup EXIT INT TERM

echo "== starting a local Redis Cluster (3 masters, 3 replicas) on 127.0.0.1:$PORT.."
URL="$("$CLI" cluster up --masters 3 --replicas 1 --base-port "$PORT" --dir "$WORKDIR/cluster" 2>"$WORKDIR/cluster.log" | head -n 1)"
"$CLI" cluster status --dir "$WORKDIR/cluster" --base-port "$PORT"

export TQRC_URL="$URL" TQRC_QUEUE="demo" PYTHONPATH="$ROOT/docs/examples"
echo "== starting a taskiq worker"
setsid "$VENV/bin/taskiq" worker quickstart:broker --workers 1 >"$WORKDIR/worker.log" 2>&1 &
WORKER_PID=$!

echo "== kicking 200 tasks and waiting for their results"
"$VENV/bin/python" "$ROOT/docs/examples/quickstart.py" 200
echo "== plan of the demo queue"
"$CLI" plan show --url "$URL" --queue demo
echo "== demo finished; cleaning up"
