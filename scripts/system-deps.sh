#!/usr/bin/env bash
# System packages, per make target (scripts/system-deps.sh repro|test):
#   repro: Java 17 (TorchServe, for the serve-check stage)
#   test:  Java 17, OpenSSH server (deploy tests) and Chromium (the sketch page's browser tests; another
#          Chromium or Chrome binary may be named in $SEM_PCYC_CHROMIUM)
# Missing ones are installed with apt-get when running as root; otherwise this stops at once with one line saying
# what to install.
set -euo pipefail
target=${1:-test}
case "$target" in repro|test) ;; *) echo "system-deps: unknown target '$target' (repro or test)" >&2; exit 2 ;; esac

java_bin() {  # the java TorchServe will run: JAVA_HOME's first, as torchserve.py does
  if [ -n "${JAVA_HOME:-}" ]; then echo "$JAVA_HOME/bin/java"; else command -v java || echo java; fi
}
java_major() {  # its major version, or 0
  local version
  version=$("$(java_bin)" -version 2>&1 | grep -o 'version "[0-9][0-9._]*' | head -1 | tr -dc '0-9.') || true
  case "$version" in 1.*) version=${version#1.} ;; esac
  echo "${version%%.*}" | grep -E '^[0-9]+$' || echo 0
}

need=()
[ "$(java_major)" -ge 17 ] || need+=(openjdk-17-jre-headless)
if [ "$target" = test ]; then
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  [ -x "${SEM_PCYC_CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "system-deps: installing ${need[*]} with apt-get"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >"$log" 2>&1; then
      echo "system-deps: apt-get could not install ${need[*]}: $(grep -v '^debconf' "$log" | tail -1)" >&2
      exit 1
    fi
    rm -f "$log"
  else
    echo "system-deps: missing ${need[*]}; install it (e.g. sudo apt-get install -y ${need[*]}) and rerun" >&2
    exit 1
  fi
fi
if [ "$(java_major)" -lt 17 ]; then
  echo "system-deps: TorchServe needs Java 17, but $(java_bin) is Java $(java_major);" \
       "put Java 17's bin/ first on PATH or set JAVA_HOME (e.g. /usr/lib/jvm/java-17-openjdk-amd64)" >&2
  exit 1
fi
