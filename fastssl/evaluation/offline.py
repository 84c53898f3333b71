"""Offline evaluation of a checkpoint (cookbook section 3.7): cached features, kNN, linear probe, spectra.

Features of the frozen backbone are extracted once per (checkpoint step, split,
image size) and cached in ``RUN_DIR/features/`` as safetensors (no pickle); every probe then works on the
cached tensors, so the backbone never runs once per probe epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastssl.evaluation import extract_features, knn_scores, labelled_rows, rankme

log = logging.getLogger(__name__)

FEATURES_META_KEY = "fastssl"


def cached_features(run_dir: str | Path, split: str, step: int, meta: dict, extract_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_fn() -> (feats, labels)`` run once; later calls with the same key load ``features/<split>_step<step>.safetensors``.

    The cache is a safetensors file (https://huggingface.co/docs/safetensors): tensors
    ``feats`` (N, F) and ``labels`` (N,), ``meta`` as JSON under the header's
    ``"fastssl"`` metadata key. Reading it parses a size-checked JSON header and copies
    tensor bytes, never pickle, so a cache file planted in a run directory cannot run
    code. A file that fails to parse, has other meta, or has inconsistent shapes is
    re-extracted and overwritten. Caches of earlier versions (``.pt``, pickle) are ignored.
    """
    path = feature_cache_path(run_dir, split, step)
    if path.is_file():
        got = _read_feature_cache(path, meta)
        if got is not None:
            return got
    feats, labels = extract_fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_feature_cache(path, feats, labels, meta)
    return feats, labels


def feature_cache_path(run_dir: str | Path, split: str, step: int) -> Path:
    """``RUN_DIR/features/<split>_step<step>.safetensors``: where :func:`cached_features` keeps a split's features."""
    return Path(run_dir) / "features" / f"{split}_step{step}.safetensors"


