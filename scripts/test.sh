#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the lint and type gate, check the migrations match the models, and run
# the whole test suite.
# The tests start their own Redis, PostgreSQL and model servers (the SGLang stand-in, vLLM's CPU build);
# PostgreSQL's binaries and Chromium (for the browser tests) come from the OS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! python -c "import pgserver" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  else
    python -m pip install -q pgserver
  fi
fi
# The report and tree-view tests drive Debian's chromium through Playwright (no browser download).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: /usr/bin/chromium is missing; install Debian's chromium (apt-get install chromium)" >&2
    exit 1
  fi
fi
# The vLLM CPU server the OpenAI-backend tests start lives in its own environment (~2 min to create once).
bash scripts/vllm_env.sh >/dev/null
# The gate: lint, formatting, types and the import layers (pyproject.toml configures all four).
ruff check .
ruff format --check .
mypy etsq cli workers
lint-imports  # the layers contract (pyproject.toml [tool.importlinter])
export ETSQ_DATA_DIR=${ETSQ_DATA_DIR:-$(cd .. && pwd)/shared/data}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ETSQ_DATABASE_URL="sqlite:///$tmp/check.db" alembic upgrade head >/dev/null
ETSQ_DATABASE_URL="sqlite:///$tmp/check.db" alembic check
python -m pytest "$@"
