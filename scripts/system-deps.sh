#!/usr/bin/env bash
# System packages the integration tests use: OpenSSH server (deploy tests) and Java 17 (TorchServe).
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "system-deps: installing ${need[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "system-deps: missing ${need[*]}; install it (e.g. sudo apt-get install -y ${need[*]}) and rerun" >&2
    exit 1
  fi
fi
if ! command -v java >/dev/null; then
  echo "system-deps: warning: java not found; TorchServe tests need Java 17 (apt-get install -y openjdk-17-jre-headless)" >&2
fi
