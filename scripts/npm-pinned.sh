#!/usr/bin/env bash
# Usage: bash scripts/npm-pinned.sh WHAT PINS DEST
# Fetch the npm packages pinned in PINS (lines "package version sha512-integrity"; # starts a comment) into
# DEST/<package>/, for data the repository reads but does not ship (scripts/iconify.sh, scripts/wordnet.sh call it;
# WHAT names the data in messages). Each tarball is checked against its pinned sha512 integrity (npm's
# `dist.integrity` form) before it is unpacked, and a package already unpacked with that integrity is not fetched
# again. Needs npm (Node.js).
set -euo pipefail
WHAT=$1 PINS=$2 DEST=$3
PYTHON=${PYTHON:-python3}
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "$WHAT: npm/node not found; install Node.js with npm (e.g. apt-get install -y nodejs npm), then run" \
       "bash scripts/$WHAT.sh" >&2
  exit 1
fi

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
  echo "$WHAT: fetching $name@$version"
  mkdir -p "$tmp/pack" "$tmp/unpacked"
  if ! tgz=$(cd "$tmp/pack" && npm pack --silent --json "$name@$version" \
             | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)[0]["filename"])'); then
    echo "$WHAT: npm could not fetch $name@$version (pinned in $PINS); check the npm registry is reachable" >&2
    exit 1
  fi
  got=$(integrity_of "$tmp/pack/$tgz")
  if [ "$got" != "$integrity" ]; then
    echo "$WHAT: $name@$version: the tarball's integrity is $got, but $PINS pins $integrity; not installed" >&2
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
echo "$WHAT: the pinned packages are in $DEST ($fetched fetched now)"
