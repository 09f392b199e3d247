#!/usr/bin/env bash
# Run the test suite:   bash scripts/test.sh [pytest args...]
#
# Every run gets a fresh, throw-away FiftyOne world: its own MongoDB data dir, its
# own plugins dir (holding a symlink to this repo), an empty FiftyOne config, and
# offline Hugging Face. tests/conftest.py starts a private mongod on that data dir
# and stops it at exit. As a safety net, any process still carrying this run's temp
# dir in its environment or command line (mongod, an App server, chromium, a worker)
# is stopped here afterwards, so nothing keeps a pipe open after pytest returns.
# The exit code is pytest's.
#
# Prints the 20 slowest tests. Fast lane (no browser, no worker processes):
#   bash scripts/test.sh -m "not browser and not workers"
# SDCORR_KEEP_TMP=1 keeps the temp dir (database, logs) for inspection.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
if [ ! -x "$PY" ]; then
    echo "ERROR: $REPO/.venv is missing; run: bash scripts/setup.sh" >&2
    exit 2
fi

# Two lanes at once: with no selection of tests (no -m, -k, file or node id; flags such as
# -ra, -q, -x are fine), the browser tests (Chromium, the App server: mostly waiting) with
# the bad-files tests, and the rest (mostly CPU) run as two pytest processes side by side, each in its own throw-away
# world (database, plugins dir, App server), one torch thread each. Their outputs follow
# one another, then one closing line for both. SDCORR_TEST_LANES=1 runs one process.
selected=0
for a in "$@"; do
    case "$a" in -m|-k|tests*|*.py|*::*) selected=1 ;; esac
done
if [ "${SDCORR_TEST_LANE:-}" = "" ] && [ "$selected" = "0" ] && [ "${SDCORR_TEST_LANES:-2}" = "2" ]; then
    LOGS="$(mktemp -d "${TMPDIR:-/tmp}/sdcorr-lanes.XXXXXX")"
    # the browser files and, to even the lanes out, the bad-files tests (subprocess-heavy)
    LANE_A=(tests/test_browser.py tests/test_browser_masks.py tests/test_browser_operators.py tests/test_bad_files.py)
    SDCORR_TEST_LANE=browser OMP_NUM_THREADS=1 bash "$0" "$@" "${LANE_A[@]}" > "$LOGS/browser.log" 2>&1 &
    PB=$!
    SDCORR_TEST_LANE=rest OMP_NUM_THREADS=1 bash "$0" "$@" tests "${LANE_A[@]/#/--ignore=}" > "$LOGS/rest.log" 2>&1 &
    PR=$!
    wait "$PR"; RR=$?
    wait "$PB"; RB=$?
    for lane in rest browser; do
        echo "================================ lane: $lane ================================"
        cat "$LOGS/$lane.log"
    done
    count() { grep -E "^=+ .*(passed|failed|error).* in [0-9.]+s" "$LOGS/$1.log" | tail -1 \
              | grep -oE "[0-9]+ $2" | grep -oE "^[0-9]+" || echo 0; }
    P=$(( $(count rest passed) + $(count browser passed) ))
    F=$(( $(count rest failed) + $(count browser failed) + $(count rest error) + $(count browser error) ))
    S=$(( $(count rest skipped) + $(count browser skipped) ))
    rm -rf "$LOGS"
    echo "total: $P passed, $F failed, $S skipped"
    [ "$RR" = "0" ] && [ "$RB" = "0" ] && exit 0
    exit 1
fi

SDCORR_TMP="$(mktemp -d "${TMPDIR:-/tmp}/sdcorr-test.XXXXXX")"
mkdir -p "$SDCORR_TMP/db" "$SDCORR_TMP/plugins"
ln -s "$REPO" "$SDCORR_TMP/plugins/sdcorr"

export SDCORR_TEST_ENV=1            # tells tests/conftest.py the env is prepared
export SDCORR_TEST_TMP="$SDCORR_TMP"
export FIFTYONE_DATABASE_DIR="$SDCORR_TMP/db"
export FIFTYONE_PLUGINS_DIR="$SDCORR_TMP/plugins"
export FIFTYONE_CONFIG_PATH="$SDCORR_TMP/fiftyone-config.json"        # absent: defaults
export FIFTYONE_APP_CONFIG_PATH="$SDCORR_TMP/fiftyone-app-config.json" # absent: defaults
export FIFTYONE_DO_NOT_TRACK=true
export FIFTYONE_DATABASE_VALIDATION=false
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
unset FIFTYONE_DATABASE_URI FIFTYONE_DATABASE_NAME SDCORR_TEST_MONGOD_PID

# Stop every process that belongs to this run: those whose environment or command
# line names our unique temp dir. mongod gets SIGTERM first so it shuts down cleanly.
run_pids() {
    # list the /proc files first, so the helpers below (which carry our env) are
    # not among them
    local files=(/proc/[0-9]*/environ /proc/[0-9]*/cmdline)
    grep -lsF "$SDCORR_TMP" "${files[@]}" 2>/dev/null | cut -d/ -f3 | sort -un \
        | grep -vx "$$"
}

# Stop mongod first (so it shuts down cleanly before its parent goes), then
# anything else; SIGKILL whatever is left after a grace period.
stop_pids() {  # $1 = "mongod" | "all", $2 = grace seconds
    local pids p i alive
    pids=""
    for p in $(run_pids); do
        if [ "$1" = "all" ] || [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$1" ]; then
            pids="$pids $p"
        fi
    done
    [ -z "$pids" ] && return 0
    for p in $pids; do
        echo "test.sh: stopping leftover process $p: $(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" | cut -c1-120)" >&2
    done
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null
    for i in $(seq 1 $(( $2 * 5 ))); do
        alive=""
        for p in $pids; do
            kill -0 "$p" 2>/dev/null && alive="$alive $p"
        done
        pids="$alive"
        [ -z "$pids" ] && return 0
        sleep 0.2
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.2
}

cleanup() {
    local rc=$?
    stop_pids mongod 10
    stop_pids all 5
    if [ "${SDCORR_KEEP_TMP:-0}" = "1" ]; then
        echo "test.sh: kept $SDCORR_TMP"
    else
        rm -rf "$SDCORR_TMP"
    fi
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "test.sh: FiftyOne database dir $FIFTYONE_DATABASE_DIR"
"$PY" -m pytest --durations=20 "$@"
RC=$?
exit $RC
