"""Heads that sit on a backbone's pooled features: the projection/prediction MLP and DINO's head.

Both take (N, in_dim) features. :class:`ProjectionHead` is the SimCLR/BYOL/VICReg MLP
(cookbook section 2: the projector, or "expander", and BYOL's predictor); :class:`DINOHead`
is DINO's MLP to a bottleneck followed by a weight-normalised layer to K prototypes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.models import mlp

__all__ = ["ProjectionHead", "DINOHead"]


class ProjectionHead(nn.Sequential):
    """(Linear-BN-ReLU) x (layers - 1) then Linear (+ affine-free BN with ``bn_last``): (N, in_dim) -> (N, out_dim).

    The same modules in the same order as :func:`fastssl.models.mlp`, so a method's state-dict keys
    (``projector.0.weight`` ...) do not depend on which of the two built it.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, layers: int = 2,
                 bn_last: bool = False, bias_last: bool = True):
        super().__init__(*mlp(in_dim, hidden_dim, out_dim, layers=layers, bn_last=bn_last, bias_last=bias_last))


class DINOHead(nn.Module):
    """MLP (Linear-GELU x (layers-1), to a bottleneck) -> l2-normalise -> weight-normalised Linear (g = 1) to K."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256, layers: int = 3,
                 bn: bool = False):
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.GELU()]
            d = hidden
        mods.append(nn.Linear(d, bottleneck))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Weight norm with the norm fixed to 1 (DINO's norm_last_layer=True): W = V / ||V||_row.
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, bottleneck) l2-normalised, fp32 (the head's projector part)."""
        return F.normalize(self.mlp(x).float(), dim=-1)                        # fp32 around the normalisations

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised bottleneck (N, bottleneck) -> (N, out_dim) prototype scores, fp32 whatever the autocast.

        The teacher's scores are divided by a temperature of 0.04 before its softmax. bf16 rounds a score
        in [-1, 1] to steps of up to 0.004, which the division makes 0.1. DINO and DINOv2 compute this
        layer in fp16 under a gradient scaler; without a scaler, fp32 is the safe choice.
        """
        from fastssl.kernels import autocast_off

        with autocast_off(h):
            return F.linear(h.float(), F.normalize(self.last_layer.weight.float(), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.project(x))
