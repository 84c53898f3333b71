"""``fastssl-bench eval``: the evaluation's cost, at ImageNet scale on synthetic features or on a run.

    fastssl-bench eval --json                                   # kNN + cached probe, 1.28 M x 2048 features
    fastssl-bench eval --n-train 200000 --dim 512 --n-val 10000 --probe-epochs 1
    fastssl-bench eval runs/demo-simclr --epochs 30 --json      # cached probe against re-extraction

Without a run directory: synthetic features of ImageNet's shape (``--n-train 1281167
--dim 2048 --n-val 50000``, 1000 classes, clustered so the accuracy means something) are
made on the device (the GPU when there is one) and timed through what ``fastssl-eval``
runs on them: the kNN (``knn_scores``: chunked blocks within ``--budget-bytes``) and the
cached linear probe (``fit_linear_probe``, ``--probe-epochs``; 0 skips it). Reported:
seconds, peak memory (CUDA: the allocator's peak; CPU: the process's peak resident set,
reset before each part where Linux allows), the memory budget and the blocks used.
``--reference`` also times the dense kNN (every test chunk of 1024 rows against the whole
bank at once, the previous implementation) and checks the predictions agree.

With a run directory: the linear probe on cached features against re-extraction per
epoch. Both arms run the same probe code (``fit_linear_probe``: the same grid, seed,
hold-out and schedule) in one process, one after the other; they differ only in where the
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
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-bench eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=None,
                    help="run directory (uses checkpoints/last.pt) or a checkpoint file: cached probe against "
                         "re-extraction; none: kNN and probe on synthetic features")
    ap.add_argument("--epochs", type=int, default=30, help="probe epochs of the run-directory comparison (30)")
    ap.add_argument("--n-train", type=int, default=1_281_167, help="synthetic train features (ImageNet: 1281167)")
    ap.add_argument("--n-val", type=int, default=50_000, help="synthetic val features (ImageNet: 50000)")
    ap.add_argument("--dim", type=int, default=2048, help="feature width (ResNet-50: 2048)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20, help="kNN neighbours (20, section 3.7.1)")
    ap.add_argument("--budget-bytes", type=int, default=None,
                    help="kNN block memory budget (default: fastssl's, 1 GiB on CUDA, 256 MiB on the CPU)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="bank dtype (auto: bf16 on CUDA, as a bf16 backbone's features are kept; fp32 on the CPU)")
    ap.add_argument("--probe-epochs", type=int, default=30, help="cached linear probe epochs (30; 0: no probe)")
    ap.add_argument("--reference", action="store_true", help="also time the dense kNN and compare predictions")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.path is None:
        for name in ("n_train", "n_val", "dim", "classes", "k"):
            if getattr(args, name) < 1:
                print(f"fastssl-bench eval: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}",
                      file=sys.stderr)
                return 2
        if args.probe_epochs < 0:
            print(f"fastssl-bench eval: --probe-epochs must be 0 (no probe) or more, got {args.probe_epochs}",
                  file=sys.stderr)
            return 2
        return synthetic(args)
    return run_dir_comparison(args)


def _clustered(n: int, dim: int, classes: int, device, dtype, seed: int, centers=None):
    """(n, dim) features around per-class centres, labels (n,): made in slices (no (n, dim) fp32 temporary)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    if centers is None:
        centers = torch.randn(classes, dim, device=device, generator=g)
    y = torch.randint(0, classes, (n,), device=device, generator=g)
    x = torch.empty(n, dim, device=device, dtype=dtype)
    for s in range(0, n, 65536):
        yy = y[s:s + 65536]
        x[s:s + 65536] = centers[yy] + 2.0 * torch.randn(len(yy), dim, device=device, generator=g)
    return x, y, centers


