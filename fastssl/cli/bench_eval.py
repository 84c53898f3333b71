"""``fastssl-bench eval RUN_DIR``: linear probe on cached features against re-extraction per epoch.

    fastssl-bench eval runs/demo-simclr --epochs 30 --json

Both arms run the same probe code (``fit_linear_probe``: the same grid, seed, hold-out
and schedule) in one process, one after the other; they differ only in where the
training features come from each epoch:

* ``cached``: what ``fastssl-eval --linear`` does: the features are loaded from
  ``RUN_DIR/features/`` (extracted once, if missing, before timing starts) and every
  probe epoch reuses them;
* ``reextract``: the backbone is run over the training split at every probe epoch
  (the DINO-style linear evaluation users complain about), through the same loader.

With centre crops both arms see identical features, so their accuracies must agree;
the JSON reports both and fails (exit 1) if they do not.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-bench eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="run directory (uses checkpoints/last.pt) or a checkpoint file")
    ap.add_argument("--epochs", type=int, default=30, help="probe epochs (fastssl-eval's default: 30)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import torch

    from fastssl import checkpoint
    from fastssl.evaluation import extract_features
    from fastssl.evaluation.offline import cached_features, eval_loaders, feature_meta, fit_linear_probe
    from fastssl.rundir import environment

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ck = checkpoint.resolve(args.path)
    try:
        cfg, method, step = checkpoint.load_for_eval(ck, device)
    except FileNotFoundError as e:
        print(f"fastssl-bench eval: {e}", file=sys.stderr)
        return 2
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
    method.eval()
    loaders = eval_loaders(cfg, device)

    def extract(split):
        return extract_features(method.embed, loaders[split], device)

    # Warm-up and cache fill (not timed): both splits extracted once.
    t0 = time.perf_counter()
    feats = {s: cached_features(run_dir, s, step, feature_meta(cfg, s, step), lambda s=s: extract(s))
             for s in ("train", "val")}
    fill_s = time.perf_counter() - t0
    (_, ty), (vx, vy) = feats["train"], feats["val"]
    num_classes = int(max(ty.max(), vy.max())) + 1

    # cached: load from disk (as a fresh fastssl-eval process would), then probe.
    t0 = time.perf_counter()
    tx, ty = cached_features(run_dir, "train", step, feature_meta(cfg, "train", step), lambda: extract("train"))
    res_cached = fit_linear_probe(tx, ty, vx, vy, num_classes, epochs=args.epochs)
    cached_s = time.perf_counter() - t0

    # reextract: the backbone runs over the training split once per probe epoch.
    extract_s = []

    def per_epoch(epoch):
        t = time.perf_counter()
        x, _ = extract("train")
        extract_s.append(time.perf_counter() - t)
        return x

    t0 = time.perf_counter()
    res_re = fit_linear_probe(per_epoch, ty, vx, vy, num_classes, epochs=args.epochs)
    re_s = time.perf_counter() - t0

    agree = abs(res_cached["linear_top1"] - res_re["linear_top1"]) < 1e-6
    out = {
        "benchmark": "eval", "run_dir": str(run_dir), "checkpoint_step": step, "device": str(device),
        "probe_epochs": args.epochs, "train_size": len(tx), "val_size": len(vx), "image_size": cfg.aug.global_size,
        "backbone": cfg.model.backbone,
        "cache_fill_seconds": fill_s,
        "cached_seconds": cached_s,
        "reextract_seconds": re_s,
        "extract_seconds_per_epoch": sum(extract_s) / len(extract_s),
        "cached_over_reextract": cached_s / re_s,
        "speedup": re_s / cached_s,
        "linear_top1_cached": res_cached["linear_top1"],
        "linear_top1_reextract": res_re["linear_top1"],
        "accuracies_agree": agree,
        "env": environment(device),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"linear probe, {args.epochs} epochs, {len(tx)} train / {len(vx)} val features ({cfg.model.backbone})")
        print(f"  cached features     {cached_s:8.2f} s   top-1 {res_cached['linear_top1']:.2f}")
        print(f"  re-extract / epoch  {re_s:8.2f} s   top-1 {res_re['linear_top1']:.2f}")
        print(f"  cached / re-extract {cached_s / re_s:8.3f}   ({re_s / cached_s:.1f}x faster)")
    if not agree:
        print("fastssl-bench eval: the two arms disagree on accuracy; the features are not deterministic", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
