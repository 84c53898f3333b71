"""``fastssl-bench loader``: images/s of ready views per back-end and stage, side by side in one run.

    fastssl-bench loader --make-imagenet-like data/bench [--n 2000]
    fastssl-bench loader --backend all --data data/bench --recipe simclr --batch-size 64 --workers 2 --json

``--data`` is a folder holding ``train/`` (JPEG ImageFolder) and ``train.beton``
(what ``--make-imagenet-like`` writes), or a .beton / folder itself.
Stages: ``loader`` = every view cropped, uint8 on the device, ready for the
photometric stage; ``full`` = after the photometric stage (normalised float
views).

``lightly`` is the peer: lightly's own ``SimCLRTransform`` / ``DINOTransform`` /
``BYOLTransform`` / ``MAETransform`` (PIL decode, per-image PIL ops, PIL's Gaussian
blur) on a ``LightlyDataset`` of the image folder in a torch DataLoader, as lightly's
examples run it (its default collate and prefetch); always ``full``. ``x_lightly`` is
each row's images/s over lightly's for the same recipe.

``baseline`` is not a library's pipeline: a naive per-image torchvision pipeline of
our own (PIL decode and crop, ColorJitter with the recipe's p, grayscale p=0.2,
torchvision's ``GaussianBlur(23, (0.1, 2))``, which convolves a tensor with the full
23x23 kernel and costs ~45 ms per 224 px view, then ToTensor + Normalize, in
DataLoader workers; the recipe's first two views only); always ``full``. Kept for
continuity with earlier figures; it is about 3x slower than lightly on the same
photos, so ``x_baseline`` overstates the gain over what users run.

``--jitter lightly`` (the default) gives every arm the peer's colour-jitter strengths
for the recipe (SimCLR: (0.8, 0.8, 0.8, 0.2), SimCLR's s=1; BYOL and DINO: (0.4, 0.4,
0.2, 0.1), equal to our presets; MAE: none); ``--jitter recipe`` keeps our presets'.
Measured after one warm-up pass (compilation, worker start); CPU use = process +
reaped children CPU time / wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def make_imagenet_like(out_dir: str, n: int = 2000, workers: int = 2, seed: int = 0) -> dict:
    """``n`` JPEGs of 400x350 px at quality 90 (ImageFolder ``out/train``) and the same as ``out/train.beton``."""
    from fastssl.pipelines.prepare import WriteSettings, prepare_folder
    from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

    out = Path(out_dir)
    folder = out / "train"
    stamp = out / ".imagenet-like.json"
    want = {"n": n, "seed": seed, "size": [350, 400], "quality": 90}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        ds = SyntheticImages(num_classes=10, per_class=max(1, n // 10), size=(350, 400), seed=seed, split="train")
        write_jpeg_folder(ds, folder, quality=90)
        stamp.write_text(json.dumps(want))
    summary = prepare_folder(folder, out / "train.beton", WriteSettings(jpeg_quality=90, workers=workers), quiet=True)
    return {"folder": str(folder), "beton": str(out / "train.beton"), "images": summary["written"],
            "beton_bytes": summary["bytes"]}


class _BaselineViews:
    """The per-image two-view torchvision transform (one decode per view, as lightly/solo-learn do it)."""

    def __init__(self, views):
        from torchvision import transforms as T

        self.ts = []
        for v in views:
            blur_k = 23 if v.size >= 160 else max(3, (v.size // 10) | 1)
            self.ts.append(T.Compose([
                T.RandomResizedCrop(v.size, scale=(v.scale_min, v.scale_max), ratio=(v.ratio_min, v.ratio_max)),
                T.RandomHorizontalFlip(v.flip_p),
                T.RandomApply([T.ColorJitter(v.brightness, v.contrast, v.saturation, v.hue)], p=v.jitter_p),
                T.RandomGrayscale(v.gray_p),
                T.RandomApply([T.GaussianBlur(blur_k, (v.blur_sigma_min, v.blur_sigma_max))], p=v.blur_p),
                T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))

    def __call__(self, img):
        return [t(img) for t in self.ts]


# lightly 1.6's defaults per recipe: (brightness, contrast, saturation, hue) = cj_strength x (cj_bright, ...).
LIGHTLY_JITTER = {"simclr": (0.8, 0.8, 0.8, 0.2),     # SimCLRTransform: strength 1.0 x (0.8, 0.8, 0.8, 0.2)
                  "byol": (0.4, 0.4, 0.2, 0.1),       # BYOLView{1,2}Transform: 1.0 x (0.4, 0.4, 0.2, 0.1)
                  "dino": (0.4, 0.4, 0.2, 0.1)}       # DINOTransform: 0.5 x (0.8, 0.8, 0.4, 0.2)


def peer_jitter(recipe: str, views) -> list:
    """``views`` with lightly's colour-jitter strengths for ``recipe`` (unchanged for a recipe without jitter)."""
    import copy

    views = copy.deepcopy(list(views))
    if recipe in LIGHTLY_JITTER:
        for v in views:
            v.brightness, v.contrast, v.saturation, v.hue = LIGHTLY_JITTER[recipe]
    return views


