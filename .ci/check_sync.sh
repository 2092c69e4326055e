#!/usr/bin/env bash
# Fails when nbdev_export, nbdev_clean or the README generator would change a tracked
# file or add an untracked one: the notebooks in nbs/ are the source of illume_ref/ and README.md.
set -euo pipefail
BIN=${1:-.venv/bin}
before=$(git status --porcelain --untracked-files=all | sort)
"$BIN/nbdev_export"
"$BIN/nbdev_clean"
"$BIN/python" .ci/nb2readme.py
after=$(git status --porcelain --untracked-files=all | sort)
if [ "$before" != "$after" ]; then
  echo "nbdev_export / nbdev_clean / nb2readme changed these files:"
  comm -13 <(echo "$before") <(echo "$after")
  git --no-pager diff --stat
  echo "The notebooks are the source: run 'make export' and commit the result."
  exit 1
fi
echo "notebooks and library in sync; notebooks clean; README current"
