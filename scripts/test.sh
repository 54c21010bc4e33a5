#!/usr/bin/env bash
# The project's one test command (README step 2; CI runs exactly this).
# Creates .venv, installs the project with its dev extra, makes sure
# redis-server is present, then runs lint, type checks, the docs build and
# the test suite against real local Redis Cluster nodes that the tests start
# and stop themselves. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
ensure_redis_server
ensure_prometheus
ensure_venv
cd "$ROOT"
echo "== ruff"
"$VENV/bin/ruff" check taskiq_redis_cluster tests scripts
echo "== mypy --strict"
"$VENV/bin/mypy" --strict taskiq_redis_cluster
# Our dev tools are typed too (they live outside the package, under scripts/).
MYPYPATH="$ROOT/scripts" "$VENV/bin/mypy" --strict --cache-dir "$ROOT/.mypy_cache" -p bench -p chaos
echo "== mkdocs build --strict"
"$VENV/bin/mkdocs" build --strict --quiet --site-dir "$(mktemp -d)"
echo "== pytest"
"$VENV/bin/pytest" -q -p no:cacheprovider "$@"
