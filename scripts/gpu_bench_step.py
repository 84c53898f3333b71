"""GPU training-step benchmarks in one call; prints one JSON line per case as it finishes.

    python scripts/gpu_bench_step.py [--out benchmarks/results/step_gpu.json] [--quick]
    python scripts/gpu_bench_step.py --smoke      # the same code path on the CPU with demo configs

Runs ``fastssl-bench step`` (full optimizer steps on random views, after warm-up and
compilation) for:
- ResNet-50 SimCLR, bf16, channels_last, torch.compile (configs/imagenet/simclr_rn50.yaml);
- ViT-B/16 MAE, mask ratio 0.75 vs 0.0 in the same run (configs/imagenet/mae_vitb16.yaml);
- ViT-S/16 DINO 2x224 + 10x96, SDPA (FlashAttention) vs naive attention (configs/imagenet/dino_vits16.yaml).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    # name, config, overrides, batch, compare variants
    # In order of the goals they measure: a timeout cuts the last.
    ("simclr_rn50_bf16_compiled", "configs/imagenet/simclr_rn50.yaml", ["train.res_start=0"], 256, []),
    ("dino_vits16_bf16", "configs/imagenet/dino_vits16.yaml", [], 128, [["model.attn=naive"]]),
    ("mae_vitb16_bf16", "configs/imagenet/mae_vitb16.yaml", [], 256, [["method.mask_ratio=0.0"]]),
]
SMOKE = [
    ("simclr_demo", "configs/demo/simclr.yaml", ["aug.global_size=16"], 8, []),
    ("mae_demo", "configs/demo/mae.yaml", [], 8, [["method.mask_ratio=0.0"]]),
    ("dino_demo", "configs/demo/dino.yaml", ["aug.num_local=2"], 8, [["model.attn=naive"]]),
]


def main(argv=None) -> int:
    import torch

    from fastssl.cli.bench_step import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--smoke", action="store_true", help="CPU, demo configs, 1 step: checks the script itself")
    args = ap.parse_args(argv)
    if args.smoke:
        device, cases, steps, warmup, rounds = torch.device("cpu"), SMOKE, 1, 1, 1
    else:
        if not torch.cuda.is_available():
            print("gpu_bench_step.py needs CUDA (use --smoke on a CPU)", file=sys.stderr)
            return 2
        device, cases = torch.device("cuda"), CASES
        # Warm-up 3: compile, cuDNN autotune and the allocator settle within the first steps.
        steps, warmup, rounds = (8, 3, 2) if args.quick else (30, 5, 3)
    results = {}
    for name, cfg, ov, batch, compares in cases:
        try:
            results[name] = run(str(ROOT / cfg), ov, compares, steps, warmup, rounds, batch, device)
            if device.type == "cuda":
                results[name]["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        except Exception as e:  # one failing case must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # One JSON line per case as it finishes: a timeout keeps the cases already measured.
        print(json.dumps({"case": name, **results[name]}), flush=True)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