def write_feature_cache(path: str | Path, feats: torch.Tensor, labels: torch.Tensor, meta: dict) -> bool:
    """Write a feature cache atomically (temporary file, then rename); ``meta`` must be JSON-serialisable.

    The cache only saves a later extraction, so a write that fails (a full disk, a read-only run
    directory) removes its temporary file, logs one warning naming the path and the bytes it needed,
    and returns False: the evaluation that computed the features goes on.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file({"feats": feats.detach().cpu().contiguous(), "labels": labels.detach().cpu().contiguous()},
                  str(tmp), metadata={FEATURES_META_KEY: json.dumps(meta, sort_keys=True)})
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        need = feats.numel() * feats.element_size() + labels.numel() * labels.element_size()
        log.warning(f"feature cache {path} not written ({e.strerror or e}; it needs {need / 2**20:.1f} MiB): "
                    f"the evaluation goes on, and a later one extracts the features again")
        return False
    return True


def _read_feature_cache(path: Path, meta: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(feats, labels)`` of a cache written for exactly ``meta``, else None (stale, foreign or damaged)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get(FEATURES_META_KEY, "null"))
            # Compare through JSON so tuples and lists in ``meta`` match as they were written.
            if stored != json.loads(json.dumps(meta, sort_keys=True)) or set(f.keys()) != {"feats", "labels"}:
                return None
            feats, labels = f.get_tensor("feats"), f.get_tensor("labels")
    except (SafetensorError, OSError, ValueError) as e:  # ValueError covers JSONDecodeError
        log.warning("ignoring unreadable feature cache %s (%s: %s); re-extracting", path, type(e).__name__, e)
        return None
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels) or labels.is_floating_point():
        return None
    return feats, labels


def alpha_req(z: torch.Tensor, rank_fraction: float = 0.9) -> float:
    """alpha-ReQ (Agrawal et al. 2022; section 3.7.2): the power-law decay exponent of the eigenspectrum.

    Least-squares slope of log(eigenvalue) against log(rank) over the top ``rank_fraction``
    of the non-zero eigenvalues of the feature covariance (the tail is numerical noise).
    """
    z = z.double()
    z = z - z.mean(0)
    ev = torch.linalg.eigvalsh(z.T @ z / max(z.shape[0] - 1, 1)).flip(0)
    ev = ev[ev > ev[0] * 1e-12]
    n = max(2, int(len(ev) * rank_fraction))
    x = torch.log(torch.arange(1, n + 1, dtype=torch.float64))
    y = torch.log(ev[:n])
    x = x - x.mean()
    return float(-(x * (y - y.mean())).sum() / (x * x).sum())


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (unbiased) std of (N, F) ``x``, fp32 on its device, two passes in fp64 chunks
    of 2^22 elements (32 MB each: its temporaries stay small beside any bank)."""
    n, chunk = len(x), max(1, (1 << 22) // max(1, x.shape[1]))
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        total += x[s:s + chunk].double().sum(0)
    mu = total / n
    sq = torch.zeros_like(total)
    for s in range(0, n, chunk):
        sq += ((x[s:s + chunk].double() - mu) ** 2).sum(0)
    return mu.float(), (sq / max(n - 1, 1)).sqrt().float()


def fit_linear_probe(train_x, train_y, val_x, val_y, num_classes: int, lrs=(0.3, 0.1, 0.03, 0.01),
                     wds=(0.0, 1e-4), epochs: int = 30, batch_size: int = 256, holdout: float = 0.1,
                     seed: int = 0) -> dict:
    """Linear probes for a grid of (lr, wd), trained together in one pass per epoch over cached features.

    The grid is one batched weight ``(G, F, C)``; the best head is chosen on a seeded held-out
    ``holdout`` part of the TRAINING split (never the validation split), then reported on val.

    ``train_x`` is the (N, F) feature tensor, or a callable ``epoch -> (N, F)`` called once per
    epoch (features re-extracted every epoch, as DINO-style linear evaluation does; this is
    the baseline ``fastssl-bench eval`` times against the cache). Standardisation statistics
    come from epoch 0's features either way.
    """
    per_epoch = callable(train_x)
    features_for = train_x if per_epoch else (lambda epoch: train_x)
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    raw = features_for(0)                    # (N, F), kept in its dtype (bf16 banks from CUDA extraction)
    dev = raw.device                         # the probe runs where the features are
    train_y, val_y = train_y.to(dev), val_y.to(dev)
    # Standardised in fp32 batch by batch: a standardised fp32 copy of a 1.28 M x 2048 bank (and its
    # temporaries) would take about 30 GB beside the bank.
    mu, sd = _moments(raw)
    sd = sd + 1e-6

    def rows(x, idx):                        # (n, F) fp32, standardised
        return (x[idx].float() - mu) / sd

    vx = rows(val_x.to(dev), slice(None))
    perm = torch.randperm(len(raw), generator=g)
    n_hold = max(1, int(len(raw) * holdout))
    hold, fit = perm[:n_hold], perm[n_hold:]
    grid = [(lr, wd) for lr in lrs for wd in wds]
    G, Fdim = len(grid), raw.shape[1]
    W = torch.zeros(G, Fdim, num_classes, device=dev, requires_grad=True)
    b = torch.zeros(G, 1, num_classes, device=dev, requires_grad=True)
    lr_t = torch.tensor([lr for lr, _ in grid], device=dev).view(G, 1, 1)
    wd_t = torch.tensor([wd for _, wd in grid], device=dev).view(G, 1, 1)
    steps = epochs * math.ceil(len(fit) / batch_size)
    k = 0
    fit_dev = fit.to(dev)
    for epoch in range(epochs):
        if epoch and per_epoch:
            raw = features_for(epoch).to(dev)
        # One copy per epoch: the draws stay on the CPU generator (the same on every device), and the
        # per-step slices stay on the device (a pageable copy per step would sync the host each time).
        order = fit_dev[torch.randperm(len(fit), generator=g).to(dev)]
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            logits = torch.einsum("nf,gfc->gnc", rows(raw, idx), W) + b               # (G, n, C)
            loss = F.cross_entropy(logits.reshape(-1, num_classes), train_y[idx].repeat(G), reduction="sum") / len(idx)
            gw, gb = torch.autograd.grad(loss, (W, b))
            cos = 0.5 * (1 + math.cos(math.pi * k / steps))                       # cosine lr per step
            with torch.no_grad():
                W -= lr_t * cos * (gw + wd_t * W)
                b -= lr_t * cos * gb
            k += 1

    @torch.no_grad()
    def acc(feats, y, heads, topk=1, chunk=8192):
        """Top-k accuracy (%) per head; ``feats(a, b)`` gives rows a..b standardised. In chunks: the
        (G, n, C) logits of a whole hold-out split would take gigabytes."""
        n = len(y)
        hit = torch.zeros(G, device=dev)[heads]
        for s in range(0, n, chunk):
            logits = torch.einsum("nf,gfc->gnc", feats(s, min(s + chunk, n)), W[heads]) + b[heads]
            top = logits.topk(topk, dim=2).indices
            hit += (top == y[s:s + chunk].view(1, -1, 1)).any(2).float().sum(1)
        return 100.0 * hit / n

    hold = hold.to(dev)
    hold_acc = acc(lambda a, z: rows(raw, hold[a:z]), train_y[hold], slice(None))
    best = int(hold_acc.argmax())
    val_rows = lambda a, z: vx[a:z]  # noqa: E731
    return {
        "linear_top1": float(acc(val_rows, val_y, [best])[0]),
        "linear_top5": float(acc(val_rows, val_y, [best], topk=min(5, num_classes))[0]),
        "protocol": {"name": "cached", "augmentation": "none: centre-crop features extracted once",
                     "grid": [{"lr": lr, "wd": wd} for lr, wd in grid], "chosen": {"lr": grid[best][0], "wd": grid[best][1]},
                     "selection": f"held-out {n_hold} of the train split (seed {seed}); val never used for selection",
                     "epochs": epochs, "batch_size": batch_size, "optimizer": "SGD, cosine lr, features standardised",
                     "train_size": len(fit), "val_size": len(val_x),
                     "holdout_top1": [float(a) for a in hold_acc]},
    }


def eval_loaders(cfg, device) -> dict:
    """Deterministic (centre-crop, unshuffled) loaders of the train and val splits at the global size."""
    from fastssl.pipelines.loader import build_loader

    views = cfg.aug.resolved_views()[:1]
    return {s: build_loader(cfg.data, views, s, 256, device, train=False, drop_last=False,
                            backend=cfg.data.backend, workers=cfg.data.workers) for s in ("train", "val")}


def weights_fingerprint(method) -> str:
    """A digest of the backbone's weights and buffers (shapes, dtypes, bytes): which checkpoint features came from.

    Part of :func:`feature_meta`, so a cache written by another run that stopped at the same step
    in the same directory is re-extracted rather than reused. The trainer and a checkpoint loaded
    by ``fastssl-eval`` hold the same tensors, so both compute the same digest.
    """
    h = hashlib.blake2b(digest_size=16)
    for t in method.backbone.state_dict().values():
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.contiguous().cpu().view(-1).view(torch.uint8).numpy())  # (bytes,) without a copy
    return h.hexdigest()


