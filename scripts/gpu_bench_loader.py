"""GPU-decode benchmark of the torch back-end, in one call on a CUDA machine (no ffcv or DALI needed).

    python scripts/gpu_bench_loader.py [--n 2000] [--batch-size 128] [--workers 8] [--recipes simclr,dino]
                                       [--step-json gpu-results/gpu_bench_step.json]
    python scripts/gpu_bench_loader.py --smoke     # the same code path on the CPU, tiny: checks the script

Writes an ImageNet-like JPEG folder (400x350 px, quality 90, built-in shapes) to
a temporary folder, then measures, side by side, images/s of ready views on the
GPU for: CPU decode + crop in workers (PIL) and GPU decode
(``torchvision.io.decode_jpeg(device="cuda")``) + ``roi_align`` crops, each at the
``loader`` stage (uint8 views) and the ``full`` stage (after the batched photometric
stage on the GPU); and the per-image torchvision baseline. With ``--step-json``
(the output of ``scripts/gpu_bench_step.py``) it checks issue 4's GPU goal: the GPU-decode
``full`` SimCLR loader delivers at least the images/s of a ResNet-50 SimCLR bf16 step.
Prints one JSON object.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--recipes", default="simclr,dino")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--step-json", default="", help="gpu_bench_step.py output: check the loader >= trainer goal")
    ap.add_argument("--smoke", action="store_true", help="CPU, 40 images, 2 batches: checks the script itself")
    a = ap.parse_args(argv)
    import torch

    if a.smoke:
        device, a.n, a.batch_size, a.workers, a.batches, warm = torch.device("cpu"), 40, 8, 1, 2, 1
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "needs CUDA (use --smoke on a CPU)"}))
        return 1
    else:
        device, warm = torch.device("cuda"), 3
    from fastssl.cli.bench_loader import _baseline_loader
    from fastssl.pipelines.loader import make_finisher
    from fastssl.pipelines.recipes import AugConfig
    from fastssl.pipelines.torch_backend import TorchLoader

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    tmp = Path(tempfile.mkdtemp(prefix="fastssl-gpu-bench-"))
    t0 = time.perf_counter()
    n_per = max(1, a.n // 10)
    jobs = [(i, str(tmp), n_per) for i in range(10 * n_per)]
    if a.smoke:  # in-process (the script may be imported by path, which a pool's pickling cannot follow)
        for j in jobs:
            _render(j)
    else:
        with mp.Pool(min(os.cpu_count() or 1, 16)) as pool:
            pool.map(_render, jobs, chunksize=16)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "images": 10 * n_per,
               "make_seconds": round(time.perf_counter() - t0, 1), "batch_size": a.batch_size,
               "workers": a.workers, "cpu_count": os.cpu_count(), "runs": []}

    def timed(loader, views_of, batches):
        it = iter(loader)
        for _ in range(warm):  # warm-up: workers, cuDNN/nvJPEG handles
            next(it)
        sync()
        t = time.perf_counter()
        n = 0
        for _ in range(batches):
            try:
                b = next(it)
            except StopIteration:
                break
            n += views_of(b)[0].shape[0]
        sync()
        return n / (time.perf_counter() - t)

    for recipe in a.recipes.split(","):
        views = AugConfig(recipe=recipe).resolved_views()
        # On a GPU machine only the GPU-decode arms: CPU decode is measured on the CPU (fastssl-bench loader).
        arms = (("torch_cpu_decode", False),) * (device.type == "cpu") + (("torch_gpu_decode", True),)
        for name, gpu in arms:
            for stage in ("loader", "full"):
                fin = make_finisher(views, device, 0, True, photometric=stage == "full")
                L = TorchLoader(str(tmp), views, a.batch_size, device, workers=a.workers, gpu_decode=gpu, finisher=fin)
                ips = timed(L, lambda b: b.views, a.batches)
                results["runs"].append({"recipe": recipe, "pipeline": name, "stage": stage, "views": len(views),
                                        "images_per_second": round(ips, 1)})
                print(json.dumps({"run": results["runs"][-1]}), file=sys.stderr, flush=True)
        if recipe == "simclr":
            B = _baseline_loader(str(tmp), views[:2], a.batch_size, a.workers)
            ips = timed(B, lambda b: [v.to(device, non_blocking=True) for v in b[0]], a.batches)
            results["runs"].append({"recipe": recipe, "pipeline": "baseline_torchvision", "stage": "full",
                                    "views": 2, "images_per_second": round(ips, 1)})
    if a.step_json:
        results["goal"] = _goal(results["runs"], Path(a.step_json))
    print(json.dumps(results, indent=1))
    return 0


def _goal(runs: list[dict], step_json: Path) -> dict:
    """Issue 4's GPU goal: the GPU-decode SimCLR loader (full stage) >= ResNet-50 SimCLR bf16 step images/s."""
    loader = next((r["images_per_second"] for r in runs if r["recipe"] == "simclr"
                   and r["pipeline"] == "torch_gpu_decode" and r["stage"] == "full"), None)
    try:
        text = step_json.read_text()
        try:
            cases = json.loads(text)                         # one document (gpu_bench_step.py --out)
        except ValueError:                                   # or its stdout: one JSON line per case
            cases = {r.get("case"): r for r in map(json.loads, filter(str.strip, text.splitlines()))}
        step = cases["simclr_rn50_bf16_compiled"]["variants"][0]["images_per_s"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"error": f"no ResNet-50 step figure in {step_json}: {type(e).__name__}: {e}"}
    return {"loader_images_per_second": loader, "step_images_per_second": round(step, 1),
            "loader_over_step": round(loader / step, 3) if loader else None, "met": bool(loader and loader >= step)}


if __name__ == "__main__":
    sys.exit(main())