def lightly_transform(recipe: str, size: int, local_size: int):
    """lightly's own multi-view transform for ``recipe`` at our sizes, otherwise its defaults."""
    from lightly import transforms as LT

    if recipe == "simclr":
        return LT.SimCLRTransform(input_size=size)
    if recipe == "dino":
        return LT.DINOTransform(global_crop_size=size, local_crop_size=local_size)
    if recipe == "byol":
        return LT.BYOLTransform(view_1_transform=LT.BYOLView1Transform(input_size=size),
                                view_2_transform=LT.BYOLView2Transform(input_size=size))
    if recipe == "mae":
        return LT.MAETransform(input_size=size)
    raise ValueError(f"no lightly transform for recipe {recipe!r}")


def lightly_loader(folder: str, recipe: str, size: int, local_size: int, batch_size: int, workers: int):
    """The peer's data path as its examples write it: ``LightlyDataset(folder, transform)`` in a DataLoader.

    Batches are ``[views, labels, filenames]`` (the default collate of the examples since lightly 1.5).
    """
    import torch
    from lightly.data import LightlyDataset

    ds = LightlyDataset(folder, transform=lightly_transform(recipe, size, local_size))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)


def _baseline_loader(folder: str, views, batch_size: int, workers: int):
    import torch
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(folder, transform=_BaselineViews(views))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=False,
                                       prefetch_factor=4 if workers else None)


def _source(data: str, backend: str) -> str:
    p = Path(data)
    if p.is_dir() and (p / "train").is_dir() and (p / "train.beton").is_file():
        return str(p / ("train.beton" if backend == "ffcv" else "train"))
    return str(p)


