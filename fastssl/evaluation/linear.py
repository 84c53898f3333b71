"""The papers' linear evaluation (cookbook section 3.7): a linear classifier on the frozen backbone, augmented images.

This is the protocol behind published ImageNet linear figures (SimCLR, Chen et al. 2020,
appendix B.6; solo-learn's ``scripts/linear/imagenet/*.yaml``): every epoch the training
images go through the frozen backbone again with random resized crops and horizontal
flips, so the head never sees the same features twice. It costs a backbone forward per
image per epoch; ``fit_linear_probe`` (offline.py) is the quick protocol on cached
centre-crop features, and its figure is not comparable with the papers'.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Each value with its source. SimCLR appendix B.6 (linear evaluation): SGD with Nesterov momentum,
# lr = 0.1 x BatchSize / 256, 90 epochs, random crops and flips only, no weight decay / regulariser.
# solo-learn's scripts/linear/imagenet/{byol,barlow,mocov2plus}.yaml: batch 256, lr 0.1, weight_decay 0
# (they decay the lr in steps at epochs 60 and 80 over 100 epochs; here cosine decay as SimCLR's code).
SIMCLR_LINEAR = {
    "epochs": 90,              # SimCLR B.6
    "batch_size": 256,         # solo-learn linear/imagenet (SimCLR used 4096 with the same lr rule)
    "base_lr": 0.1,            # lr = base_lr x batch / 256: SimCLR B.6; solo-learn lr 0.1 at batch 256
    "momentum": 0.9,           # SimCLR B.6 (Nesterov)
    "nesterov": True,          # SimCLR B.6
    "weight_decay": 0.0,       # SimCLR B.6 ("no regularisation"); solo-learn weight_decay: 0
    "schedule": "cosine decay per step, no warm-up",  # SimCLR's code (cosine learning rate decay)
    "crop_scale": (0.08, 1.0),  # random resized crop, the torchvision/Inception default (SimCLR B.6)
    "crop_ratio": (3 / 4, 4 / 3),
    "flip_p": 0.5,             # horizontal flips (SimCLR B.6)
}


def train_view(size: int):
    """The protocol's training view: random resized crop (0.08-1) and flip; no colour, blur or solarisation."""
    from fastssl.pipelines.recipes import ViewSpec

    p = SIMCLR_LINEAR
    return ViewSpec(size=size, scale_min=p["crop_scale"][0], scale_max=p["crop_scale"][1],
                    ratio_min=p["crop_ratio"][0], ratio_max=p["crop_ratio"][1], flip_p=p["flip_p"],
                    jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def protocol_loader(cfg, split: str, batch_size: int, device, seed: int = 0):
    """The protocol's loader of ``split`` through fastssl's loader: the train split with :func:`train_view`'s
    random resized crops and flips, shuffled; the val split centre-cropped, in order. Every image kept."""
    from fastssl.pipelines.loader import build_loader

    train = split == "train"
    return build_loader(cfg.data, [train_view(cfg.aug.global_size)], split, batch_size, device, seed=seed,
                        train=train, backend=cfg.data.backend, workers=cfg.data.workers, drop_last=False)


def _embed(method, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) views -> (B, F) fp32 frozen features, under the autocast the views were made for."""
    low = x.dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=x.dtype if low else torch.bfloat16, enabled=low):
        return method.embed(x).float()


def linear_protocol(cfg, method, device, num_classes: int | None = None, *, epochs: int | None = None,
                    batch_size: int | None = None, seed: int = 0, progress: bool = False,
                    loaders: dict | None = None, state_path: str | Path | None = None,
                    weights: str | None = None) -> dict:
    """Train a linear head on ``method``'s frozen backbone with SimCLR's linear protocol; top-1/top-5 on val centre crops.

    The training split is read through fastssl's loader (``build_loader`` with :func:`train_view`)
    on ``device`` every epoch; the val split is centre-cropped at ``cfg.aug.global_size``.
    ``epochs`` / ``batch_size``: default 90 / 256 (:data:`SIMCLR_LINEAR`); the learning rate
    follows the batch (0.1 x batch / 256). ``loaders``: ``{"train": ..., "val": ...}`` to use
    instead (tests). ``num_classes``: default, the training split's. Returns ``linear_top1``,
    ``linear_top5`` (percent) and ``linear_protocol`` (``name`` "simclr" and every setting used).

    ``state_path`` with ``weights`` (the backbone's :func:`~fastssl.evaluation.offline.weights_fingerprint`):
    the head and its optimiser are saved there after every epoch (atomically), and a later call
    with the same weights, data and settings resumes after the last saved epoch. On ImageNet the
    protocol takes hours; an interrupted one loses at most an epoch.
    """
    from fastssl.compile import eager
    from fastssl.evaluation.offline import data_identity

    p = SIMCLR_LINEAR
    epochs = int(epochs or p["epochs"])
    batch_size = int(batch_size or p["batch_size"])
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"linear protocol needs epochs >= 1 and batch size >= 1 (got {epochs}, {batch_size})")
    device = torch.device(device)
    size = cfg.aug.global_size
    if loaders is None:
        loaders = {"train": protocol_loader(cfg, "train", batch_size, device, seed=seed),
                   "val": protocol_loader(cfg, "val", 256, device)}
    train_ld, val_ld = loaders["train"], loaders["val"]
    num_classes = num_classes or getattr(train_ld, "num_classes", None)
    if not num_classes:
        raise ValueError(f"linear evaluation needs labels: {cfg.data.train} has none")
    method.eval()  # frozen: batch-norm statistics as trained; features under no_grad (no gradient reaches it)
    lr = p["base_lr"] * batch_size / 256
    head = opt = None  # built at the first batch, when the feature width is known
    steps = epochs * max(1, len(train_ld))
    k = start = 0
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    state = _ProtocolState(state_path, {
        "weights": weights, "train": str(cfg.data.train), "data": data_identity(str(cfg.data.train)),
        "image_size": size, "epochs": epochs, "batch_size": batch_size, "seed": seed, "num_classes": num_classes,
    }) if state_path is not None and weights is not None else None
    saved = state.load() if state else None
    if saved is not None:
        out_f, in_f = saved["head"]["weight"].shape
        head = nn.Linear(in_f, out_f).to(device)
        head.load_state_dict(saved["head"])
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=p["momentum"], nesterov=p["nesterov"],
                              weight_decay=p["weight_decay"])
        opt.load_state_dict(saved["opt"])
        start, k = int(saved["epoch"]), int(saved["k"])
        log.info("linear protocol simclr: resuming after epoch %d/%d from %s", start, epochs, state_path)
    with eager(method.backbone):
        for epoch in range(start, epochs):
            train_ld.set_epoch(epoch)  # the epoch's shuffle and crops
            seen = 0
            for batch in train_ld:
                if batch.labels is None:
                    raise ValueError(f"linear evaluation needs labels: {cfg.data.train} yields none")
                f = _embed(method, batch.views[0])                                   # (B, F)
                if head is None:
                    head = nn.Linear(f.shape[1], num_classes)
                    with torch.no_grad():  # seeded init: the same head for the same seed on any device
                        bound = 1 / math.sqrt(f.shape[1])
                        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=g))
                        head.bias.zero_()
                    head = head.to(device)
                    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=p["momentum"],
                                          nesterov=p["nesterov"], weight_decay=p["weight_decay"])
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * k / steps))  # cosine decay per step
                with torch.enable_grad():
                    loss = F.cross_entropy(head(f), batch.labels.to(device).long())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                k += 1
                seen += len(f)
            if progress:
                log.info("linear protocol simclr: epoch %d/%d, %d images, loss %.3f", epoch + 1, epochs, seen,
                         float(loss.detach()))
            if state is not None and head is not None:
                state.save({"epoch": epoch + 1, "k": k, "head": head.state_dict(), "opt": opt.state_dict()})
        if head is None:
            raise ValueError(f"linear evaluation got no training batches from {cfg.data.train}")
        # Counts stay on the device and are read once after the loop: a read per batch would make the
        # GPU wait for the loader's next batch each time.
        correct1 = torch.zeros((), dtype=torch.long, device=device)
        correct5 = torch.zeros((), dtype=torch.long, device=device)
        n = 0
        val_ld.set_epoch(0)
        with torch.no_grad():
            for batch in val_ld:
                logits = head(_embed(method, batch.views[0]))                       # (B, C)
                y = batch.labels.to(device).long()
                top = logits.topk(min(5, num_classes), dim=1).indices               # (B, 5)
                correct1 += (top[:, 0] == y).sum()
                correct5 += (top == y[:, None]).any(1).sum()
                n += len(y)
        correct1, correct5 = int(correct1), int(correct5)
    if n == 0:
        raise ValueError(f"linear evaluation got no validation images from {cfg.data.val}")
    return {
        "linear_top1": 100.0 * correct1 / n,
        "linear_top5": 100.0 * correct5 / n,
        "linear_protocol": {
            "name": "simclr", "source": "SimCLR (Chen et al. 2020) appendix B.6; solo-learn linear/imagenet",
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "base_lr": p["base_lr"], "lr_rule": "base_lr x batch / 256",
            "optimizer": f"SGD, Nesterov momentum {p['momentum']}", "weight_decay": p["weight_decay"],
            "schedule": p["schedule"], "augmentation": f"random resized crop scale {p['crop_scale']}, "
                                                      f"horizontal flip p={p['flip_p']}, {size} px",
            "eval": f"centre crop at {size} px", "backbone": "frozen, eval mode (batch-norm statistics fixed)",
            "train_size": getattr(train_ld, "num_samples", None), "val_size": n, "steps": k,
            "resumed_after_epoch": start, "seconds": time.perf_counter() - t0,
        },
    }


class _ProtocolState:
    """The protocol's head and optimiser after each epoch, in one file, keyed by what the result depends on.

    A file with another key (other weights, data or settings) is ignored and replaced. A save that
    fails (a full disk) logs one warning and stops saving: the protocol goes on, only its resume is lost.
    """

    def __init__(self, path: str | Path, key: dict):
        self.path, self.key, self.failed = Path(path), key, False

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: start over
            log.warning("linear protocol state %s unreadable (%s): starting from epoch 0", self.path, e)
            return None
        if saved.get("key") != self.key:
            log.info("linear protocol state %s is for other weights, data or settings: starting from epoch 0",
                     self.path)
            return None
        return saved

    def save(self, state: dict) -> None:
        if self.failed:  # one warning, not one per epoch
            return
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            torch.save({"key": self.key, **state}, tmp)
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("linear protocol state %s not written (%s): the protocol goes on, but cannot resume",
                        self.path, e.strerror or e)
            self.failed = True
