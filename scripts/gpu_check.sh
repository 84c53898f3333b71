#!/usr/bin/env bash
# The GPU checks for a lent GPU machine, in one call each (the workplace's `device` tool runs this in a
# copy of the repo; results land in $OUT, default ./gpu-results: at most 8 files per part, gpu.txt and
# errors.log (install output included) beside one JSON-lines file per step). That machine has
# torch, triton, timm, accelerate and numba but no ffcv, DALI or xformers and no network: ffcv, lightly
# and a newer timm travel as wheels (run(carry=["dist/wheels", ".whl"]): scripts/build_ffcv_wheel.sh builds
# ffcv's for cp311 and cp312, about 9.4 MiB each, with four small pure-Python wheels it needs;
# scripts/gpu_wheels.sh puts lightly's and timm 1.0.31's (LARS's multi-tensor path) in .whl/).
#
#   bash scripts/gpu_check.sh               # PART=main: the main job, first (<= 9 min)
#   PART=step bash scripts/gpu_check.sh     # the second, optional call: CUDA tests, step and peer benchmarks
#   bash scripts/gpu_check.sh --dry-run     # here, on the CPU: the same steps at smoke sizes (PART=step too)
#
# PART=main, in order (each step's JSON lines to $OUT/<step>.json, stderr to $OUT/errors.log):
#   (a) install fastssl, the carried ffcv wheel and lightly's;
#   (b) write N photo-like JPEGs (ImageNet-like, 400x350 px) and time fastssl-prepare on them per core;
#   (c) fastssl-timed --estimate for imagenet/simclr_rn50 at batch 512 (the projected 100-epoch run);
#   (d) a short real fastssl-timed run through the whole flow (prepare, progressive resolution, compile,
#       kNN on the GPU, offline evaluation with the quick cached probe (the papers' 90-epoch linear
#       protocol is projected in (c)), report), through ffcv when its wheel installed, then through
#       the torch back-end (no ffcv), each within TIMED_LIMIT seconds (default 200). Before the torch
#       run, benchmarks/diagnostics/decode_hazard.py (CUDA only): whether the GPU JPEG decoder
#       overwrites memory that queued kernels still read, called directly and through decode_jpegs;
#       If the torch run stopped on a non-finite loss (or TRIAGE=1): nan_triage, the recipe to step 40,
#       eager, as is, without the caching allocator, and with synchronous launches (TRIAGE_LIMIT each);
#   (e) fastssl-bench eval: kNN and the probe at 1.28 M x 2048 features on the GPU.
# One overall deadline: each step gets min(its own limit, time left), so the call fits the device
# tool's 10 minutes; a step that runs out of time keeps the JSON lines it printed. Steps' own limits:
# ESTIMATE_LIMIT, TIMED_LIMIT, STEP_LIMIT; ONLY="a b" runs just those steps; OVERRIDES="k=v ..." adds
# config overrides to PART=main's estimate and timed runs.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
PART=${PART:-main}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-540}
T0=$(date +%s)
PY=${PY:-python3}
[ "$DRY" = 1 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
WORK=${TMPDIR:-/tmp}/fastssl-gpu-check

if [ "$DRY" = 0 ]; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/errors.log" 2>&1
  # ffcv (self-contained: its libjpeg-turbo and OpenCV inside the wheel) and its small pure-Python
  # dependencies, then lightly (the peer benchmark's other arm), all without an index.
  # pip picks the wheel of this machine's Python from dist/wheels (cp311 and cp312 are built); --no-deps
  # always: ffcv's metadata names opencv-python, and the machine's cv2 is opencv-python-headless.
  if ls dist/wheels/ffcv-*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --find-links dist/wheels \
      ffcv==1.0.2 terminaltables assertpy fastargs pytorch-pfn-extras >> "$OUT/errors.log" 2>&1 \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      >> "$OUT/errors.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
# A broken install wastes the whole lease: stop here if fastssl does not import.
if ! $PY -c "import fastssl, fastssl.train, fastssl.kernels.contrastive, torch, triton, timm; print('fastssl ok; torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"; then
  echo "fastssl does not import: see $OUT/errors.log"; tail -20 "$OUT/errors.log" 2>/dev/null; exit 2
fi
HAVE_FFCV=0
$PY -c "from fastssl.pipelines.ffcv_compat import import_ffcv; import_ffcv()" >> "$OUT/gpu.txt" 2>&1 && HAVE_FFCV=1
echo "ffcv importable: $HAVE_FFCV" | tee -a "$OUT/gpu.txt"

status=0
# ONLY="timed_torch eval_bench" runs just those steps (a short rerun).
wants() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
run() {
  local name=$1 limit=$2; shift 2
  if ! wants "$name"; then echo "== $name: not in ONLY"; return; fi
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped (budget spent)"; status=1; return; fi
  echo "== $name (limit ${limit}s, t=$(( $(date +%s) - T0 ))s): $*"
  echo "== $name" >> "$OUT/errors.log"
  timeout "$limit" "$@" >> "$OUT/$name.json" 2>> "$OUT/errors.log" || { echo "   FAILED (rc $?)"; tail -5 "$OUT/errors.log"; status=1; }
  tail -c 1500 "$OUT/$name.json"; echo
}
# A step's own result file, written outside $OUT, appended to its JSON lines: only when that step ran
# in this call (a file left by an earlier call on the same machine is not a result of this one).
keep() {
  local name=$1 file=$2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  [ -f "$file" ] && [ "$file" -nt "$T0_FILE" ] && cat "$file" >> "$OUT/$name.json"
  return 0
}
T0_FILE=$(mktemp); touch "$T0_FILE"

if [ "$PART" = main ]; then
  if [ "$DRY" = 1 ]; then
    N=${N:-400}; NVAL=${NVAL:-100}; EPOCHS=2; DEV="train.device=cpu"
    SMALL=("model.backbone=resnet_tiny" "aug.global_size=64" "train.res_start=32" "train.res_step=16"
           "optim.batch_size=64" "train.precision=fp32" "train.compile=off" "method.proj_hidden=256" "data.workers=2"
           "data.worker_start=forkserver")  # the start method a CUDA parent's torch back-end uses
    EVAL_SIZE=(--n-train 5000 --n-val 500 --dim 256 --probe-epochs 1)
  else
    # 32k training images: 62 steps per epoch at batch 512, so each resolution phase runs past its compile.
    N=${N:-32768}; NVAL=${NVAL:-2048}; EPOCHS=${EPOCHS:-2}; DEV="train.device=cuda"
    SMALL=("data.workers=14" "eval.every_epochs=1")
    EVAL_SIZE=(--n-train 1281167 --n-val 50000 --dim 2048 --probe-epochs 5)  # the probe: 5 of its 30 epochs
  fi
  # OVERRIDES="data.photometric=compiled optim.foreach=on": config overrides for the estimate and both timed runs.
  read -r -a EXTRA <<< "${OVERRIDES:-}"
  SMALL+=("${EXTRA[@]}")
  # (b) the photos, outside $OUT (which returns every file), and fastssl-prepare's rate per core.
  run prepare 120 $PY - "$WORK" "$N" "$NVAL" <<'PYEOF'
import json, os, shutil, sys, time
from pathlib import Path
from fastssl.cli.bench_loader import make_imagenet_like
root, n, n_val = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cores = os.cpu_count() or 1
t = time.perf_counter()
# Rendering a photo-like JPEG costs more than preparing it: render up to 4,096 and hard-link copies
# of them up to n (prepare still reads, decodes and writes every one of the n files).
unique = min(n, 4096)
make_imagenet_like(str(root / "src"), unique, workers=cores, beton=False)
make_imagenet_like(str(root / "src-val"), n_val, workers=cores, seed=1, beton=False)
(root / "imagenet").mkdir(parents=True, exist_ok=True)
train = root / "imagenet" / "train"
files = sorted((root / "src" / "train").rglob("*.jpg"))
for k in range(n):
    f = files[k % len(files)]
    dst = train / f.parent.name / f"{k // len(files)}_{f.name}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.link(f, dst)
val = root / "imagenet" / "val"
if not val.exists():
    val.symlink_to(root / "src-val" / "train", target_is_directory=True)
print(json.dumps({"step": "write_jpegs", "images": n + n_val, "seconds": time.perf_counter() - t}), flush=True)
from fastssl.cli.prepare import main as prepare
(root / "betons").mkdir(exist_ok=True)
for split in ("train", "val"):
    out = root / "betons" / f"{split}.beton"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    rc = prepare([str(root / "imagenet" / split), str(out), "--short-side", "256", "--max-resolution", "512",
                  "--jpeg-quality", "90", "--quiet"])
    dt = time.perf_counter() - t
    count = n if split == "train" else n_val
    print(json.dumps({"step": "prepare", "split": split, "rc": rc, "images": count, "seconds": dt, "cores": cores,
                      "images_per_second": count / dt, "images_per_second_per_core": count / dt / cores,
                      "bytes": out.stat().st_size if out.exists() else None}), flush=True)
PYEOF
  # (c) the projection of the real recipe: 100 epochs of ImageNet-1k (1,281,167 + 50,000 images), batch 512.
  run estimate "${ESTIMATE_LIMIT:-120}" $PY -m fastssl.cli.timed "$WORK/imagenet" --estimate --json --epochs 100 --data-dir "$WORK/betons" \
    --project-to 1281167,50000 --out "$WORK/runs" $DEV "${SMALL[@]}"
  # (d) the whole flow, short: through ffcv (when its wheel is here), then the torch back-end.
  # Each call's runs start fresh: a run left by an earlier call with other OVERRIDES would refuse to resume.
  # (Only those this call runs: a later call's nan_triage reads the torch run's metrics.)
  for t in ffcv torch; do wants "timed_$t" && rm -rf "$WORK/runs/timed-$t"; done
  if [ "$HAVE_FFCV" = 1 ]; then
    run timed_ffcv "${TIMED_LIMIT:-200}" $PY -m fastssl.cli.timed "$WORK/imagenet" --epochs "$EPOCHS" --data-dir "$WORK/betons" \
      --out "$WORK/runs" --name timed-ffcv --linear-protocol cached $DEV "${SMALL[@]}" data.backend=ffcv
    keep timed_ffcv "$WORK/runs/timed-ffcv/timed.json"
  fi
  # Whether a CUDA JPEG decode overwrites memory that queued kernels still read, directly and through
  # decode_jpegs (its own stream, drained first); the torch back-end decodes with it. CUDA only.
  [ "$DRY" = 0 ] && run decode_hazard 40 $PY benchmarks/diagnostics/decode_hazard.py --rounds 30
  run timed_torch "${TIMED_LIMIT:-200}" $PY -m fastssl.cli.timed "$WORK/imagenet" --epochs "$EPOCHS" --data-dir "$WORK/betons-unused" \
    --out "$WORK/runs" --name timed-torch --linear-protocol cached $DEV "${SMALL[@]}" data.backend=torch
  keep timed_torch "$WORK/runs/timed-torch/timed.json"
  # Only when the torch back-end's run stopped on a non-finite loss (or TRIAGE=1): the same
  # recipe to step 40, eager, three ways. NaN in all three: numerics or the model; gone without the
  # caching allocator or with every launch synchronous: a memory-reuse or stream race on the data path.
  TORCH_ERR="$WORK/runs/timed-torch/metrics.jsonl"
  if wants nan_triage && { [ "${TRIAGE:-0}" = 1 ] || grep -qs '"kind": "error"' "$TORCH_ERR"; }; then
    grep -s '"kind": "error"' "$TORCH_ERR" | head -2 >> "$OUT/nan_triage.json"
    for variant in as_is no_caching launch_blocking; do
      case $variant in
        as_is) E=();; no_caching) E=(PYTORCH_NO_CUDA_MEMORY_CACHING=1);; launch_blocking) E=(CUDA_LAUNCH_BLOCKING=1);;
      esac
      rm -rf "$WORK/triage/$variant"
      run nan_triage "${TRIAGE_LIMIT:-100}" env "${E[@]}" $PY -m fastssl.train \
        --config configs/imagenet/simclr_rn50.yaml "data.train=$WORK/imagenet/train" "data.val=$WORK/imagenet/val" \
        $DEV "${SMALL[@]}" data.backend=torch train.max_steps=40 train.compile=off eval.final=false \
        eval.every_epochs=0 "train.out_dir=$WORK/triage" "train.name=$variant"
      $PY - "$variant" "$WORK/triage/$variant/metrics.jsonl" >> "$OUT/nan_triage.json" <<'PYEOF'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[2])] if __import__("os").path.exists(sys.argv[2]) else []
