#!/usr/bin/env bash
# Retrain against the shared stack: pull what the DVC remote has, rerun what changed, push the
# results, and report the metrics against main. CI (.github/workflows/retrain.yml) runs this
# same script; locally:  eval "$(deploy/stack.sh env)" && deploy/stack.sh dvc-remote && deploy/retrain.sh
#
# Env: BASE_REF (default main) is the ref the metrics are compared with; METRICS_DIFF_FILE, when
# set, also receives the diff as markdown (CI posts it); DVC_JOBS sets parallel transfers. The DVC remote (and its keys) must already be configured, e.g. in .dvc/config.local.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_REF="${BASE_REF:-main}"
jobs=()
if [ -n "${DVC_JOBS:-}" ]; then jobs=(--jobs "$DVC_JOBS"); fi

# Missing outputs are fine (first run, or a new stage): dvc repro rebuilds them.
echo "== dvc pull"
dvc pull "${jobs[@]}" || echo "dvc pull incomplete: dvc repro rebuilds what is missing"

echo "== python src/repro.py (dvc repro, independent stages side by side)"
python src/repro.py

echo "== dvc push"
dvc push "${jobs[@]}"

echo "== dvc metrics diff $BASE_REF"
out="${METRICS_DIFF_FILE:-/dev/null}"
if git rev-parse --verify --quiet "$BASE_REF^{commit}" >/dev/null; then
    { echo "### dvc metrics diff $BASE_REF"; dvc metrics diff "$BASE_REF" --md; } | tee "$out"
else
    echo "no ref $BASE_REF to compare with" | tee "$out"
fi
