#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. `.ci/run` runs exactly this.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" || exit 1
cd "$ROOT"
python -m pytest tests -q -p no:cacheprovider "$@"
