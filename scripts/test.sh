#!/usr/bin/env bash
# The project's one test command (README step 2; CI runs exactly this).
# Creates .venv, installs the project with its dev extra, makes sure
# redis-server is present, then runs lint, type checks, the docs build and
# the test suite against real local Redis Cluster nodes that the tests start
# and stop themselves. Extra arguments go to pytest. Before that suite, the
# lowest-versions job (scripts/test-lowest.sh): a subset of the tests in a
# second venv with the lowest release of each dependency that pyproject.toml
# allows (TQRC_LOWEST=0 skips it, for a quick local run; CI never sets it).
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
# The lowest-versions job (about 40 s) runs first, so that the main suite's
# summary closes the log; a failure of it is reported at the end, and the
# main suite still runs, so one run tells about both ends of the bounds.
lowest=0
if [ "${TQRC_LOWEST:-1}" != "0" ]; then
    echo "== lowest-versions job (scripts/test-lowest.sh)"
    bash "$ROOT/scripts/test-lowest.sh" || lowest=$?
fi
echo "== pytest"
status=0
"$VENV/bin/pytest" -q -p no:cacheprovider "$@" || status=$?
if [ "$lowest" != "0" ]; then
    echo "== FAILED: the lowest-versions job (exit $lowest, its log is above the main suite's)" >&2
    [ "$status" != "0" ] || status=$lowest
fi
exit "$status"
