#!/usr/bin/env bash
# ./dev.sh serve [ARGS]  install into .venv on first use, write a starter tollway.toml if
#                        there is none, and run the gateway on the embedded default
# ./dev.sh test [ARGS]   install the dev tools, then lint, type-check and run the tests
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    [ -f tollway.toml ] || .venv/bin/tollway init
    exec .venv/bin/tollway serve "$@" ;;
  test)
    .venv/bin/ruff check .
    .venv/bin/mypy
    exec .venv/bin/pytest "$@" ;;
  *)
    echo "usage: ./dev.sh serve|test [ARGS]" >&2; exit 2 ;;
esac
