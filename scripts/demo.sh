#!/usr/bin/env bash
# The main job on the built-in data: set up (idempotent), write the synthetic
# dataset, pretrain SimCLR on the CPU (or GPU if present), print the summary,
# write the report. Extra arguments are config overrides (key.sub=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin
time "$PY/fastssl-prepare" synthetic data/demo --classes 10 --per-class 200 --val-per-class 50 --size 64 --seed 0
time "$PY/fastssl-train" --config configs/demo/simclr.yaml "$@"
"$PY/fastssl-report" runs/demo-simclr --out runs/demo-simclr/report
echo "report: runs/demo-simclr/report/report.md"
