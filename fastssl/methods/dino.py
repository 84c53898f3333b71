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

from fastssl import losses
from fastssl.config import MethodConfig
from fastssl.distributed import world_size
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import (all_reduce_sum, at_step, ema_update_teachers, embedding_std, log_scalar, epochs_to_steps,
                                     forward_by_resolution, make_teachers, momentum_schedule, resolution_groups,
                                     resolve_backbone)
from fastssl.models.heads import DINOHead


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


def teacher_temp_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear start -> end over ``warmup_steps`` then constant; shape (total_steps,)."""
    warm = np.linspace(start, end, max(warmup_steps, 0))
    out = np.concatenate([warm, np.full(max(total_steps - len(warm), 0), end)])[:max(total_steps, 1)]
    return out if len(out) else np.array([end])


@register_method("dino", config=DINOConfig, recipe="dino")
class DINO(MethodHooks, nn.Module):
    def __init__(self, backbone: str | nn.Module = "vit_small_patch16", *, feat_dim: int | None = None,
                 out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256, head_layers: int = 3,
                 head_bn: bool = False, momentum: float = 0.996, momentum_end: float = 1.0, teacher_temp: float = 0.04,
                 teacher_temp_end: float = 0.07, warmup_teacher_temp_epochs: float = 30.0, student_temp: float = 0.1,
                 center_momentum: float = 0.9, freeze_last_layer_epochs: float = 1.0, total_steps: int | None = None,
                 steps_per_epoch: float | None = None):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.head = DINOHead(self.feat_dim, out_dim, hidden, bottleneck, head_layers, head_bn)
        self.teacher = make_teachers(backbone=self.backbone, head=self.head)
        self.momentum = momentum_schedule(momentum, total_steps, momentum_end)
        warm = epochs_to_steps(warmup_teacher_temp_epochs, steps_per_epoch)
        # (total_steps,) per-step temperatures; an unknown run length keeps the warm-up, then holds the end value
        self.teacher_temp = teacher_temp_schedule(teacher_temp, teacher_temp_end, warm,
                                                  total_steps if total_steps is not None else warm + 1)
        self.freeze_steps = epochs_to_steps(freeze_last_layer_epochs, steps_per_epoch)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._center_sum: torch.Tensor | None = None                         # this step's teacher outputs (pending)
        self._center_n = 0

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        n_glob = resolution_groups(views)[0][1]                             # the leading full-size views
        feats_all = forward_by_resolution(self.backbone, views)            # (V*B, F), one call per resolution
        h = self.head.project(feats_all)                                    # (V*B, bottleneck): z_std's tensor
        s = self.head.score(h) / self.student_temp                      # (V*B, K), fp32
        with torch.no_grad():
            g = self.teacher["head"](self.teacher["backbone"](torch.cat(views[:n_glob])))  # (G*B, K)
            tt = at_step(self.teacher_temp, step)
            pt = F.softmax((g - self.center) / tt, dim=-1)                 # centred + sharpened targets
            self._stage_center(g)
        loss = losses.dino_loss(pt.chunk(n_glob), F.log_softmax(s, dim=-1).chunk(len(views)))
        with torch.no_grad():
            ent = -(pt * torch.log(pt.clamp_min(1e-12))).sum(-1).mean()     # -> 0: collapse to one dim
            pbar = pt.mean(0)
            batch_ent = -(pbar * torch.log(pbar.clamp_min(1e-12))).sum()    # -> 0: uniform collapse is high ent
        return {"loss": loss, "features": feats_all[:b].detach(), "teacher_entropy": ent,
                "teacher_batch_entropy": batch_ent, "teacher_temp": log_scalar(tt, loss),
                "ema_momentum": log_scalar(at_step(self.momentum, step), loss),
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
            cm = self.center_momentum
            self.center.mul_(cm).add_(batch_center, alpha=1 - cm)
            self._center_sum, self._center_n = None, 0

