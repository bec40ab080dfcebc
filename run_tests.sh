#!/usr/bin/env bash
# Run the test suite: the same environment setup as run_all.sh, then pytest.
#
#   bash run_tests.sh [pytest arguments, e.g. -m "not slow" or tests/test_harness.py]
#
# The slow end-to-end test runs bash run_all.sh --profile smoke, which builds the
# offline corpus itself when absent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$ROOT/scripts/setup_env.sh"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

metasae_setup || exit 1
cd "$ROOT"
exec "$METASAE_PY" -m pytest "$@"
