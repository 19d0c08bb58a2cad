#!/usr/bin/env bash
# One release, as the workflow runs it: set up, release, write the report, post it (in GitHub Actions).
# Inputs come from the environment: RELEASE_DATA_REV, RELEASE_BUMP (minor|patch|major), RELEASE_DEPLOY (true|false),
# RELEASE_OVERRIDE_GATE (true|false), RELEASE_PUBLISH_IMAGES (true|false), SEM_PCYC_DVC_CACHE (cache folder).
set -euo pipefail
cd "$(dirname "$0")/.."
SEM_PCYC_ICONIFY=skip bash scripts/setup.sh   # a release never builds the cross-artist set: no npm fetch
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1

if [ -n "${SEM_PCYC_DVC_CACHE:-}" ]; then
  mkdir -p "$SEM_PCYC_DVC_CACHE"
  dvc cache dir --local "$SEM_PCYC_DVC_CACHE"
fi
git config user.name >/dev/null || git config user.name "sem-pcyc release"
git config user.email >/dev/null || git config user.email "sem-pcyc-release@localhost"

args=(--bump "${RELEASE_BUMP:-minor}")
[ -n "${RELEASE_DATA_REV:-}" ] && args+=(--rev "$RELEASE_DATA_REV")
[ "${RELEASE_DEPLOY:-true}" = "true" ] || args+=(--no-deploy)
[ "${RELEASE_OVERRIDE_GATE:-false}" = "true" ] && args+=(--override-gate)
[ -n "${RELEASE_GIT_REMOTE:-}" ] && args+=(--git-remote "$RELEASE_GIT_REMOTE")

# Report only on what this run produced: release.json (done) or gate.json (stopped by the quality gate).
rm -f reports/release.json reports/gate.json
status=0
sempcyc release "${args[@]}" || status=$?
if [ -f reports/release.json ] || [ -f reports/gate.json ]; then
  sempcyc report || true
  if [ "${GITHUB_ACTIONS:-}" = "true" ] && command -v npx >/dev/null; then
    publish=()
    [ "${RELEASE_PUBLISH_IMAGES:-false}" = "true" ] && publish=(--publish)
    npx --yes @dvcorg/cml@0.20.6 comment create "${publish[@]}" reports/report.md || echo "release: could not post the report"
  fi
fi
exit "$status"
