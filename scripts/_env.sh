# Shared by scripts/test.sh and scripts/demo.sh: a venv with the project and
# a redis-server >= 7.0 on PATH. Sourced, not executed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TQRC_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_redis_server() {
    if ! command -v redis-server >/dev/null 2>&1; then
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
            echo "redis-server not found; installing it with apt-get" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
            # The package may start a service on 6379; tests never use it.
        else
            echo "redis-server (>= 7.0) is required: sudo apt-get install -y redis-server" >&2
            exit 1
        fi
    fi
}

ensure_prometheus() {
    # Only the metrics integration test needs it (a real Prometheus server and
    # promtool); that test skips with the reason when it cannot be installed.
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "prometheus not found; installing it with apt-get" >&2
        apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 \
            || echo "could not install prometheus; its integration test will skip" >&2
    else
        echo "prometheus not installed (sudo apt-get install -y prometheus); its test will skip" >&2
    fi
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    # --upgrade --upgrade-strategy eager: the newest releases the bounds
    # allow, also in a reused venv (a plain install keeps whatever release it
    # already has, which once hid a redis-py release that broke us).
    quiet_pip "$VENV" install --upgrade pip
    quiet_pip "$VENV" install --upgrade --upgrade-strategy eager -e "$ROOT[dev]"
    echo "== versions: $(installed_versions "$VENV" $KEY_PACKAGES)"
}

# The packages whose versions the logs show.
KEY_PACKAGES="taskiq redis hiredis tenacity prometheus-client pydantic taskiq-redis"

# quiet_pip VENV ARGS...: pip in VENV, quiet on success, its whole log on failure.
quiet_pip() {
    local venv="$1" log
    shift
    log="$(mktemp)"
    if ! "$venv/bin/python" -m pip "$@" >"$log" 2>&1; then
        echo "pip $* failed:" >&2
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
}

# installed_versions VENV NAMES...: "name==version ..." as installed in VENV.
installed_versions() {
    local venv="$1"
    shift
    "$venv/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

def found(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"

print(" ".join(f"{name}=={found(name)}" for name in sys.argv[1:]))
PY
}