def feature_meta(cfg, split: str, step: int, weights: str | None = None) -> dict:
    """What a cached feature file depends on: a cache whose meta differs is re-extracted.

    ``weights``: :func:`weights_fingerprint` of the model (omitted: the key is absent, as in
    caches written before it existed).
    """
    path = str(getattr(cfg.data, split))
    meta = {"step": step, "split": split, "path": path, "image_size": cfg.aug.global_size,
            "features": "backbone, global pooled"}
    data = data_identity(path)
    if data is not None:
        meta["data"] = data
    if weights is not None:
        meta["weights"] = weights
    return meta


def data_identity(path: str) -> str | None:
    """Size and modification time of a split's file (a folder: its own), or None for a pattern or a missing path.

    Part of :func:`feature_meta`: the cache holds labels as well as features, so a split written
    again at the same path (other caps, a flat val folder rewritten into class folders) must be
    re-extracted, not silently reused.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


LINEAR_PROTOCOLS = ("cached", "simclr")


def evaluate(cfg, method, step: int, run_dir: str | Path, knn: bool = True, linear: bool = True,
             rank: bool = True, alpha: bool = True, k: int | None = None, temperature: float | None = None,
             device="cpu", loaders=None, progress: bool = True, linear_protocol: str = "cached",
             linear_epochs: int | None = None, linear_batch_size: int | None = None) -> dict:
    """Evaluate ``method``'s frozen backbone; results (each with its protocol) also go to ``RUN_DIR/eval.json``.

    ``progress``: report feature extraction (``fastssl.progress``; cached features need none).
    ``linear_protocol``: ``"cached"`` (the quick probe: a grid of heads on cached centre-crop
    features, :func:`fit_linear_probe`) or ``"simclr"`` (the papers' protocol: augmented images
    through the frozen backbone every epoch, :func:`fastssl.evaluation.linear.linear_protocol`).
    ``linear_epochs`` / ``linear_batch_size``: that protocol's (default: its own, 30 / 256 and 90 / 256).
    Features (and the kNN) stay on ``device``; ``seconds`` gives what each part cost.
    """
    if linear_protocol not in LINEAR_PROTOCOLS:
        raise ValueError(f"linear protocol {linear_protocol!r} is not one of {', '.join(LINEAR_PROTOCOLS)}")
    t_all = time.perf_counter()
    method.eval()
    size = cfg.aug.global_size
    weights = weights_fingerprint(method)
    out: dict = {"checkpoint_step": step, "weights": weights, "image_size": size}
    seconds: dict = {}
    # The papers' protocol alone reads images, not cached features: no extraction pass for it.
    if knn or rank or alpha or (linear and linear_protocol == "cached"):
        loaders = loaders or eval_loaders(cfg, device)
        feats = {}
        for split, ld in loaders.items():
            feats[split] = cached_features(run_dir, split, step, feature_meta(cfg, split, step, weights),
                                           lambda ld=ld, split=split: extract_features(
                                               method.embed, ld, device,
                                               progress=f"features {split}" if progress else None))
        # Unlabelled images (label -1: STL-10's unlabeled split, a flat folder) vote in no kNN and train no probe.
        (tx, ty), (vx, vy) = labelled_rows(*feats["train"]), labelled_rows(*feats["val"])
        seconds["features"] = _synced(device) - t_all
        num_classes = int(max(ty.max(), vy.max())) + 1
        out.update(features="backbone, global pooled, centre crop", train_size=len(tx), val_size=len(vx))
    else:
        num_classes = None  # the protocol takes the training split's
    k = k or cfg.eval.knn_k
    t = temperature or cfg.eval.knn_temperature
    if knn:
        t0 = time.perf_counter()
        scores = knn_scores(tx, ty, vx, num_classes, k, t, device=device)
        out["knn_top1"] = 100.0 * float((scores.argmax(1) == vy.to(scores.device)).float().mean())
        out["knn_protocol"] = {"k": k, "temperature": t, "similarity": "cosine, weighted votes exp(s/T)"}
        seconds["knn"] = time.perf_counter() - t0
    if linear:
        t0 = time.perf_counter()
        if linear_protocol == "cached":
            res = fit_linear_probe(tx.to(device), ty, vx, vy, num_classes, epochs=linear_epochs or 30,
                                   batch_size=linear_batch_size or 256)
            out.update(linear_top1=res["linear_top1"], linear_top5=res["linear_top5"], linear_protocol=res["protocol"])
        else:
            from fastssl.evaluation.linear import linear_protocol as run_protocol

            write_eval(run_dir, {**out, "seconds": dict(seconds)})  # what is known is kept through the hours ahead
            res = run_protocol(cfg, method, device, num_classes, epochs=linear_epochs, batch_size=linear_batch_size,
                               progress=progress, state_path=Path(run_dir) / "linear_simclr.pt", weights=weights)
            out.update(res)
            out.setdefault("train_size", res["linear_protocol"]["train_size"])
            out.setdefault("val_size", res["linear_protocol"]["val_size"])
        seconds["linear"] = _synced(device) - t0
    if rank:
        out["rankme"] = rankme(vx)
    if alpha:
        out["alpha_req"] = alpha_req(vx)
    seconds["total"] = _synced(device) - t_all
    out["seconds"] = seconds
    write_eval(run_dir, out)
    return out


def write_eval(run_dir: str | Path, out: dict) -> dict:
    """Write ``out`` to ``RUN_DIR/eval.json``, merged with what earlier calls found for the same checkpoint.

    A later call that asks for less (``--knn`` alone) keeps the earlier figures of the same weights; the
    hours of the papers' linear protocol are not lost to a quick kNN. Each linear protocol's figures are
    kept under ``linear_by_protocol``; the top-level ``linear_*`` keys are the papers' protocol where it ran,
    else the cached probe's. Another checkpoint's results replace the file. Written atomically.
    """
    path = Path(run_dir, "eval.json")
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        prev = {}
    same = (prev.get("checkpoint_step"), prev.get("weights")) == (out.get("checkpoint_step"), out.get("weights"))
    merged = {**prev, **out} if same else dict(out)
    if same:
        merged["seconds"] = {**prev.get("seconds", {}), **out.get("seconds", {})}
    by_protocol = dict(prev.get("linear_by_protocol", {})) if same else {}
    if "linear_top1" in out:
        by_protocol[out["linear_protocol"]["name"]] = {k: v for k, v in out.items() if k.startswith("linear_")}
    if by_protocol:
        merged["linear_by_protocol"] = by_protocol
        merged.update(by_protocol.get("simclr") or by_protocol["cached"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    os.replace(tmp, path)
    return merged


def _synced(device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work (eval-time only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