err = next((r for r in rows if r.get("kind") == "error"), None)
steps = [r["step"] for r in rows if r.get("kind") == "train" and math.isfinite(r.get("loss", math.nan))]
print(json.dumps({"step": "nan_triage", "variant": sys.argv[1], "non_finite_at": err and err.get("step"),
                  "input_finite": err and err.get("input_finite"), "last_finite_step": max(steps, default=None)}))
PYEOF
    done
  fi
  # (e) evaluation at ImageNet scale on synthetic features.
  run eval_bench 90 $PY -m fastssl.cli.bench eval "${EVAL_SIZE[@]}" --json
else
  # PART=step: the kernel and CUDA tests, then the step and the peer benchmarks. --dry-run: the same
  # commands on the CPU at smoke sizes (the peer needs lightly importable: PYTHONPATH=DIR holding it).
  export TRITON_INTERPRET=$DRY
  if [ "$DRY" = 1 ]; then
    PDEV=cpu; PHOTO=(--batch 8 --size 32 --local-size 16 --steps 1 --warmup 0 --rounds 1)
    STEP=(--suite smoke); PEER_HW=(--device cpu --precision fp32 --compile off --workers 1 --smoke)
    B256=(--size 32 --batch 8 --steps 2 --warmup 1); B128=(--size 32 --local-size 16 --batch 8 --steps 2 --warmup 1)
    PEER_DEFAULT_ARMS=fastssl,lightly,bare-fastssl; DINO_DEFAULT_ARMS=fastssl,lightly; NPEER=40
  else
    PDEV=cuda; PHOTO=(--size 224)
    STEP=(--suite gpu --quick --cases "${STEP_CASES:-simclr_rn50_bf16_compiled,simclr_rn50_b512_photometric}")
    PEER_HW=(--device cuda --precision bf16 --compile on --workers 14)
    B256=(--size 224 --batch 256 --steps 15 --warmup 5); B128=(--size 224 --local-size 96 --batch 128 --steps 10 --warmup 4)
    PEER_DEFAULT_ARMS=lightly-tuned,fastssl,lightly,bare-fastssl; DINO_DEFAULT_ARMS=lightly-tuned,fastssl; NPEER=8000
  fi
  run pytest_cuda 150 $PY -m pytest -q -m cuda -p no:cacheprovider tests
  # The photometric stage alone, eager against compiled (fused), on the views of SimCLR and DINO.
  # Each shape and op set compiles once (DINO's views: three graphs).
  run photometric 120 $PY -m fastssl.cli.bench photometric --device $PDEV --recipe simclr --batch 256 "${PHOTO[@]}" --json
  run photometric 150 $PY -m fastssl.cli.bench photometric --device $PDEV --recipe dino --batch 128 "${PHOTO[@]}" --json
  # STEP_CASES='simclr_rn50_opt_*' STEP_LIMIT=420: each step option against the defaults, one case each (an
  # option's own graphs compile from a cold cache: about a minute apiece). Each case's JSON line is printed as
  # it finishes, so a limit that cuts the last case keeps the others.
  run step "${STEP_LIMIT:-200}" $PY -m fastssl.cli.bench step "${STEP[@]}"
  # PEER_DATA: a folder holding train/ (and train.beton for PEER_BACKEND=ffcv), e.g. PART=main's photos;
  # otherwise 8,000 photos are written here (about a minute on 16 cores).
  PEER_DATA=${PEER_DATA:-$WORK/peer}
  [ -d "$PEER_DATA/train" ] || $PY -c "import sys; from fastssl.cli.bench_loader import make_imagenet_like as m; m(sys.argv[1], int(sys.argv[2]), workers=16, beton=False)" \
    "$PEER_DATA" "$NPEER" > /dev/null 2>> "$OUT/errors.log"
  # Four arms, each in a fresh process; the headline is fastssl against lightly-tuned (lightly's documented
  # loop plus torch.compile and channels_last), so the ratio is the data path's. b256 and DINO fit one call
  # (about 5 min); ONLY=peer_simclr_b512 runs batch 512 in a second one. PEER_PHOTOMETRIC=compiled: fastssl's
  # photometric stage fused (data.photometric).
  PEER=($PY -m fastssl.cli.bench peer --data "$PEER_DATA" "${PEER_HW[@]}" --backend "${PEER_BACKEND:-torch}"
        --photometric "${PEER_PHOTOMETRIC:-auto}")
  run peer_simclr_b256 180 "${PEER[@]}" --methods simclr --arch resnet50 "${B256[@]}" \
    --rounds 1 --arms "${PEER_ARMS:-$PEER_DEFAULT_ARMS}" --out "$WORK/peer_simclr_b256_full.json"
  run peer_dino_vits16 180 "${PEER[@]}" --methods dino --arch vit_small_patch16 "${B128[@]}" --local-views 10 \
    --rounds 1 --arms "${PEER_DINO_ARMS:-$DINO_DEFAULT_ARMS}" --out "$WORK/peer_dino_vits16_full.json"
  for name in peer_simclr_b256 peer_dino_vits16; do keep $name "$WORK/${name}_full.json"; done
  [ -n "${ONLY:-}" ] && run peer_simclr_b512 150 "${PEER[@]}" --methods simclr --arch resnet50 --size 224 --batch 512 \
    --steps 10 --warmup 4 --rounds 1 --arms lightly-tuned,fastssl --out "$WORK/peer_simclr_b512_full.json"
fi
echo "total $(( $(date +%s) - T0 ))s, status $status"
exit $status
