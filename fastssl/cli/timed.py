"""``fastssl-timed IMAGENET_DIR --epochs E``: the timed single-GPU ImageNet SimCLR run, one command.

1. data: with ffcv, ``fastssl-prepare`` writes train/val ``.beton`` (short side 256 px, longest side
   capped at 512, JPEG quality 90: ``fastssl-prepare --help`` says why) with a worker per core, unless
   they exist. Without ffcv (and no ``data.backend`` named) it trains from the JPEG folders with the
   torch back-end, which decodes on the GPU, and says so in one line;
2. estimate: a few warm steps per resolution of the progressive schedule (160 -> 224 px), through the
   real loader on the present device, and a timed evaluation; prints the projected wall time of each
   phase and what limits it (``fastssl.estimate``). ``--estimate`` stops here (writing a sample of the
   data first when the ``.beton`` files do not exist yet, to time ``fastssl-prepare`` too);
3. trains the packaged recipe ``imagenet/simclr_rn50`` on one GPU (bf16, channels_last, ``torch.compile``);
4. evaluates the final checkpoint offline (kNN on the features the run cached; the linear probe);
5. writes the report with the time-to-accuracy table, and ``timed.json``: the estimate beside what the run took.

``--dry-run`` runs the same steps on the CPU in a few minutes: the built-in shapes written as
ImageNet-like JPEGs (about 400x350 px), a tiny backbone at low resolution.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

RECIPE = "imagenet/simclr_rn50"  # a packaged recipe (fastssl.recipes): found from any working directory

DRY_RUN_OVERRIDES = [
    "model.backbone=resnet_tiny", "aug.global_size=64", "train.res_start=32", "train.res_step=16",
    "optim.batch_size=64", "optim.warmup_epochs=0", "train.precision=fp32", "train.compile=off", "train.device=cpu",
    "method.proj_hidden=256", "data.workers=2", "eval.every_epochs=1", "eval.val_subset=0", "train.log_every=5",
]
DRY_RUN_IMAGES = {"train": 64, "val": 10}  # per class, 10 classes

SAMPLE_IMAGES = 2048  # --estimate before the .beton exists: prepare this many images to time it


def _step(name: str, fn, argv: list[str]) -> float:
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    rc = fn(argv)
    if rc not in (0, None):
        raise SystemExit(f"fastssl-timed: step {name!r} failed with exit code {rc}")
    return time.perf_counter() - t


def _named_backend(overrides: list[str]) -> str | None:
    named = [o.split("=", 1)[1] for o in overrides if o.startswith("data.backend=")]
    return named[-1] if named else None


def _ffcv_available() -> bool:
    try:
        from fastssl.pipelines.ffcv_compat import import_ffcv

        import_ffcv()
        return True
    except ImportError:
        return False


def _sample_folder(src: Path, dst: Path, n: int, seed: int = 0) -> int:
    """Copy ``n`` images of the ImageFolder ``src`` (spread over its classes) to ``dst``; returns its image count."""
    from fastssl.pipelines.prepare import list_images

    items, classes, _ = list_images(src)
    if dst.is_dir():
        shutil.rmtree(dst)
    for path, label in random.Random(seed).sample(items, min(n, len(items))):
        folder = dst / (classes[label] if classes else "_")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / Path(path).name)
    return len(items)


def _release_estimate() -> None:
    """Training runs in this process next: free what the estimate held (accelerate's wrapped forward keeps
    its model in a reference cycle) and restart the device's peak, so that the run's memory figures are its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-timed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("imagenet", nargs="?", help="ImageNet root with train/ and val/ ImageFolders (not needed with --dry-run)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default="runs", help="runs directory")
    ap.add_argument("--data-dir", default="data/imagenet", help="where the .beton files go")
    ap.add_argument("--name", default=None)
    ap.add_argument("--estimate", action="store_true", help="print the projected wall time of the run and stop")
    ap.add_argument("--linear-protocol", choices=("simclr", "cached"), default=None,
                    help="the offline linear evaluation: simclr (the papers' protocol: 90 epochs of crops and flips "
                         "on the frozen backbone, hours on ImageNet; the default, so the figure compares with "
                         "published ones) or cached (a quick probe on cached features; the --dry-run default)")
    ap.add_argument("--project-to", default=None, metavar="TRAIN,VAL",
                    help="with --estimate: project to this many train,val images (e.g. 1281167,50000 for "
                         "ImageNet-1k) instead of the given data's counts")
    ap.add_argument("--json", action="store_true", help="with --estimate: also print the estimate as JSON")
    ap.add_argument("--dry-run", action="store_true", help="CPU-sized end-to-end run on the built-in data")
    ap.add_argument("overrides", nargs="*", default=[], help="extra config overrides key.sub=value")
    args = ap.parse_intermixed_args(argv)  # overrides may follow the options

    from fastssl.cli.eval import main as eval_main
    from fastssl.cli.prepare import main as prepare_main
    from fastssl.cli.report import main as report_main
    from fastssl.config import ConfigError, load_config
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
        for split, n in DRY_RUN_IMAGES.items():
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

    backend = _named_backend(overrides) or "auto"
    use_beton = backend == "ffcv" or (backend == "auto" and _ffcv_available())
    if backend == "auto" and not use_beton:
        print("fastssl-timed: ffcv is not installed: training from the JPEG folders with the torch back-end "
              "(decoded on the GPU where there is one); `pip install 'fastssl[ffcv]'` or scripts/build_ffcv_wheel.sh "
              "for the .beton path", file=sys.stderr, flush=True)
        overrides.append("data.backend=torch")
    paths = {split: (data / f"{split}.beton") if use_beton else (src / split) for split in ("train", "val")}
    name = args.name or ("timed-dry-run" if args.dry_run else f"timed-simclr-rn50-{epochs}ep")
    run_dir = Path(args.out) / name
    train_args = ["--config", str(recipe), f"data.train={paths['train']}", f"data.val={paths['val']}",
                  f"train.epochs={epochs}", f"train.out_dir={args.out}", f"train.name={name}",
                  "train.resume=auto"] + overrides
    try:
        cfg = load_config(train_args[1], train_args[2:])  # a bad key fails here, before any data is written
    except ConfigError as e:
        raise SystemExit(f"fastssl-timed: config error: {e}") from None

    prepare_flags = ["--short-side", "256", "--max-resolution", "512", "--jpeg-quality", "90"]
    missing = [s for s in ("train", "val") if use_beton and not paths[s].exists()]
    sizes: dict[str, int] = {}
    if args.estimate and missing:
        # Time fastssl-prepare on a sample, and time training on the sample's .beton; project to the full set.
        sample_src, sample_out = data / "estimate-sample", data / "estimate-sample.beton"
        for split in ("train", "val"):
            sizes[split] = _sample_folder(src / split, sample_src / split, SAMPLE_IMAGES if split == "train" else 512)
        t_prep = 0.0
        for split in ("train", "val"):
            out = sample_out.with_name(f"estimate-sample-{split}.beton")
            out.unlink(missing_ok=True)
            t_prep += _step(f"prepare a sample ({split})", prepare_main,
                            [str(sample_src / split), str(out), *prepare_flags, "--quiet"])
        n_sample = sum(min(sizes[s], SAMPLE_IMAGES if s == "train" else 512) for s in sizes)
        prepare_s = t_prep / max(n_sample, 1) * (sizes["train"] + sizes["val"])
        cfg.data.train, cfg.data.val = (str(sample_out.with_name(f"estimate-sample-{s}.beton")) for s in ("train", "val"))
    else:
        for split in missing:
            times[f"prepare_{split}"] = _step(f"prepare {split}", prepare_main, [str(src / split), str(paths[split]),
                                                                                 *prepare_flags])
        prepare_s = sum(times.values())

    from fastssl.estimate import estimate

    if args.project_to:
        try:
            sizes["train"], sizes["val"] = (int(x) for x in args.project_to.split(","))
        except ValueError:
            ap.error(f"--project-to {args.project_to!r}: give two counts, TRAIN,VAL (e.g. 1281167,50000)")

    print(f"\n=== estimate: {RECIPE}, {epochs} epochs", flush=True)
    t = time.perf_counter()
    protocol = args.linear_protocol or ("cached" if args.dry_run else "simclr")
    est = estimate(cfg, prepare_s=prepare_s, n_train=sizes.get("train"), n_val=sizes.get("val"),
                   linear_epochs=90 if protocol == "simclr" else 0)
    times["estimate"] = time.perf_counter() - t
    print("\n".join(est.lines()), flush=True)
    record = {"recipe": RECIPE, "epochs": epochs, "estimate": est.to_dict(), "backend": "ffcv" if use_beton else "torch"}
    if args.estimate:
        if not args.dry_run:
            print(f"(measured in {times['estimate']:.0f} s; prepare projected from {SAMPLE_IMAGES} images)"
                  if missing else f"(measured in {times['estimate']:.0f} s)")
        if args.json:
            print(json.dumps(record, indent=1))
        return 0

    _release_estimate()
    times["train"] = _step("train", train_main, train_args)
    summary = json.loads((run_dir / "summary.json").read_text())
    eval_args = [str(run_dir), "--knn", "--linear", "--linear-protocol", protocol]
    times["eval"] = _step("evaluate", eval_main, eval_args)
    times["report"] = _step("report", report_main, [str(run_dir), "--out", str(run_dir / "report")])
    actual_train = summary.get("train_seconds", summary.get("wall_seconds"))
    record["linear_protocol"] = protocol
    record["actual"] = {"prepare_s": prepare_s, "train_s": actual_train,
                        "eval_in_training_s": summary.get("eval_seconds"),
                        "final_eval_s": summary.get("final_eval_seconds"), "offline_eval_s": times["eval"],
                        "images_per_second": summary.get("images_per_second")}
    record["estimate_over_actual_train"] = est.train_s / max(actual_train or 0.0, 1e-9)
    (run_dir / "timed.json").write_text(json.dumps(record, indent=2))
    print("\nstep times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print(f"training: {actual_train:.1f} s measured, {est.train_s:.1f} s estimated "
          f"({record['estimate_over_actual_train']:.2f}x); in-training evaluations {summary.get('eval_fraction', 0):.1%} "
          f"of training")
    print(f"report: {run_dir / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
