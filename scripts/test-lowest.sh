#!/usr/bin/env bash
# The lowest-versions job (scripts/test.sh runs it, so CI does too): a second
# venv, .venv-lowest, with the LOWEST release that each of pyproject.toml's
# [project] dependencies allows, read from the bounds at run time, and a
# representative subset of the tests run in it. The main venv always gets
# the newest releases, so together the two test both ends of every bound.
#
# Only the project (no [dev] extra: taskiq-redis and the linters may want
# newer releases than our floors) and the test tools the subset needs, at
# their newest. A reused venv is forced back to the exact lowest versions.
# Extra arguments go to pytest. TQRC_LOWEST_VENV moves the venv.
source "$(dirname "$0")/_env.sh"
LOWEST_VENV="${TQRC_LOWEST_VENV:-$ROOT/.venv-lowest}"
# What the subset imports besides the project, by name; their bounds come
# from the dev extra.
TEST_TOOLS="pytest pytest-asyncio pytest-timeout hypothesis pyyaml"
# Each dependency's own code at its floor: redis-py's internals and a live
# client, the hiredis reply parser, tenacity's retries, pydantic and taskiq
# in the message encoding and the result backend, a stream and a list
# broker round trip (and a real `taskiq worker`), prometheus-client in the
# exporter. About 100 tests, under a minute on 2 cores.
SUBSET=(
    tests/test_redis_internals.py
    tests/test_hiredis.py
    tests/test_retry.py
    tests/test_kick_encoding.py
    tests/test_result_backend.py::test_round_trip
    tests/test_stream_broker.py::test_round_trip_and_fairness
    tests/test_stream_broker.py::test_garbage_entry_goes_to_dead_letter_and_worker_continues
    tests/test_stream_broker.py::test_unacked_entries_are_reclaimed_after_idle_timeout
    tests/test_list_pubsub.py::test_list_broker_round_trip_is_fair
    tests/test_list_pubsub.py::test_list_broker_end_to_end_with_taskiq_worker
    tests/test_exporter.py
)

ensure_redis_server
cd "$ROOT"
started=$SECONDS
if [ ! -x "$LOWEST_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$LOWEST_VENV"
fi
quiet_pip "$LOWEST_VENV" install --upgrade pip packaging 'tomli; python_version < "3.11"'

# lowest.txt: "name==floor" for each dependency (the constraints);
# tools.txt: the test tools' requirements as the dev extra gives them.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$LOWEST_VENV/bin/python" - "$ROOT/pyproject.toml" "$work" $TEST_TOOLS <<'PY'
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pyproject, work, tools = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
project = tomllib.loads(pyproject.read_text())["project"]
pins = []
for text in project["dependencies"]:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate():
        continue
    floors = [Version(s.version) for s in requirement.specifier
              if s.operator in (">=", "==", "~=", "===")]
    if not floors:
        sys.exit(f"pyproject.toml: {text!r} has no lower bound (>=) to test")
    floor = max(floors)
    if not requirement.specifier.contains(floor, prereleases=True):
        sys.exit(f"pyproject.toml: {text!r} excludes its own lower bound {floor}")
    pins.append(f"{requirement.name}=={floor}")
dev = {canonicalize_name(Requirement(text).name): text
       for text in project["optional-dependencies"]["dev"]}
missing = [name for name in tools if canonicalize_name(name) not in dev]
if missing:
    sys.exit(f"pyproject.toml: the dev extra has no {', '.join(missing)}")
(work / "lowest.txt").write_text("".join(f"{pin}\n" for pin in pins))
(work / "tools.txt").write_text("".join(f"{dev[canonicalize_name(n)]}\n" for n in tools))
PY

# The constraints hold each dependency at its floor; everything else (the
# tools, and what the pinned releases themselves need) gets its newest.
quiet_pip "$LOWEST_VENV" install --upgrade --upgrade-strategy eager \
    -c "$work/lowest.txt" -e "$ROOT" -r "$work/tools.txt"
names="$(sed 's/==.*//' "$work/lowest.txt" | tr '\n' ' ')"
echo "== lowest versions: $(installed_versions "$LOWEST_VENV" $names)"
echo "   (tools: $(installed_versions "$LOWEST_VENV" $TEST_TOOLS))"
# The installed versions must be the floors themselves, not something near.
"$LOWEST_VENV/bin/python" - "$work/lowest.txt" <<'PY'
import sys
from importlib.metadata import version

from packaging.requirements import Requirement

wrong = []
for line in open(sys.argv[1]).read().split():
    requirement = Requirement(line)
    if not requirement.specifier.contains(version(requirement.name), prereleases=True):
        wrong.append(f"{requirement.name} {version(requirement.name)} (wanted {requirement.specifier})")
if wrong:
    sys.exit("lowest-versions venv: " + "; ".join(wrong))
PY
echo "   venv ready in $((SECONDS - started)) s"

echo "== pytest (lowest versions)"
"$LOWEST_VENV/bin/pytest" -q -p no:cacheprovider "${SUBSET[@]}" "$@"
echo "== lowest-versions job: $((SECONDS - started)) s in all"
