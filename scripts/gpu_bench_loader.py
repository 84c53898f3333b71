"""GPU-decode benchmark of the torch back-end, in one call on a CUDA machine (no ffcv or DALI needed).

    python scripts/gpu_bench_loader.py [--n 2000] [--batch-size 128] [--workers 8] [--recipes simclr,dino]

Writes an ImageNet-like JPEG folder (400x350 px, quality 90, built-in shapes) to
a temporary folder, then measures, side by side, images/s of ready uint8 views on
the GPU (``loader`` stage) for: CPU decode + crop in workers (PIL) and GPU decode
(``torchvision.io.decode_jpeg(device="cuda")``) + ``roi_align`` crops; and the
per-image torchvision baseline. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _render(args):
    i, out, n_per = args
    from PIL import Image

    from fastssl.pipelines.synthetic import SyntheticImages

    ds = SyntheticImages(num_classes=10, per_class=n_per, size=(350, 400), seed=0, split="train")
    img, label = ds[i]
    d = Path(out) / ds.classes[label]
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=90)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--recipes", default="simclr,dino")
    ap.add_argument("--batches", type=int, default=12)
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs CUDA"}))
        return 1
    from fastssl.cli.bench_loader import _baseline_loader
    from fastssl.pipelines.recipes import AugConfig
    from fastssl.pipelines.torch_backend import TorchLoader

    tmp = Path(tempfile.mkdtemp(prefix="fastssl-gpu-bench-"))
    t0 = time.perf_counter()
    n_per = max(1, a.n // 10)
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(_render, [(i, str(tmp), n_per) for i in range(10 * n_per)], chunksize=16)
    results = {"device": torch.cuda.get_device_name(), "images": 10 * n_per, "make_seconds": round(time.perf_counter() - t0, 1),
               "batch_size": a.batch_size, "workers": a.workers, "cpu_count": os.cpu_count(), "runs": []}

    def timed(loader, views_of, batches):
        it = iter(loader)
        for _ in range(3):  # warm-up: workers, cuDNN/nvJPEG handles
            next(it)
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = 0
        for _ in range(batches):
            try:
                b = next(it)
            except StopIteration:
                break
            n += views_of(b)[0].shape[0]
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    for recipe in a.recipes.split(","):
        views = AugConfig(recipe=recipe).resolved_views()
        for name, gpu in (("torch_cpu_decode", False), ("torch_gpu_decode", True)):
            L = TorchLoader(str(tmp), views, a.batch_size, "cuda", workers=a.workers, gpu_decode=gpu)
            ips = timed(L, lambda b: b.views, a.batches)
            results["runs"].append({"recipe": recipe, "pipeline": name, "stage": "loader", "views": len(views),
                                    "images_per_second": round(ips, 1)})
        if recipe == "simclr":
            B = _baseline_loader(str(tmp), views[:2], a.batch_size, a.workers)
            ips = timed(B, lambda b: [v.cuda(non_blocking=True) for v in b[0]], a.batches)
            results["runs"].append({"recipe": recipe, "pipeline": "baseline_torchvision", "stage": "full",
                                    "views": 2, "images_per_second": round(ips, 1)})
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
