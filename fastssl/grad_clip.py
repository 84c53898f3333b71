"""Gradient clipping as the recipes' reference code does it (``optim.clip_grad``, ``optim.clip_mode``).

Two rules differ by far more than their thresholds suggest:

- ``global``: one norm over every gradient, all scaled by the same factor when it exceeds
  ``max_norm`` (``torch.nn.utils.clip_grad_norm_``; DINOv2 applies it to each of its student's
  modules, ``dinov2/train/train.py``).
- ``per_param``: each parameter tensor's gradient is scaled on its own to norm at most
  ``max_norm``, as DINO's ``utils.clip_gradients`` (facebookresearch/dino, ``utils.py``) does:
  ``clip_coef = clip / (param_norm + 1e-6)``, applied when below 1. A ViT-B has about 150
  tensors, so the global norm is roughly sqrt(150) times a typical tensor's: DINO's 0.3
  per tensor corresponds to a global threshold of several units, not 0.3.

Under FSDP2 a gradient is a sharded DTensor; its norm is gathered (``full_tensor``) so each
parameter is clipped by its whole norm, as on one device.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

CLIP_MODES = ("global", "per_param")
_EPS = 1e-6  # DINO's utils.clip_gradients


def _full(norm: torch.Tensor) -> torch.Tensor:
    """A DTensor norm (sharded gradient) as its full value; a plain tensor unchanged."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip the gradients of ``params`` in place; returns the norm(s) before clipping.

    ``mode="global"``: a 0-dim tensor, the total norm (as ``clip_grad_norm_``).
    ``mode="per_param"``: a 1-d tensor, one norm per parameter that has a gradient, in order.
    Parameters without a gradient are skipped. Gradients must be unscaled already (a GradScaler's
    ``unscale_``) when mixed precision scales the loss.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode {mode!r}: expected one of {', '.join(CLIP_MODES)}")
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm}: must be > 0 (0 turns clipping off: do not call)")
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(0 if mode == "per_param" else ())
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params]
    norms = [_full(torch.linalg.vector_norm(g.detach(), 2, dtype=torch.float32)) for g in grads]
    for g, n in zip(grads, norms):
        g.mul_((max_norm / (n + _EPS)).clamp(max=1.0).to(g.dtype))
    return torch.stack([n.to(norms[0].device) for n in norms])