class _Peak:
    """Peak memory of a block of work: the CUDA allocator's peak above its start, or the process's peak RSS.

    On the CPU the peak resident set (``VmHWM``) is reset first where Linux allows it
    (``/proc/self/clear_refs``); ``peak_bytes`` is then the peak of the whole process during
    the block (bank included), ``reset`` says whether the reset took.
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.reset = True
            except OSError:
                self.reset = False
            self.start = _proc_status("VmRSS:")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - self.t0
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.extra_bytes = self.peak_bytes - self.start
        else:
            self.seconds = time.perf_counter() - self.t0
            self.peak_bytes = _proc_status("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.extra_bytes = self.peak_bytes - self.start if self.reset and self.start else None
        return False

    def report(self) -> dict:
        # extra_bytes: the peak above what was held when the block began (the banks, the model)
        out = {"seconds": self.seconds, "peak_bytes": self.peak_bytes, "extra_bytes": self.extra_bytes}
        if self.device.type != "cuda":
            out["peak_is"] = "process peak RSS" + ("" if self.reset else " since start (no reset: extra unknown)")
        return out


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` size field in bytes (``VmRSS:``, ``VmHWM:``); 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def dense_knn_scores(train_feats, train_labels, test_feats, num_classes, k=20, temperature=0.07, chunk=1024):
    """The dense kNN (fastssl's before the chunked one): each 1024-row test chunk against the whole bank."""
    import torch
    import torch.nn.functional as F

    tr = F.normalize(train_feats.float(), dim=1)
    te = F.normalize(test_feats.float(), dim=1)
    k = min(k, tr.shape[0])
    out = []
    for s in range(0, te.shape[0], chunk):
        sim = te[s:s + chunk] @ tr.T                                  # (m, N)
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx].long(), (w / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def synthetic(args) -> int:
    """kNN and the cached probe on synthetic features of ImageNet's shape, on one device."""
    import torch

    from fastssl.evaluation import knn_scores
    from fastssl.evaluation.offline import fit_linear_probe
    from fastssl.rundir import environment

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    tx, ty, centers = _clustered(args.n_train, args.dim, args.classes, device, dtype, seed=0)
    vx, vy, _ = _clustered(args.n_val, args.dim, args.classes, device, dtype, seed=1, centers=centers)
    make_s = time.perf_counter() - t0
    bank_bytes = tx.numel() * tx.element_size() + ty.numel() * 8
    out: dict = {"benchmark": "eval", "mode": "synthetic features", "device": str(device), "dtype": str(dtype),
                 "n_train": args.n_train, "n_val": args.n_val, "dim": args.dim, "classes": args.classes,
                 "bank_bytes": bank_bytes, "make_seconds": make_s}
    stats: dict = {}
    with _Peak(device) as pk:
        scores = knn_scores(tx, ty, vx, args.classes, args.k, 0.07, budget_bytes=args.budget_bytes, stats=stats)
        pred = scores.argmax(1)
        top1 = 100.0 * float((pred == vy).float().mean())
    out["knn"] = {**pk.report(), "top1": top1, "k": args.k, "budget_bytes": stats["budget_bytes"],
                  "block": [stats["chunk_test"], stats["chunk_train"]], "block_bytes_planned": stats["block_bytes"],
                  "max_similarity_block_bytes": stats["max_block_bytes"], "topk_state_bytes": stats["state_bytes"],
                  "train_chunks": stats["train_chunks"]}
    if args.reference:
        with _Peak(device) as pk:
            ref = dense_knn_scores(tx, ty, vx, args.classes, args.k, 0.07).argmax(1)
        out["knn_dense_reference"] = {**pk.report(), "predictions_agree": float((ref == pred).float().mean())}
        out["knn_dense_over_chunked_seconds"] = out["knn_dense_reference"]["seconds"] / out["knn"]["seconds"]
    if args.probe_epochs:
        with _Peak(device) as pk:
            res = fit_linear_probe(tx, ty, vx, vy, args.classes, epochs=args.probe_epochs)
        out["cached_probe"] = {**pk.report(), "top1": res["linear_top1"], "epochs": args.probe_epochs,
                               "heads": len(res["protocol"]["grid"]), "protocol": "cached"}
    out["env"] = environment(device)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        gib = 2 ** 30
        kn = out["knn"]
        print(f"eval cost on {device}: {args.n_train} x {args.dim} train / {args.n_val} val features ({dtype}), "
              f"bank {bank_bytes / gib:.2f} GiB")

        def extra(r):  # the peak above what the process held before the part
            return "" if r["extra_bytes"] is None else f" (+{r['extra_bytes'] / gib:.2f})"

        print(f"  {f'kNN (k={args.k})':<22}{kn['seconds']:8.2f} s   peak {kn['peak_bytes'] / gib:.2f}{extra(kn)} GiB   "
              f"budget {kn['budget_bytes'] / 2**20:.0f} MiB, blocks {kn['block'][0]} x {kn['block'][1]}   "
              f"top-1 {top1:.2f}")
        if args.reference:
            r = out["knn_dense_reference"]
            print(f"  {'kNN dense reference':<22}{r['seconds']:8.2f} s   peak {r['peak_bytes'] / gib:.2f}{extra(r)} GiB   "
                  f"agree {100 * r['predictions_agree']:.2f}%")
        if args.probe_epochs:
            c = out["cached_probe"]
            print(f"  {f'cached probe ({args.probe_epochs} ep)':<22}{c['seconds']:8.2f} s   peak {c['peak_bytes'] / gib:.2f}{extra(c)} GiB"
                  f"   top-1 {c['top1']:.2f} (protocol cached)")
    return 0


def run_dir_comparison(args) -> int:
    """The cached probe against re-extraction per epoch on a run's checkpoint."""
    import torch

    from fastssl import checkpoint
    from fastssl.evaluation import extract_features
    from fastssl.evaluation.offline import (
        cached_features,
        eval_loaders,
        feature_meta,
        fit_linear_probe,
        weights_fingerprint,
    )
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
    weights = weights_fingerprint(method)  # the key fastssl-eval and the trainer's evaluation use

    def extract(split):
        return extract_features(method.embed, loaders[split], device)

    # Warm-up and cache fill (not timed): both splits extracted once.
    t0 = time.perf_counter()
    feats = {s: cached_features(run_dir, s, step, feature_meta(cfg, s, step, weights), lambda s=s: extract(s))
             for s in ("train", "val")}
    fill_s = time.perf_counter() - t0
    (_, ty), (vx, vy) = feats["train"], feats["val"]
    num_classes = int(max(ty.max(), vy.max())) + 1

    # cached: load from disk (as a fresh fastssl-eval process would), then probe.
    t0 = time.perf_counter()
    tx, ty = cached_features(run_dir, "train", step, feature_meta(cfg, "train", step, weights), lambda: extract("train"))
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
