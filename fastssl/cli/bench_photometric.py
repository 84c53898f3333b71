"""``fastssl-bench photometric``: the photometric stage alone, per implementation, side by side.

The stage turns a batch's uint8 crops into normalised views (``pipelines/augment.py``). On a GPU
it runs on the loader's side stream beside the step, so its cost is not only its own time but
the memory bandwidth it takes from the step; this benchmark times it alone, each implementation
on the same crops and parameters, interleaved over rounds:

- ``torch``: the eager batched float ops (``apply_view``; in place, bounded memory);
- ``compiled``: the same operations as one graph through ``torch.compile`` (``photometric_fused``);
- ``cv2``: OpenCV on uint8 in a thread pool (the CPU path; CPU only).

Reported per implementation: ms per batch (all views), images/s, the ratio to ``torch``, the
peak memory the stage adds (CUDA), and the largest difference from ``torch``'s views (the
implementations compute the same function; ``cv2`` rounds to uint8 between operations, so
its difference is larger by design). Each implementation's first call (compilation, for
``compiled``) is reported apart as ``first_call_seconds`` and never timed.

    fastssl-bench photometric --device cuda --recipe simclr --batch 256 --size 224 --json
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from fastssl.benchmarking import Timer, write_json


def _crops(views, batch: int, device, seed: int = 0) -> list[torch.Tensor]:
    """Smooth photo-like uint8 crops (B, S, S, 3) per view: random low-resolution colour fields, upsampled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in views:
        low = torch.rand(batch, 3, max(2, v.size // 16), max(2, v.size // 16), generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(v.size, v.size), mode="bilinear", align_corners=False)
        out.append(img.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().to(device))
    return out


def run(recipe: str, batch: int, size: int, local_size: int, device, impls: list[str], steps: int, warmup: int,
        rounds: int, dtype: str = "auto") -> dict:
    from fastssl.pipelines.augment import Augmenter
    from fastssl.pipelines.recipes import AugConfig

    device = torch.device(device)
    views = AugConfig(recipe=recipe, global_size=size, local_size=local_size).resolved_views()
    crops = _crops(views, batch, device)
    dt = None if dtype == "auto" else getattr(torch, dtype)
    augs = {impl: Augmenter(views, device, seed=0, impl=impl, dtype=dt) for impl in impls}
    ref = augs["torch"](crops, 0) if "torch" in augs else None
    rows: dict[str, dict] = {}
    for impl, aug in augs.items():
        t = Timer(device)
        with t:
            got = aug(crops, 0)  # compilation (compiled), OpenCV's pool start (cv2)
        diff = None
        if ref is not None:
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
        rows[impl] = {"impl": impl, "first_call_seconds": t.seconds(), "max_abs_diff_vs_torch": diff, "round_ms": []}
        for _ in range(warmup):
            aug(crops, 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for r in range(rounds):
        for impl, aug in augs.items():
            base = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t = Timer(device)
            with t:
                for s in range(steps):
                    aug(crops, 2 + s)
            rows[impl]["round_ms"].append(1e3 * t.seconds() / steps)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                rows[impl]["peak_gb"] = max(rows[impl].get("peak_gb", 0.0), peak)
    for row in rows.values():
        row["ms_per_batch"] = statistics.median(row["round_ms"])
        row["images_per_second"] = batch / (row["ms_per_batch"] / 1e3)
    if "torch" in rows:
        for row in rows.values():
            row["speedup_vs_torch"] = rows["torch"]["ms_per_batch"] / row["ms_per_batch"]
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return {"benchmark": "photometric", "recipe": recipe, "batch": batch, "views": [v.size for v in views],
            "dtype": str(next(iter(augs.values())).dtype).replace("torch.", ""), "steps": steps, "warmup": warmup,
            "rounds": rounds, "env": env, "rows": list(rows.values()),
            "protocol": "the stage alone on fixed uint8 crops, fresh parameters per call (keyed by the step); "
                        "median over interleaved rounds after warm-up; CUDA events on a GPU"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-bench photometric", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="simclr", help="the views' preset (simclr, byol, dino, ...)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="global views' side")
    ap.add_argument("--local-size", type=int, default=96, help="local views' side (multi-crop presets)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", default=None, help="comma list of torch, compiled, cv2 (default: torch,compiled, "
                                                   "and cv2 on the CPU)")
    ap.add_argument("--dtype", default="auto", help="views' dtype: auto (bf16 on CUDA, fp32 on the CPU), float32, bfloat16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    from fastssl.pipelines.augment import IMPLS

    device = torch.device(args.device)
    impls = (args.impls.split(",") if args.impls else
             ["torch", "compiled"] + (["cv2"] if device.type == "cpu" else []))
    bad = [i for i in impls if i not in IMPLS or i == "auto"]
    if bad:
        print(f"fastssl-bench photometric: unknown --impls {','.join(bad)}: choose from torch, compiled, cv2",
              file=sys.stderr)
        return 2
    res = run(args.recipe, args.batch, args.size, args.local_size, device, impls, args.steps, args.warmup,
              args.rounds, args.dtype)
    text = write_json(res, args.out)
    if args.json:
        print(text)
    else:
        print(f"photometric stage, {args.recipe} views {res['views']}, batch {args.batch}, {res['env']['device']}:")
        for r in res["rows"]:
            ratio = f"  {r['speedup_vs_torch']:.2f}x torch" if "speedup_vs_torch" in r else ""
            print(f"  {r['impl']:<9} {r['ms_per_batch']:8.2f} ms/batch  {r['images_per_second']:9.1f} images/s{ratio}"
                  f"  (first call {r['first_call_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
