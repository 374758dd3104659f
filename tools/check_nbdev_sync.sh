#!/usr/bin/env bash
# Fail when nbdev_export or nbdev_clean changes nbs/ or contrastive_explanations/: the package must be exported
# from the committed notebooks, and the notebooks committed clean. Usage: check_nbdev_sync.sh VENV_BIN
set -euo pipefail
bin=${1:-.venv/bin}
paths=(nbs contrastive_explanations)
snapshot() { git status --porcelain --untracked-files=all -- "${paths[@]}"; git diff -- "${paths[@]}"; }
if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "not a git checkout: cannot compare, skipping the sync check" >&2; exit 0
fi
before=$(snapshot)
"$bin/nbdev_export"
"$bin/nbdev_clean"
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "error: nbdev_export / nbdev_clean changed these files (the package or the notebooks were out of sync):" >&2
  git status --short -- "${paths[@]}" >&2
  echo "edit the notebooks (never the exported .py files), run nbdev_export and nbdev_clean, and commit both" >&2
  exit 1
fi
echo "    in sync"
