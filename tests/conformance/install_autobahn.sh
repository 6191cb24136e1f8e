#!/usr/bin/env bash
# Install Autobahn|Testsuite's `wstest` (Python 2.7 code) into a virtualenv outside the repo.
# Needs a Python 2.7 interpreter (pyenv's ~/.pyenv/versions/2.7.*, or python2.7 on PATH).
# Usage: tests/conformance/install_autobahn.sh [VENV_DIR]   (default ~/.cache/herald/autobahn)
set -euo pipefail
venv="${1:-${HERALD_AUTOBAHN_VENV:-$HOME/.cache/herald/autobahn}}"
if [ -x "$venv/bin/wstest" ]; then echo "$venv/bin/wstest"; exit 0; fi
py2=""
for candidate in "$HOME"/.pyenv/versions/2.7.*/bin/python "$(command -v python2.7 || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then py2="$candidate"; break; fi
done
if [ -z "$py2" ]; then echo "no Python 2.7 interpreter found: Autobahn tests will be skipped" >&2; exit 1; fi
"$py2" -m pip install -q --user 'virtualenv<20.22' >/dev/null 2>&1 || true
"$py2" -m virtualenv -q "$venv" >/dev/null
"$venv/bin/pip" install -q autobahntestsuite==25.10.1 setuptools==44.0.0 txaio==2.1.0 incremental==16.10.1 \
  pyOpenSSL==19.1.0 cryptography==3.3.2 Twisted==19.10.0 zope.interface==4.6.0 jinja2==2.11.3 \
  markupsafe==1.1.1 Werkzeug==1.0.1 klein==17.10.0 service_identity==18.1.0 unittest2==1.1.0 \
  six==1.16.0 'autobahn[accelerate,twisted]==0.10.9' >/dev/null 2>&1
echo "$venv/bin/wstest"
