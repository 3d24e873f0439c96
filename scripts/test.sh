#!/usr/bin/env bash
# Install (if needed) and run the test suite. `.ci/run` runs exactly this: every test but those marked `slow`
# (wide matrices: every ZeRO stage x recipe, ...). `bash scripts/test.sh --slow` runs them all.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" || exit 1
cd "$ROOT"
if [ "${1:-}" = "--slow" ]; then
  shift
  python -m pytest tests -q -p no:cacheprovider "$@"
else
  python -m pytest tests -q -p no:cacheprovider -m "not slow" "$@"
fi
