#!/usr/bin/env bash
# The Python venv of the analytics consumer test (tests/analytics): confluent-kafka and fastavro
# pinned in tests/analytics/requirements.txt, installed from PyPI into a venv outside the clone.
# Prints the venv's python path; creates or updates the venv only when the requirements changed.
#
#   PY=$(scripts/python-env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${XSENDER_VENV:-$HOME/.cache/xsender-events/venv}"
REQ=tests/analytics/requirements.txt
stamp=$(sha256sum "$REQ" | cut -c1-16)

# A venv whose base interpreter went away (a python upgrade) is made anew.
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c '' 2>/dev/null; then rm -rf "$VENV"; fi
if [ "$(cat "$VENV/.xsender-requirements" 2>/dev/null)" != "$stamp" ]; then
  command -v python3 >/dev/null || { echo "missing python3" >&2; exit 1; }
  if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      # Debian's python3 comes without venv/ensurepip: they are in python3-venv.
      (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null ||
        { echo "cannot install python3-venv" >&2; exit 1; }
    fi
    python3 -m venv "$VENV" >&2
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" >&2
  echo "$stamp" >"$VENV/.xsender-requirements"
fi
echo "$VENV/bin/python"
