#!/usr/bin/env bash
# Installs the services the tests use (a real redis-server and PostgreSQL); the tests start their own
# instances on free loopback ports, so nothing here is left running or shared. Idempotent and quick
# when both are there already.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
# Real offline text for calibration (adaptc/calibrate/text.py): Debian fortunes and the KJV with its reader.
[ -d /usr/share/games/fortunes ] || need+=(fortunes)
{ command -v bible >/dev/null && [ -f /usr/lib/bible.data ]; } || need+=(bible-kjv bible-kjv-text)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "services.sh: missing ${need[*]} and not root (no passwordless sudo): the tests that need them will be skipped" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "services.sh: missing ${need[*]} and no apt-get here; install them with your package manager" >&2
  exit 0
fi
echo "services.sh: installing ${need[*]}" >&2
"${sudo[@]}" apt-get update -qq
# policy-rc.d-less containers may fail to start the distribution's own cluster; the tests do not use it.
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
