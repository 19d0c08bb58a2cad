#!/usr/bin/env bash
# Fetch the Iconify emoji sets pinned in scripts/iconify.txt into vendor/iconify/<package>/ (ignored by git) for
# `sempcyc cross-artist`, each tarball checked against its pinned integrity (scripts/npm-pinned.sh). Idempotent.
# Needs npm (Node.js); the default pipeline does not. ICONIFY_DIR overrides the destination.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "$BASH" scripts/npm-pinned.sh iconify scripts/iconify.txt "${ICONIFY_DIR:-vendor/iconify}"