def measure(backend: str, stage: str, data: str, recipe: str, batch_size: int, workers: int, size: int,
            epochs: int, max_batches: int, device: str = "cpu", seed: int = 0, jitter: str = "lightly") -> dict:
    """One (back-end, stage) measurement: warm-up pass, then ``epochs`` timed passes of up to ``max_batches``."""
    import torch

    from fastssl.pipelines.recipes import AugConfig

    local_size = max(16, round(size * 96 / 224))
    views = AugConfig(recipe=recipe, global_size=size, local_size=local_size).resolved_views()
    if jitter == "lightly":
        views = peer_jitter(recipe, views)
    elif jitter != "recipe":
        raise ValueError(f"jitter must be 'lightly' or 'recipe', got {jitter!r}")
    src = _source(data, "ffcv" if backend == "ffcv-opencv" else backend)
    if backend == "lightly":
        loader = lightly_loader(src, recipe, size, local_size, batch_size, workers)
        stage = "full"
    elif backend == "baseline":
        if len(views) != 2:
            views = views[:2]
        loader = _baseline_loader(src, views, batch_size, workers)
        stage = "full"
    else:
        from fastssl.pipelines import ffcv_backend
        from fastssl.pipelines.loader import build_loader

        # ffcv-opencv: the ffcv back-end with OpenCV's INTER_AREA for every crop (upstream ffcv's
        # resize), to measure our area resize side by side.
        ffcv_backend.AREA_RESIZE = backend != "ffcv-opencv"
        try:
            loader = build_loader(None, views, src, batch_size, device, seed=seed, workers=workers,
                                  backend="ffcv" if backend == "ffcv-opencv" else backend,
                                  photometric=(stage == "full"))
        finally:
            ffcv_backend.AREA_RESIZE = True

    def run(epoch: int, limit: int) -> tuple[int, float, float]:
        """One pass of up to ``limit`` batches: (images, wall seconds, CPU seconds).

        ``set_epoch`` runs before the clock starts: it shuts down the previous pass, which
        the benchmark abandoned early (ffcv takes ~0.7 s to stop an iterator mid-epoch; a
        training epoch runs to its end and never pays that). The new epoch's start-up
        (first-batch latency, worker start) is timed.
        """
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        n = 0
        for k, b in enumerate(loader):
            vs = b.views if hasattr(b, "views") else b[0]
            n += vs[0].shape[0]
            if k + 1 >= limit:
                break
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n, time.perf_counter() - t0, _cpu_seconds() - c0

    run(0, min(max_batches, 4))                                    # warm-up: compile, start workers
    images, batches, wall, cpu = 0, 0, 0.0, 0.0
    for e in range(epochs):
        got, w, c = run(e + 1, max_batches)
        images += got
        batches += -(-got // batch_size)
        wall += w
        cpu += c
    return {"backend": backend, "recipe": recipe, "stage": stage, "views": len(views), "size": size,
            "batch_size": batch_size, "workers": workers, "images": images, "seconds": round(wall, 3),
            "images_per_second": round(images / wall, 1), "ms_per_batch": round(1000 * wall / max(1, batches), 2),
            "cpu_percent": round(100 * cpu / wall, 1), "jitter": jitter}


def _merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per configuration: the median round's figures, with every round's images/s beside them."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for i in range(len(rounds[0])):
        per = sorted((rows[i] for rows in rounds), key=lambda r: r["images_per_second"])
        row = dict(per[len(per) // 2])
        row["rounds"] = len(rounds)
        row["images_per_second_rounds"] = [rows[i]["images_per_second"] for rows in rounds]
        merged.append(row)
    return merged


def _recipe_cost_ratios(results: list[dict], rounds: list[list[dict]], ref: str) -> None:
    """Per back-end and stage: time per image of each recipe over ``ref``'s, the median of per-round ratios."""
    for i, r in enumerate(results):
        if r["recipe"] == ref:
            continue
        j = next((j for j, q in enumerate(results)
                  if q["recipe"] == ref and q["backend"] == r["backend"] and q["stage"] == r["stage"]), None)
        if j is None:
            continue
        ratios = sorted(rows[j]["images_per_second"] / rows[i]["images_per_second"] for rows in rounds)
        r[f"time_per_image_vs_{ref}"] = round(ratios[len(ratios) // 2], 3)
        if len(rounds) > 1:
            r[f"time_per_image_vs_{ref}_rounds"] = [round(x, 3) for x in ratios]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastssl-bench loader``."""
    ap = argparse.ArgumentParser(prog="fastssl-bench loader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="ffcv",
                    help="ffcv|dali|torch|lightly (the peer)|baseline (naive torchvision)|ffcv-opencv (ffcv resizing "
                         "with OpenCV), comma-separated, or all")
    ap.add_argument("--jitter", default="lightly", choices=("lightly", "recipe"),
                    help="colour-jitter strengths of every arm: lightly's for the recipe (default) or our preset's")
    ap.add_argument("--data", help="bench folder (train/ + train.beton), a .beton or an image folder")
    ap.add_argument("--recipe", default="simclr", help="simclr|byol|dino|mae, comma-separated")
    ap.add_argument("--stage", default="loader,full", help="loader|full, comma-separated")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-batches", type=int, default=10**9, help="cap batches per timed pass")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the whole grid this many times, interleaved, and report medians (noisy machines)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--make-imagenet-like", metavar="OUT_DIR", help="write the benchmark set and exit")
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args(argv)
    if a.make_imagenet_like:
        info = make_imagenet_like(a.make_imagenet_like, a.n, a.workers)
        print(json.dumps(info) if a.json else f"wrote {info}")
        return 0
    if not a.data:
        ap.error("--data is required (make a set with --make-imagenet-like OUT_DIR)")
    backends = ["lightly", "baseline", "torch", "dali", "ffcv"] if a.backend == "all" else a.backend.split(",")
    grid = [(recipe, be, stage) for recipe in a.recipe.split(",") for be in backends
            for stage in (["full"] if be in ("baseline", "lightly") else a.stage.split(","))]
    rounds: list[list[dict]] = []
    for k in range(max(1, a.rounds)):
        # Whole grid per round, so slow drifts of a shared machine hit every configuration alike.
        rows = []
        for recipe, be, stage in grid:
            r = measure(be, stage, a.data, recipe, a.batch_size, a.workers, a.size, a.epochs, a.max_batches,
                        a.device, jitter=a.jitter)
            rows.append(r)
            if not a.json:
                tag = f" [round {k + 1}]" if a.rounds > 1 else ""
                print(f"{be:>8} {recipe:>6} {stage:>6}: {r['images_per_second']:8.1f} img/s  "
                      f"{r['ms_per_batch']:8.1f} ms/batch  cpu {r['cpu_percent']:5.0f}%{tag}", flush=True)
        rounds.append(rows)
    results = _merge_rounds(rounds)
    for ref in ("lightly", "baseline"):
        base = {r["recipe"]: r["images_per_second"] for r in results if r["backend"] == ref}
        for r in results:
            if r["recipe"] in base:
                r[f"x_{ref}"] = round(r["images_per_second"] / base[r["recipe"]], 2)
    _recipe_cost_ratios(results, rounds, a.recipe.split(",")[0])
    out = {"benchmark": "loader", "cpu_count": os.cpu_count(), "argv": sys.argv[1:] if argv is None else argv,
           "results": results}
    if len(results) == 1:
        out.update(results[0])
    if a.json:
        print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
