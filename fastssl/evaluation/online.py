"""kNN and RankMe of a model during training (cookbook section 3.7), with the protocol recorded beside the figure."""
from __future__ import annotations

import torch

from fastssl.config import Config


@torch.no_grad()
def evaluate_knn(method, train_loader, val_loader, cfg: Config, device, num_classes: int, max_val: int = 0) -> dict:
    """kNN top-1 (section 3.7.1) and RankMe (section 3.7.2) of backbone features; protocol included."""
    from fastssl.evaluation import extract_features, knn_top1, rankme

    from fastssl.compile import eager

    was_training = method.training
    method.eval()
    embed = method.embed
    with eager(method.backbone):  # no new graphs for eval batch sizes / no_grad
        shown = cfg.train.progress  # progress of the extraction (fastssl.progress: rank 0, not quiet)
        tr_x, tr_y = extract_features(embed, train_loader, device, progress="eval: train features" if shown else None)
        va_x, va_y = extract_features(embed, val_loader, device, max_samples=max_val or None,
                                      progress="eval: val features" if shown else None)
    top1 = knn_top1(tr_x, tr_y, va_x, va_y, num_classes=num_classes, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    rm = rankme(va_x)
    method.train(was_training)
    protocol = {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, "similarity": "cosine, weighted votes",
                "features": f"backbone pooled ({cfg.model.backbone})", "image_size": cfg.aug.global_size,
                "train_split": f"{cfg.data.train} ({len(tr_y)} images, centre crop)",
                "eval_split": f"{cfg.data.val} ({len(va_y)} images, centre crop)"}
    return {"knn_top1": float(top1), "rankme": float(rm), "protocol": protocol}
