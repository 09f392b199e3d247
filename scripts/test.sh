#!/usr/bin/env bash
# Run the test suite:   bash scripts/test.sh [pytest args...]
#
# Every run gets a fresh, throw-away FiftyOne world: its own MongoDB data dir, its
# own plugins dir (holding a symlink to this repo), an empty FiftyOne config, and
# offline Hugging Face. Any process started under this run (mongod, the FiftyOne
# service wrapper, an App server, chromium) is stopped at the end, so nothing
# keeps a pipe open after pytest returns. The exit code is pytest's.
#
# SDCORR_KEEP_TMP=1 keeps the temp dir (database, logs) for inspection.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
if [ ! -x "$PY" ]; then
    echo "ERROR: $REPO/.venv is missing; run: bash scripts/setup.sh" >&2
    exit 2
fi

SDCORR_TMP="$(mktemp -d "${TMPDIR:-/tmp}/sdcorr-test.XXXXXX")"
mkdir -p "$SDCORR_TMP/db" "$SDCORR_TMP/plugins" "$SDCORR_TMP/home"
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
unset FIFTYONE_DATABASE_URI FIFTYONE_DATABASE_NAME

# Stop every process that belongs to this run: those whose environment or command
# line names our unique temp dir. mongod gets SIGTERM first so it shuts down cleanly.
run_pids() {
    local p pid
    for p in /proc/[0-9]*; do
        pid="${p#/proc/}"
        [ "$pid" = "$$" ] && continue
        if grep -qsF "$SDCORR_TMP" "$p/environ" 2>/dev/null \
            || grep -qsF "$SDCORR_TMP" "$p/cmdline" 2>/dev/null; then
            echo "$pid"
        fi
    done
}

cleanup() {
    local pids i
    pids="$(run_pids)"
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null
        for i in $(seq 1 50); do
            pids="$(run_pids)"
            [ -z "$pids" ] && break
            sleep 0.2
        done
        if [ -n "$pids" ]; then
            echo "test.sh: killing leftover processes: $(echo $pids)" >&2
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null
            sleep 0.5
        fi
    fi
    if [ "${SDCORR_KEEP_TMP:-0}" = "1" ]; then
        echo "test.sh: kept $SDCORR_TMP"
    else
        rm -rf "$SDCORR_TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "test.sh: FiftyOne database dir $FIFTYONE_DATABASE_DIR"
"$PY" -m pytest "$@"
RC=$?
exit $RC
