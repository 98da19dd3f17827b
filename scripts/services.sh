#!/usr/bin/env bash
# Installs the services the tests use (a real redis-server and PostgreSQL); the tests start their own
# instances on free loopback ports, so nothing here is left running or shared.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "services.sh: missing ${need[*]} (run as root to install); tests that need them will fail" >&2
  fi
fi
