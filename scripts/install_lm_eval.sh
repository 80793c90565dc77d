#!/usr/bin/env bash
# EleutherAI's lm-evaluation-harness for `eval.harness=[...]` (the `eval` extra of pyproject.toml),
# without moving any pinned package. Idempotent: a second run only checks the version (about a second).
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(grep -o 'lm-eval\[ifeval\]==[0-9.]*' pyproject.toml | head -1 | sed 's/.*==//')
have=$(python -c "import importlib.metadata as m; print(m.version('lm_eval'))" 2>/dev/null || true)
if [ "$have" = "$want" ] && python -c "import langdetect, immutabledict" 2>/dev/null; then
  echo "lm-eval $have already installed"
  exit 0
fi
python -m pip install -q "lm-eval[ifeval]==$want"
python -m pip check
