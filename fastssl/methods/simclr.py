"""SimCLR (Chen et al. 2020), cookbook section 2.2.1: deep metric learning.

backbone -> 2-layer MLP projector -> NT-Xent between the two views of each
image, every other image of the (global, all-process) batch a negative.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastssl import losses
from fastssl.config import TwoViewConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import embedding_std, per_view, resolve_backbone
from fastssl.models.heads import ProjectionHead


@dataclass
class SimCLRConfig(TwoViewConfig):
    name: str = "simclr"
    temperature: float = 0.1        # SimCLR's ImageNet default (0.1 for LARS + large batch; 0.2 in solo-learn)
    proj_hidden: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2
    decoupled: bool = False         # DCL: positive removed from the denominator (see methods/dcl.py)
    loss_dtype: str = "fp32"        # fp32: the projections are cast to fp32 for the loss (the torch path on a GPU) |
                                    # input: they stay in the step's precision (bf16 on a GPU: the fused Triton
                                    # NT-Xent, which normalises and accumulates in fp32); fastssl-bench step compares

    def __post_init__(self):
        from fastssl.config import _choice

        _choice("method.loss_dtype", self.loss_dtype, ("fp32", "input"))


@register_method("simclr", config=SimCLRConfig, recipe="simclr")
class SimCLR(MethodHooks, nn.Module):
    step_free_forward = True  # forward reads no step: train.compile_scope=method compiles it whole

    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 temperature: float = 0.1, proj_hidden: int = 2048, proj_dim: int = 128, proj_layers: int = 2,
                 decoupled: bool = False, joint_bn: bool = False, loss_dtype: str = "fp32"):
        super().__init__()
        self.joint_bn, self.loss_fp32 = joint_bn, loss_dtype == "fp32"
        self.temperature, self.decoupled = temperature, decoupled
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim, layers=proj_layers)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn)            # (2B, proj_dim)
        z1, z2 = z[:b], z[b:]                                         # (B, proj_dim) each
        if self.loss_fp32:
            z1, z2 = z1.float(), z2.float()
        loss = losses.nt_xent(z1, z2, temperature=self.temperature, decoupled=self.decoupled)
        # collapse monitor (the protocol's z_std): -> 0 collapsed, ~1/sqrt(d) healthy
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z1)}
