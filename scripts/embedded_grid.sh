#!/usr/bin/env bash
# Table 1 on the embedded benchmark, second edition, one command: SmolLM2-135M on arith (2300 held-out
# questions), rows baseline, sft, dpo, tokendpo, rpo, simpo, ipo, cdpo (the paper's sequence form) and
# cdpo_per_position (the authors' code's form) x seeds 0, 1, 2 (a Hydra multirun, conf/sweep/embedded.yaml),
# then the report against each cDPO form (Markdown + CSV table with significance tests, Figure-6 plot).
#
#   scripts/embedded_grid.sh                    # the whole grid (see README, "Sizing the test split", for its cost)
#   scripts/embedded_grid.sh seed=0,1           # extra arguments go to train.py
#   RUN_DIR=runs/x OUT=reports/x scripts/embedded_grid.sh model=tiny ...
#   ARCHIVE=docs/results/embedded-grid scripts/embedded_grid.sh   # also keep the results with the repository
#                                   (python -m cdpo.report.archive, every ARCHIVE_EVERY=600 s while the grid
#                                   runs and at its end; report.py runs=[docs/results/embedded-grid])
#
# Each seed is a replicate with its own samples, CE models and scores (RUN_DIR/samples<seed>), made by the
# first job of that seed that needs them and shared by its other rows; rerunning skips every finished
# stage, so an interrupted grid continues where it stopped.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-runs/smollm2_135m-arith-table1}"
OUT="${OUT:-reports/embedded}"
START=$SECONDS

KEEPER=
stop_keeper() { if [ -n "$KEEPER" ]; then kill "$KEEPER" 2>/dev/null || true; wait "$KEEPER" 2>/dev/null || true; KEEPER=; fi; }
if [ -n "${ARCHIVE:-}" ]; then  # finished rows reach the archive while the grid runs (every ARCHIVE_EVERY s)
  (
    trap 'kill ${NAP:-} 2>/dev/null; exit 0' TERM   # stopped between passes, or once its pass has ended
    while true; do
      sleep "${ARCHIVE_EVERY:-600}" & NAP=$!; wait $NAP
      "$PYTHON" -m cdpo.report.archive "$RUN_DIR" "$ARCHIVE" || true
    done
  ) &
  KEEPER=$!
  trap stop_keeper EXIT
fi
# one run_dir per sample set under RUN_DIR (conf/sweep/embedded.yaml); the archive and reports read them all
"$PYTHON" "$REPO/train.py" -m +sweep=embedded run_dir="$RUN_DIR"'/samples${sample.seed}' "$@"
stop_keeper
if [ -n "${ARCHIVE:-}" ]; then "$PYTHON" -m cdpo.report.archive "$RUN_DIR" "$ARCHIVE"; fi
EXPECT='expect.rows=${cdpo_grid:embedded}'   # the report names the rows still missing (seeds: those some row has)
"$PYTHON" "$REPO/report.py" "runs=[$RUN_DIR]" out="$OUT" reference=cdpo "$EXPECT"
"$PYTHON" "$REPO/report.py" "runs=[$RUN_DIR]" out="$OUT-per_position" reference=cdpo_per_position "$EXPECT"
echo "grid wall time: $((SECONDS - START)) s (train.py -m and both reports)"
