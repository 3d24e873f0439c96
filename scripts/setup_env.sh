#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with the pinned, CPU-safe dependency set.
# Idempotent: a stamp keyed by pyproject.toml skips the install when nothing changed.
# Usage: source scripts/setup_env.sh   (activates .venv; sets HF_HUB_OFFLINE and the DeepSpeed op cache)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
STAMP="$ROOT/.venv/.vlmtune-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "setup: installing dependencies into $ROOT/.venv (first time: about a minute)" >&2
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on a CPU machine
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  DS_BUILD_OPS=0 python -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  python -c "import vlmtune, torch, deepspeed, transformers, peft" 2>/dev/null || { echo "setup: install failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
# the serve page's browser test drives Debian's chromium through playwright's driver (no browser download)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium (apt-get) for tests/serve" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; } \
    || echo "setup: chromium not installed; the serve page's browser test will be skipped" >&2
fi
export HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
set +euo pipefail
