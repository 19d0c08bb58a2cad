#!/usr/bin/env bash
# One release, as the workflow's release step runs it: set up, release, write reports/report.md (the workflow's
# report job posts it, with no access to this step's secrets). Inputs come from the environment: RELEASE_DATA_REV,
# RELEASE_BUMP (minor|patch|major), RELEASE_DEPLOY (true|false), RELEASE_OVERRIDE_GATE (true|false),
# SEM_PCYC_DVC_CACHE (cache folder).
set -euo pipefail
cd "$(dirname "$0")/.."
SEM_PCYC_ICONIFY=skip bash scripts/setup.sh   # a release never builds the cross-artist set: skip the Iconify download
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

# Report only on what this run produced: release.json (released; its deploy may have failed) or gate.json
# (stopped by the quality gate).
rm -f reports/release.json reports/gate.json reports/report.md
status=0
sempcyc release "${args[@]}" || status=$?
if [ -f reports/release.json ] || [ -f reports/gate.json ]; then
  sempcyc report || echo "release: could not write the report"
fi
exit "$status"
