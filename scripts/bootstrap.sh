#!/usr/bin/env bash
# Installs what SpineWatch needs on a fresh Debian machine, idempotently: system packages (when root
# and missing) and a virtual environment in .venv with the project.
#
#   bash scripts/bootstrap.sh          everything the tests need (README's test command, .ci/run)
#   bash scripts/bootstrap.sh --demo   only what `spinewatch demo` needs
#
# System packages: redis-server (the Celery broker and store; the demo and the tests), and for the
# tests only chromium (the review-page browser test), postgresql (the audit log on PostgreSQL) and
# docker-compose (validates docker-compose.yml). apt-get waits up to APT_LOCK_TIMEOUT seconds (300)
# for another apt/dpkg process (unattended-upgrades on a fresh machine) to release the dpkg lock.
# The project is installed again only when pyproject.toml, the Python or the installed version changed.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=test
case "${1:-}" in
  "") ;;
  --demo) profile=demo ;;
  --test) profile=test ;;
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "bootstrap: unknown option $1 (use --demo, or nothing for everything the tests need)" >&2; exit 2 ;;
esac
lock_timeout="${APT_LOCK_TIMEOUT:-300}"

want=()
command -v redis-server >/dev/null || want+=(redis-server)
if [ "$profile" = test ]; then
  command -v chromium >/dev/null || want+=(chromium)
  [ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || want+=(postgresql)
  command -v docker-compose >/dev/null || want+=(docker-compose)
fi

apt() {
  if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$lock_timeout" "$@"; then
    echo "bootstrap: apt-get $1 failed. If another apt or dpkg process held the lock for more than" \
         "${lock_timeout} s (e.g. unattended-upgrades), wait for it to finish (ps -C apt-get,dpkg," \
         "unattended-upgr) and run this again; APT_LOCK_TIMEOUT=<seconds> waits longer." >&2
    exit 1
  fi
}

if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${want[*]} (apt-get; waits up to ${lock_timeout} s for the dpkg lock)"
    apt update -qq
    apt install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  else
    echo "bootstrap: missing ${want[*]}; install them with: sudo apt-get install ${want[*]}" >&2
  fi
fi

# The project: skipped when what was installed last time is what would be installed now.
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp_file=.venv/.spinewatch-bootstrap
project_version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])') $project_version"
installed="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("spinewatch"))' 2>/dev/null || true)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ "$installed" = "$project_version" ] \
   && [ -x .venv/bin/spinewatch ]; then
  echo "bootstrap: .venv is up to date (spinewatch $installed, pyproject.toml unchanged)"
else
  .venv/bin/python -m pip install -q --upgrade pip
  # The test extra also holds sekmet-fhir, the demo's FHIR server: the demo needs it too.
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$stamp" > "$stamp_file"
fi
echo "bootstrap: ready (.venv, ${profile})"
