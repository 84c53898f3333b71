"""kNN and RankMe of a model during training (cookbook section 3.7), with the protocol recorded beside the figure."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from fastssl.config import Config

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_knn(method, train_loader, val_loader, cfg: Config, device, num_classes: int, max_val: int = 0, *,
                 cache_dir: str | Path | None = None, step: int | None = None) -> dict:
    """kNN top-1 (section 3.7.1) and RankMe (section 3.7.2) of backbone features; protocol and cost included.

    Features stay on ``device`` (``extract_features``) and the kNN runs there in bounded
    blocks (``knn_scores``). With ``cache_dir`` (the run directory) and ``step`` (the step of the
    checkpoint these weights are saved in), the features are also written to that run's feature
    cache under the keys ``fastssl-eval`` reads (``offline.feature_meta``), so a later
    ``fastssl-eval RUN --knn`` loads them instead of extracting again. The val features are
    written only when they cover the whole split (``max_val`` 0). Written caches overwrite any
    file of the same step: this evaluation's weights are the checkpoint's.

    Returns ``knn_top1``, ``rankme``, ``protocol``, and the cost in seconds: ``eval_seconds``
    (all of it), ``eval_features_seconds`` (extraction), ``eval_knn_seconds`` (the kNN),
    ``eval_cache_seconds`` (writing the cache; 0.0 without ``cache_dir``).
    """
    from fastssl.compile import eager
    from fastssl.evaluation import extract_features, knn_top1, rankme
    from fastssl.evaluation.offline import feature_cache_path, feature_meta, weights_fingerprint, write_feature_cache

    if cache_dir is not None and step is None:
        raise ValueError("evaluate_knn: cache_dir needs the checkpoint's step (step=...) to key the feature cache")
    t0 = _synced(device)
    was_training = method.training
    method.eval()
    embed = method.embed
    with eager(method.backbone):  # no new graphs for eval batch sizes / no_grad
        shown = cfg.train.progress  # progress of the extraction (fastssl.progress: rank 0, not quiet)
        tr_x, tr_y = extract_features(embed, train_loader, device, progress="eval: train features" if shown else None)
        va_x, va_y = extract_features(embed, val_loader, device, max_samples=max_val or None,
                                      progress="eval: val features" if shown else None)
    t_feat = _synced(device)
    stats: dict = {}
    top1 = knn_top1(tr_x, tr_y, va_x, va_y, num_classes=num_classes, k=cfg.eval.knn_k,
                    temperature=cfg.eval.knn_temperature, device=device, stats=stats)  # .item(): synced
    rm = rankme(va_x)
    t_knn = time.perf_counter()
    written = []
    if cache_dir is not None:
        weights = weights_fingerprint(method)
        splits = [("train", tr_x, tr_y)] + ([("val", va_x, va_y)] if not max_val else [])
        for split, x, y in splits:
            path = feature_cache_path(cache_dir, split, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_feature_cache(path, x, y, feature_meta(cfg, split, step, weights))
            written.append(str(path))
    t_end = time.perf_counter()
    method.train(was_training)
    protocol = {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, "similarity": "cosine, weighted votes",
                "features": f"backbone pooled ({cfg.model.backbone})", "image_size": cfg.aug.global_size,
                "train_split": f"{cfg.data.train} ({len(tr_y)} images{_every(train_loader)}, centre crop)",
                "eval_split": f"{cfg.data.val} ({len(va_y)} images, centre crop)",
                "knn_device": stats.get("device"), "knn_memory_budget_bytes": stats.get("budget_bytes"),
                "knn_block": [stats.get("chunk_test"), stats.get("chunk_train")]}
    if written:
        protocol["feature_cache"] = written
    return {"knn_top1": float(top1), "rankme": float(rm), "protocol": protocol, "eval_train_images": len(tr_y),
            "eval_seconds": t_end - t0, "eval_features_seconds": t_feat - t0, "eval_knn_seconds": t_knn - t_feat,
            "eval_cache_seconds": t_end - t_knn}


def _every(loader) -> str:
    k = getattr(loader, "stride", 1)
    return f": 1 in {k}" if k > 1 else ""


def _synced(device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work (evaluation only: a host sync)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
