"""Per-step schedules, precomputed (the DINOv2 ``CosineScheduler`` pattern).

Each is a NumPy array of length ``total_steps``, indexed by the optimizer step:
pure functions of the step, so a resumed run continues them exactly.
"""
from __future__ import annotations

import math

import numpy as np


def cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` then half-cosine to ``final``; shape (total_steps,)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))
    out = np.concatenate([warm, cos])
    assert len(out) == total_steps, (len(out), total_steps)
    return out


def progressive_size(epoch: int, epochs: int, start: int, end: int, end_frac: float, multiple: int) -> int:
    """Progressive resolution (FFCV's ResNet recipe): global-view size for ``epoch``.

    Linear from ``start`` at epoch 0 to ``end`` at ``end_frac * epochs``, rounded
    down to ``multiple`` px so ``torch.compile`` sees few distinct shapes.
    """
    if not start or start >= end:
        return end
    last = max(end_frac * epochs - 1, 1)
    size = start + (end - start) * min(epoch / last, 1.0)
    return int(min(end, max(start, size // multiple * multiple)))
