"""``fastssl-bench loader``: images/s of ready views per back-end and stage, side by side in one run.

    fastssl-bench loader --make-imagenet-like data/bench [--n 2000]
    fastssl-bench loader --backend all --data data/bench --recipe simclr --batch-size 64 --workers 2 --json
    fastssl-bench loader --device cuda --make-imagenet-like /tmp/bench --measure --n 1000 --backend torch,baseline \
        --recipe simclr,dino --jitter recipe --batch-size 128 --workers 8 --max-batches 8 \
        --step-json gpu-results/gpu_bench_step.json --json

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

``--device cuda``: images/s of ready views on the GPU. The torch back-end then decodes
on the GPU (``torchvision.io.decode_jpeg(device="cuda")`` + ``roi_align`` crops), so its
``loader`` and ``full`` rows are the GPU-decode loader without and with the batched
photometric stage; ``baseline`` and ``lightly`` views are copied to the GPU inside the
timed loop. Timed with :class:`fastssl.benchmarking.Timer` (CUDA events). Without a
visible CUDA device it stops with a one-line error. ``--make-imagenet-like DIR --measure``
writes the benchmark set (the .beton only when an ffcv arm needs it) and measures it in
the same call. ``--step-json`` (the JSON lines of ``fastssl-bench step --suite gpu``) adds
``goal``: does the torch back-end's SimCLR ``full`` stage deliver at least the images/s of
the ResNet-50 SimCLR bf16 step? With ``--json``, each row is also printed to stderr as a
JSON line as it finishes, so a run cut short keeps what it measured.
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


class _Shard:
    """Every ``step``-th image of ``ds`` from ``first``: what one writer process renders."""

    def __init__(self, ds, first: int, step: int):
        self.ds, self.first, self.step = ds, first, step
        self.classes = ds.classes

    def __len__(self) -> int:
        return len(range(self.first, len(self.ds), self.step))

    def __getitem__(self, j: int):
        return self.ds[self.first + j * self.step]


def _write_shard(job) -> None:
    """Write one shard with the one JPEG writer, then give its files their global names."""
    from fastssl.pipelines.synthetic import write_jpeg_folder

    ds, first, step, folder, part = job
    write_jpeg_folder(_Shard(ds, first, step), part, quality=90)
    for f in Path(part).glob("*/*.jpg"):  # <class>/<shard index>.jpg -> <class>/<dataset index>.jpg
        os.replace(f, Path(folder) / f.parent.name / f"{first + int(f.stem) * step:07d}.jpg")


def make_imagenet_like(out_dir: str, n: int = 2000, workers: int = 2, seed: int = 0, beton: bool = True) -> dict:
    """``n`` JPEGs of 400x350 px at quality 90 (ImageFolder ``out/train``) and the same as ``out/train.beton``.

    The JPEGs are rendered by ``workers`` processes (each writes a shard with
    :func:`pipelines.synthetic.write_jpeg_folder`); ``beton=False`` skips the .beton (no ffcv needed).
    """
    import shutil
    import tempfile

    from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

    out = Path(out_dir)
    folder = out / "train"
    stamp = out / ".imagenet-like.json"
    want = {"n": n, "seed": seed, "size": [350, 400], "quality": 90}
    t0 = time.perf_counter()
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        if stamp.is_file() and folder.is_dir():  # our own earlier set of another size: no stale files
            shutil.rmtree(folder)
        stamp.unlink(missing_ok=True)
        ds = SyntheticImages(num_classes=10, per_class=max(1, n // 10), size=(350, 400), seed=seed, split="train")
        procs = max(1, min(int(workers), len(ds)))
        if procs == 1:
            write_jpeg_folder(ds, folder, quality=90)
        else:
            import multiprocessing as mp

            for name in ds.classes:
                (folder / name).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".parts-", dir=out) as parts:
                jobs = [(ds, k, procs, str(folder), str(Path(parts) / str(k))) for k in range(procs)]
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with ctx.Pool(procs) as pool:
                    pool.map(_write_shard, jobs)
        stamp.write_text(json.dumps(want))
    info = {"folder": str(folder), "images": sum(1 for _ in folder.rglob("*.jpg")),
            "make_seconds": round(time.perf_counter() - t0, 1)}
    if beton:
        from fastssl.pipelines.prepare import WriteSettings, prepare_folder

        summary = prepare_folder(folder, out / "train.beton", WriteSettings(jpeg_quality=90, workers=workers),
                                 quiet=True)
        info.update(beton=str(out / "train.beton"), images=summary["written"], beton_bytes=summary["bytes"])
    return info


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
    """The file or folder a back-end reads in a bench set (``train/`` and, when written, ``train.beton``)."""
    p = Path(data)
    if p.is_dir() and (p / "train").is_dir():
        if backend != "ffcv":
            return str(p / "train")
        if (p / "train.beton").is_file():
            return str(p / "train.beton")
    return str(p)


def measure(backend: str, stage: str, data: str, recipe: str, batch_size: int, workers: int, size: int,
            epochs: int, max_batches: int, device: str = "cpu", seed: int = 0, jitter: str = "lightly",
            host_alloc: str = "system") -> dict:
    """One (back-end, stage) measurement: warm-up pass, then ``epochs`` timed passes of up to ``max_batches``.

    ``host_alloc``: the allocator setting of fastssl's own arms (``train.host_alloc``; ``auto`` as
    ``fastssl-train`` runs them). The peers (lightly, baseline) always run on glibc's defaults, as
    their users run them. It is process-wide: only a fresh process per arm keeps it to that arm.
    """
    import torch

    from fastssl.hostmem import apply_host_alloc

    ours = backend not in ("lightly", "baseline")
    # In a fastssl-train process the photometric stage's per-image buffers come back from the heap;
    # on glibc's defaults they were unmapped and page-faulted in again each batch (SimCLR 224 px: 50-60k
    # faults and 0.25 s of system time per 8 batches; BENCHMARKS.md, "Loader").
    in_effect = apply_host_alloc(host_alloc if ours else "system", torch.device(device))

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
        from fastssl.pipelines.loader import build_loader

        # ffcv-opencv: the ffcv back-end with OpenCV's INTER_AREA for every crop (upstream ffcv's
        # resize), to measure our area resize side by side.
        opencv = backend == "ffcv-opencv"
        loader = build_loader(None, views, src, batch_size, device, seed=seed, workers=workers,
                              backend="ffcv" if opencv else backend, photometric=(stage == "full"),
                              area_resize=not opencv)
    from fastssl.benchmarking import Timer

    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def run(epoch: int, limit: int) -> tuple[int, float, float]:
        """One pass of up to ``limit`` batches: (images, wall seconds, CPU seconds).

        ``set_epoch`` runs before the clock starts: it shuts down the previous pass, which
        the benchmark abandoned early (ffcv takes ~0.7 s to stop an iterator mid-epoch; a
        training epoch runs to its end and never pays that). The new epoch's start-up
        (first-batch latency, worker start) is timed. On CUDA the interval is between two CUDA
        events; the device is idle at the first (synchronised before) and has finished every
        stream's work at the second (synchronised inside, so side streams such as nvJPEG's count).
        """
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if cuda:
            torch.cuda.synchronize(dev)
        c0 = _cpu_seconds()
        n = n_first = 0
        p0 = time.perf_counter()
        first = 0.0
        with Timer(dev) as t:
            for k, b in enumerate(loader):
                vs = b.views if hasattr(b, "views") else b[0]
                if cuda and vs[0].device.type != "cuda":  # baseline, lightly: ready views are on the GPU
                    vs = [v.to(dev, non_blocking=True) for v in vs]
                n += vs[0].shape[0]
                if k == 0:  # the epoch's start-up: worker start and first-batch latency
                    if cuda:
                        torch.cuda.synchronize(dev)
                    first, n_first = time.perf_counter() - p0, n
                if k + 1 >= limit:
                    break
            if cuda:
                torch.cuda.synchronize(dev)
        wall = t.seconds()
        rest = time.perf_counter() - p0 - first                   # after the first batch, same clock
        return n, wall, _cpu_seconds() - c0, first, n_first, rest

    run(0, min(max_batches, 4))                                    # warm-up: compile, start workers
    images, batches, wall, cpu, first, n_first, rest = 0, 0, 0.0, 0.0, 0.0, 0, 0.0
    for e in range(epochs):
        got, w, c, f, nf, r = run(e + 1, max_batches)
        rest += r
        images += got
        batches += -(-got // batch_size)
        wall += w
        cpu += c
        first += f
        n_first += nf
    # After the first batch: what a long epoch sustains, without the start-up a short timed pass
    # cannot amortise (on the H200, 15-batch passes of the GPU-decode loader spent ~8 ms of CPU
    # per image; BENCHMARKS.md, "Loader", GPU decode). None when a pass had one batch.
    steady = (images - n_first) / rest if images > n_first and rest > 0 else None
    return {"backend": backend, "recipe": recipe, "stage": stage, "views": len(views), "size": size,
            "batch_size": batch_size, "workers": workers, "images": images, "seconds": round(wall, 3),
            "images_per_second": round(images / wall, 1), "ms_per_batch": round(1000 * wall / max(1, batches), 2),
            "cpu_percent": round(100 * cpu / wall, 1), "jitter": jitter,
            "first_batch_seconds": round(first / max(1, epochs), 3),
            "images_per_second_after_first_batch": None if steady is None else round(steady, 1), "pid": os.getpid(),
            "host_alloc": in_effect}


def measure_fresh(*args, **kwargs) -> dict:
    """:func:`measure` in a fresh interpreter (``spawn``), as the issue's peer comparison runs each arm.

    In one process, an earlier ffcv arm leaves numba's TBB pool running, and lightly's DataLoader then
    forks its workers from that process (TBB warns "Unable to join threads to shut down before
    fork()"); the arms also shared allocator and thread-pool state. Start-up is not timed.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_default_start_method) as ex:
        return ex.submit(measure, *args, **kwargs).result()


def _default_start_method() -> None:
    """In the spawned child: its own workers start as in a user's process (fork on Linux).

    A spawned child inherits ``spawn`` as its default start method, so lightly's DataLoader would
    spawn its workers and ran at half its speed (35.9 against 78.7 images/s, SimCLR, cpu2).
    """
    import multiprocessing as mp

    mp.set_start_method(None, force=True)


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


def device_error(device: str) -> str | None:
    """Why ``--device`` cannot run here (one line), or None."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device: give cpu or cuda (cuda:N)"
    if dev.type not in ("cpu", "cuda"):
        return f"--device {device!r}: only cpu and cuda are measured"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            return (f"--device {device} but {why} (torch {torch.__version__}); run it on a GPU machine, "
                    f"or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def step_goal(results: list[dict], step_json: str | Path) -> dict:
    """The GPU goal: the torch back-end's SimCLR ``full`` stage (GPU decode on CUDA) delivers at least the
    images/s of the ResNet-50 SimCLR bf16 step (case ``simclr_rn50_bf16_compiled`` of ``fastssl-bench step``)."""
    loader = next((r["images_per_second"] for r in results if r["recipe"] == "simclr"
                   and r["backend"] == "torch" and r["stage"] == "full"), None)
    try:
        text = Path(step_json).read_text()
        try:
            cases = json.loads(text)                         # one document (``--out``)
        except ValueError:                                   # or ``--suite`` stdout: one JSON line per case
            cases = {r.get("case"): r for r in map(json.loads, filter(str.strip, text.splitlines()))}
        step = cases["simclr_rn50_bf16_compiled"]["variants"][0]["images_per_s"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return {"error": f"no ResNet-50 step figure in {step_json}: {type(e).__name__}: {e}"}
    return {"loader_images_per_second": loader, "step_images_per_second": round(step, 1),
            "loader_over_step": round(loader / step, 3) if loader else None, "met": bool(loader and loader >= step)}


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
    ap.add_argument("--same-process", action="store_true",
                    help="measure every configuration in this process (default: each in a fresh one, so no arm "
                         "inherits another's thread pools: lightly's DataLoader forks its workers)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda: images/s of ready views on the GPU (the torch back-end decodes there)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (and each row to stderr as a JSON line as it finishes)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--make-imagenet-like", metavar="OUT_DIR", help="write the benchmark set and exit (see --measure)")
    ap.add_argument("--measure", action="store_true",
                    help="with --make-imagenet-like: then measure that set (--data OUT_DIR) instead of exiting")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--step-json", metavar="FILE",
                    help="output of `fastssl-bench step --suite gpu`: add the loader >= ResNet-50 step goal")
    a = ap.parse_args(argv)
    err = device_error(a.device)
    if err:
        print(f"fastssl-bench loader: {err}", file=sys.stderr)
        return 2
    backends = ["lightly", "baseline", "torch", "dali", "ffcv"] if a.backend == "all" else a.backend.split(",")
    made = None
    if a.make_imagenet_like:
        if a.data:
            ap.error("give --data or --make-imagenet-like OUT_DIR, not both")
        beton = not a.measure or any(be in ("ffcv", "ffcv-opencv") for be in backends)
        made = make_imagenet_like(a.make_imagenet_like, a.n, a.workers, beton=beton)
        if not a.measure:
            print(json.dumps(made) if a.json else f"wrote {made}")
            return 0
        a.data = a.make_imagenet_like
    elif a.measure:
        ap.error("--measure needs --make-imagenet-like OUT_DIR")
    if not a.data:
        ap.error("--data is required (make a set with --make-imagenet-like OUT_DIR)")
    grid = [(recipe, be, stage) for recipe in a.recipe.split(",") for be in backends
            for stage in (["full"] if be in ("baseline", "lightly") else a.stage.split(","))]
    rounds: list[list[dict]] = []
    for k in range(max(1, a.rounds)):
        # Whole grid per round, so slow drifts of a shared machine hit every configuration alike.
        rows = []
        for recipe, be, stage in grid:
            # Fresh processes: fastssl's arms with fastssl-train's allocator setting; in one process it would
            # carry over to the peers' arms, so there every arm keeps glibc's defaults.
            r = (measure if a.same_process else measure_fresh)(be, stage, a.data, recipe, a.batch_size, a.workers,
                                                               a.size, a.epochs, a.max_batches, a.device,
                                                               jitter=a.jitter,
                                                               host_alloc="system" if a.same_process else "auto")
            rows.append(r)
            if a.json:  # a run cut short keeps what it measured
                print(json.dumps({"row": r, "round": k + 1}), file=sys.stderr, flush=True)
            else:
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
           "fresh_process": not a.same_process, "results": results}
    if len(results) == 1:
        out.update(results[0])
    import torch

    if torch.device(a.device).type == "cuda":
        out["device"] = torch.cuda.get_device_name(torch.device(a.device))
    if made is not None:
        out["data"] = made
    if a.step_json:
        out["goal"] = step_goal(results, a.step_json)
        if not a.json:
            print(f"goal (torch simclr full >= ResNet-50 step): {out['goal']}")
    from fastssl.benchmarking import write_json

    text = write_json(out, a.out)
    if a.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
