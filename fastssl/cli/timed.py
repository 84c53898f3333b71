"""``fastssl-timed IMAGENET_DIR --epochs E``: the timed single-GPU ImageNet SimCLR run, one command.

1. ``fastssl-prepare`` writes train/val ``.beton`` (short side <= 256 px, JPEG
   quality 90: the FFCV-SSL setting that keeps decoding cheap; the estimated
   size is printed before writing) unless they exist;
2. trains the packaged recipe ``imagenet/simclr_rn50`` (``configs/imagenet/simclr_rn50.yaml``
   in the source tree, shipped inside the package) on one GPU (bf16,
   channels_last, ``torch.compile``, progressive resolution 160 -> 224);
3. evaluates the final checkpoint offline (kNN and linear probe);
4. writes the report with the time-to-accuracy table.

``--dry-run`` runs the same steps on the CPU in a few minutes: the built-in
shapes written as ImageNet-like JPEGs (about 400x350 px), a tiny backbone at
low resolution. It is a test (tests/test_timed.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RECIPE = "imagenet/simclr_rn50"  # a packaged recipe (fastssl.recipes): found from any working directory

DRY_RUN_OVERRIDES = [
    "model.backbone=resnet_tiny", "aug.global_size=64", "train.res_start=32", "train.res_step=16",
    "optim.batch_size=64", "optim.warmup_epochs=0", "train.precision=fp32", "train.compile=off", "train.device=cpu",
    "method.proj_hidden=256", "data.workers=2", "eval.every_epochs=1", "eval.val_subset=0", "train.log_every=5",
]


def _step(name: str, fn, argv: list[str]) -> float:
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    rc = fn(argv)
    if rc not in (0, None):
        raise SystemExit(f"fastssl-timed: step {name!r} failed with exit code {rc}")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-timed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("imagenet", nargs="?", help="ImageNet root with train/ and val/ ImageFolders (not needed with --dry-run)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default="runs", help="runs directory")
    ap.add_argument("--data-dir", default="data/imagenet", help="where the .beton files go")
    ap.add_argument("--name", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU-sized end-to-end run on the built-in data")
    ap.add_argument("overrides", nargs="*", default=[], help="extra config overrides key.sub=value")
    args = ap.parse_args(argv)

    from fastssl.cli.eval import main as eval_main
    from fastssl.cli.prepare import main as prepare_main
    from fastssl.cli.report import main as report_main
    from fastssl.recipes import RecipeNotFound, resolve_recipe
    from fastssl.train import main as train_main

    try:  # before any data is written
        recipe = resolve_recipe(RECIPE)
    except RecipeNotFound as e:
        raise SystemExit(f"fastssl-timed: {e}") from None

    times: dict[str, float] = {}
    data = Path(args.data_dir)
    overrides = list(args.overrides)
    if args.dry_run:
        from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

        src = data / "jpeg"
        for split, n in (("train", 40), ("val", 10)):
            if not (src / split).is_dir():
                write_jpeg_folder(SyntheticImages(10, n, (350, 400), seed=0, split=split), src / split, quality=90)
        overrides = DRY_RUN_OVERRIDES + overrides
        epochs = min(args.epochs, 2)
    else:
        if not args.imagenet:
            ap.error("give the ImageNet root (with train/ and val/), or --dry-run")
        src = Path(args.imagenet)
        for split in ("train", "val"):
            if not (src / split).is_dir():
                raise SystemExit(f"fastssl-timed: {src / split} is not a folder; expected ImageNet's train/ and val/ ImageFolders")
        epochs = args.epochs
    for split in ("train", "val"):
        beton = data / f"{split}.beton"
        if not beton.exists():
            times[f"prepare_{split}"] = _step(f"prepare {split}", prepare_main, [
                str(src / split), str(beton), "--max-resolution", "256", "--jpeg-quality", "90"])
    name = args.name or ("timed-dry-run" if args.dry_run else f"timed-simclr-rn50-{epochs}ep")
    run_dir = Path(args.out) / name
    train_args = ["--config", str(recipe), f"data.train={data / 'train.beton'}",
                  f"data.val={data / 'val.beton'}", f"train.epochs={epochs}", f"train.out_dir={args.out}",
                  f"train.name={name}", "train.resume=auto"] + overrides
    times["train"] = _step("train", train_main, train_args)
    times["eval"] = _step("evaluate", eval_main, [str(run_dir), "--knn", "--linear"])
    times["report"] = _step("report", report_main, [str(run_dir), "--out", str(run_dir / "report")])
    print("\nstep times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print(f"report: {run_dir / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
