#!/usr/bin/env bash
# The pure-Python wheels a lent GPU machine needs and cannot fetch (it reaches no registry), into .whl/
# (gitignored; carried with run(carry=["dist/wheels", ".whl"]), installed by scripts/gpu_check.sh):
#   - lightly 1.6.0: the peer benchmark's other arm (its wheel alone: the arms import no hydra/omegaconf);
#   - timm 1.0.31: the first timm whose LARS has a multi-tensor path; the GPU image's timm 1.0.29 loops over
#     the parameters (ResNet-50: 161 of them, about ten kernel launches each, every step).
# ffcv's self-contained wheel comes from scripts/build_ffcv_wheel.sh (dist/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
$PY -m pip download -q --no-deps --dest .whl "lightly==1.6.0" "timm==1.0.31"
ls -la .whl/*.whl
