"""DINO (Caron et al. 2021), cookbook section 2.3: self-distillation with multi-crop.

Student: backbone -> DINO head on every view (2 global + N local, one batch per
resolution). Teacher: EMA copy (momentum cosine 0.996 -> 1) on the global views
only. Loss: for each teacher view t and each student view s != t,
H(P_t, P_s) = -sum_k P_t,k log P_s,k with P_t = softmax((g_t - c) / tau_t) (centred
and sharpened) and P_s = softmax(g_s / tau_s), averaged over pairs and images.
Centre c: EMA (0.9) of the teacher's batch-mean output, advanced once per optimizer
step. tau_t warms up 0.04 -> 0.07 over 30 epochs; the head's last layer is frozen
during the first epoch (``before_optimizer_step``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import MethodConfig
from fastssl.distributed import world_size
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import (all_reduce_sum, at_step, ema_update_teachers, embedding_std, forward_by_resolution,
                                     make_teachers, momentum_schedule, resolution_groups, steps_per_epoch)


@dataclass
class DINOConfig(MethodConfig):
    name: str = "dino"
    out_dim: int = 65536            # prototypes K
    hidden: int = 2048
    bottleneck: int = 256
    head_layers: int = 3
    head_bn: bool = False           # BN in the head (DINO uses it for ResNets only)
    momentum: float = 0.996
    momentum_end: float = 1.0
    teacher_temp: float = 0.04      # start of the warm-up
    teacher_temp_end: float = 0.07  # after warmup_teacher_temp_epochs
    warmup_teacher_temp_epochs: float = 30.0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1.0


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
        """Normalised bottleneck (N, bottleneck) -> (N, out_dim) prototype scores."""
        return F.linear(h, F.normalize(self.last_layer.weight.float(), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.project(x))


def teacher_temp_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear start -> end over ``warmup_steps`` then constant; shape (total_steps,)."""
    warm = np.linspace(start, end, max(warmup_steps, 0))
    out = np.concatenate([warm, np.full(max(total_steps - len(warm), 0), end)])[:max(total_steps, 1)]
    return out if len(out) else np.array([end])


@register_method("dino", config=DINOConfig, recipe="dino")
class DINO(MethodHooks, nn.Module):
    def __init__(self, cfg, total_steps: int):
        super().__init__()
        from fastssl.models import create_backbone

        m = cfg.method
        self.cfg = m
        self.backbone, self.feat_dim = create_backbone(cfg.model)
        self.head = DINOHead(self.feat_dim, m.out_dim, m.hidden, m.bottleneck, m.head_layers, m.head_bn)
        self.teacher = make_teachers(backbone=self.backbone, head=self.head)
        spe = steps_per_epoch(cfg, total_steps)
        self.momentum = momentum_schedule(m.momentum, total_steps, m.momentum_end)
        self.teacher_temp = teacher_temp_schedule(m.teacher_temp, m.teacher_temp_end,
                                                  int(round(m.warmup_teacher_temp_epochs * spe)), total_steps)
        self.freeze_steps = int(round(m.freeze_last_layer_epochs * spe))
        self.register_buffer("center", torch.zeros(1, m.out_dim))
        self._center_sum: torch.Tensor | None = None                         # this step's teacher outputs (pending)
        self._center_n = 0

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        n_glob = resolution_groups(views)[0][1]                             # the leading full-size views
        feats_all = forward_by_resolution(self.backbone, views)            # (V*B, F), one call per resolution
        h = self.head.project(feats_all)                                    # (V*B, bottleneck): z_std's tensor
        s = self.head.score(h) / self.cfg.student_temp                      # (V*B, K), fp32
        with torch.no_grad():
            g = self.teacher["head"](self.teacher["backbone"](torch.cat(views[:n_glob])))  # (G*B, K)
            tt = at_step(self.teacher_temp, step)
            pt = F.softmax((g - self.center) / tt, dim=-1)                 # centred + sharpened targets
            self._stage_center(g)
        loss = dino_loss(pt.chunk(n_glob), F.log_softmax(s, dim=-1).chunk(len(views)))
        with torch.no_grad():
            ent = -(pt * torch.log(pt.clamp_min(1e-12))).sum(-1).mean()     # -> 0: collapse to one dim
            pbar = pt.mean(0)
            batch_ent = -(pbar * torch.log(pbar.clamp_min(1e-12))).sum()    # -> 0: uniform collapse is high ent
        return {"loss": loss, "features": feats_all[:b].detach(), "teacher_entropy": ent,
                "teacher_batch_entropy": batch_ent, "teacher_temp": torch.tensor(tt),
                "ema_momentum": torch.tensor(at_step(self.momentum, step)),
                "z_std": embedding_std(h[:b])}

    @torch.no_grad()
    def _stage_center(self, g: torch.Tensor) -> None:
        # Summed now, applied in after_step: k micro-batches update the centre like one big batch.
        s = g.float().sum(0, keepdim=True)
        self._center_sum = s if self._center_sum is None else self._center_sum + s
        self._center_n += g.shape[0]

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_steps:                                        # DINO: last layer fixed in epoch 1
            self.head.last_layer.weight.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update_teachers(self.teacher, self, at_step(self.momentum, step))
        if self._center_sum is not None:
            batch_center = all_reduce_sum(self._center_sum) / (self._center_n * world_size())
            cm = self.cfg.center_momentum
            self.center.mul_(cm).add_(batch_center, alpha=1 - cm)
            self._center_sum, self._center_n = None, 0


def dino_loss(teacher_probs, student_logp) -> torch.Tensor:
    """Mean over (teacher view t, student view s != t) pairs of mean_i -sum_k P_t log P_s (cookbook eq. in 2.3)."""
    total, n = 0.0, 0
    for ti, q in enumerate(teacher_probs):
        for si, lp in enumerate(student_logp):
            if si == ti:
                continue                                                    # same crop: skipped
            total = total + (-(q * lp).sum(dim=-1)).mean()
            n += 1
    return total / n
