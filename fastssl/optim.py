"""Optimizers: LARS (timm's, section 3.8.1 for large batches), AdamW, SGD.

Biases and normalisation parameters get no weight decay and, under LARS, no
layer-wise adaptation (timm's Lars adapts only groups with weight decay), as in
SimCLR/BYOL. The groups come from the method's ``param_groups(weight_decay)`` hook
(:class:`fastssl.methods.SSLMethod`); :class:`fastssl.methods.MethodHooks` gives every
method :func:`default_param_groups`, and a method needing other groups overrides the hook.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of ``model``'s trainable parameters: weights with ``weight_decay``, biases and norms without.

    ``apply_wd`` tells the trainer which group follows the weight-decay schedule.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
    ]


def build_optimizer(method: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """The optimizer over ``method``'s trainable parameters; lr/wd are then set per step by the trainer.

    Groups: ``method.param_groups(weight_decay)`` (the protocol's hook), or
    :func:`default_param_groups` for a plain module without it.
    """
    if hasattr(method, "param_groups"):
        groups = method.param_groups(optim_cfg.weight_decay)
    else:
        groups = default_param_groups(method, optim_cfg.weight_decay)
    groups = [g for g in groups if g["params"]]
    name = optim_cfg.name
    foreach = {"auto": None, "on": True, "off": False}[getattr(optim_cfg, "foreach", "auto")]
    if name == "lars":
        from timm.optim import Lars

        kw = {"foreach": foreach} if _lars_has_foreach() else {}
        return Lars(groups, lr=lr, momentum=optim_cfg.momentum, trust_coeff=optim_cfg.lars_eta, **kw)
    if name == "adamw":
        # fused: one kernel over all parameters (about 3x faster per step on a CPU for ViT-S)
        return torch.optim.AdamW(groups, lr=lr, betas=(optim_cfg.momentum, optim_cfg.beta2), fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, foreach=foreach)
    raise ValueError(f"unknown optimizer {name!r}")


def _lars_has_foreach() -> bool:
    """timm's LARS has a multi-tensor path (and a ``foreach`` argument) from 1.0.31 on; 1.0.29 and 1.0.30, the
    GPU machines' image among them, only loop over the parameters."""
    import inspect

    from timm.optim import Lars

    return "foreach" in inspect.signature(Lars).parameters


def update_path(opt: torch.optim.Optimizer) -> str:
    """How ``opt`` updates the parameters at its next step: ``fused``, ``foreach`` (multi-tensor: a few
    kernel launches per group) or ``single-tensor`` (a Python loop, about ten launches per parameter:
    for ResNet-50's 161 parameters under LARS, over a thousand launches a step).

    ``foreach=None`` resolves as torch and timm both resolve it: the multi-tensor path when every
    parameter is a CUDA tensor.
    """
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    if type(opt).__name__ == "Lars" and not _lars_has_foreach():
        return "single-tensor"
    g = opt.param_groups[0]
    if g.get("fused"):
        return "fused"
    foreach = g.get("foreach")
    if foreach is None:
        foreach = all(p.is_cuda for group in opt.param_groups for p in group["params"])
    return "foreach" if foreach else "single-tensor"
