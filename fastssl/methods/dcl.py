"""DCL, decoupled contrastive learning (Yeh et al. 2022), cookbook section 2.2.1.

SimCLR with the positive pair removed from NT-Xent's denominator, which removes
the negative-positive coupling that makes SimCLR need large batches.
"""
from __future__ import annotations

from dataclasses import dataclass

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
