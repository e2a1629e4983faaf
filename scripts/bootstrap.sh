#!/usr/bin/env bash
# Installs what SpineWatch and its tests need on a fresh Debian machine, idempotently:
# system packages (when root and missing) and a virtual environment in .venv with the project.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the Celery broker and store. chromium: the review-page browser test.
# postgresql: the audit-log test on PostgreSQL. docker-compose: validates docker-compose.yml.
want=()
command -v redis-server >/dev/null || want+=(redis-server)
command -v chromium >/dev/null || want+=(chromium)
[ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || want+=(postgresql)
command -v docker-compose >/dev/null || want+=(docker-compose)
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${want[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  else
    echo "bootstrap: missing ${want[*]}; install them with: sudo apt-get install ${want[*]}" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "bootstrap: ready (.venv)"
