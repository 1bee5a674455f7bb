#!/usr/bin/env bash
# Table 1 on the embedded benchmark, one command: SmolLM2-135M on arith, methods baseline, sft, dpo,
# tokendpo, rpo, simpo, ipo, cdpo x seeds 0, 1, 2 (a Hydra multirun, conf/sweep/embedded.yaml), then the report
# (Markdown + CSV table with significance tests, Figure-6 plot).
#
#   scripts/embedded_grid.sh                    # 45 min on a 2-core CPU with AVX512-BF16 after python train.py (README)
#   scripts/embedded_grid.sh seed=0,1           # extra arguments go to train.py
#   RUN_DIR=runs/x OUT=reports/x scripts/embedded_grid.sh model=tiny ...
#
# Samples, CE models and scores are made by the first job that needs them and shared by the rest;
# rerunning skips every finished stage, so an interrupted grid continues where it stopped.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-runs/smollm2_135m-arith}"
OUT="${OUT:-reports/embedded}"

"$PYTHON" "$REPO/train.py" -m +sweep=embedded run_dir="$RUN_DIR" "$@"
"$PYTHON" "$REPO/report.py" "runs=[$RUN_DIR]" out="$OUT"
