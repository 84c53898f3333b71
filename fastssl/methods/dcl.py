"""DCL, decoupled contrastive learning (Yeh et al. 2022), cookbook section 2.2.1.

SimCLR with the positive pair removed from NT-Xent's denominator, which removes
the negative-positive coupling that makes SimCLR need large batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from fastssl.methods import register_method
from fastssl.methods.simclr import SimCLR, SimCLRConfig


@dataclass
class DCLConfig(SimCLRConfig):
    name: str = "dcl"
    temperature: float = 0.1        # DCL paper's ImageNet setting
    decoupled: bool = True


@register_method("dcl", config=DCLConfig, recipe="simclr")
class DCL(SimCLR):
    """SimCLR's model and forward; ``decoupled=True`` switches the loss (``losses.nt_xent``)."""

    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 temperature: float = 0.1, proj_hidden: int = 2048, proj_dim: int = 128, proj_layers: int = 2,
                 decoupled: bool = True, joint_bn: bool = False, loss_dtype: str = "fp32"):
        super().__init__(backbone, feat_dim=feat_dim, temperature=temperature, proj_hidden=proj_hidden,
                         proj_dim=proj_dim, proj_layers=proj_layers, decoupled=decoupled, joint_bn=joint_bn,
                         loss_dtype=loss_dtype)
