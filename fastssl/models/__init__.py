"""Backbones (timm, plus a tiny CPU-sized ResNet) and heads.

``create_backbone(model_cfg) -> (module, feat_dim)``: the module maps
(B, 3, H, W) -> (B, feat_dim) pooled features, at any input size.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastssl.registry import Registry

BACKBONES: Registry = Registry("backbone")


def register_backbone(name: str):
    return BACKBONES.register(name)


@register_backbone("resnet_tiny")
def resnet_tiny(model_cfg) -> tuple[nn.Module, int]:
    """A 4-stage ResNet (timm BasicBlocks, one per stage, widths 32-256) for CPU demos at 32-64 px."""
    import timm
    from timm.models.resnet import BasicBlock, ResNet

    net = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=0,
                 channels=(32, 64, 128, 256), drop_path_rate=model_cfg.drop_path)
    # A 3x3 stride-1 stem without max-pool: small images keep their resolution (CIFAR-style).
    net.conv1 = nn.Conv2d(3, net.bn1.num_features, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    del timm
    return net, net.num_features


def _timm_resnet(name: str):
    def build(model_cfg) -> tuple[nn.Module, int]:
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=model_cfg.drop_path)
        return net, net.num_features

    return build


for _n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet200"):
    register_backbone(_n)(_timm_resnet(_n))


def create_backbone(model_cfg) -> tuple[nn.Module, int]:
    """Build the backbone named ``model_cfg.backbone`` (fastssl registry first, else any timm model)."""
    name = model_cfg.backbone
    if name in BACKBONES:
        return BACKBONES.get(name)(model_cfg)
    import timm

    if name in timm.list_models():
        net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=model_cfg.drop_path)
        return net, net.num_features
    raise KeyError(f"unknown backbone {name!r}: {BACKBONES.names()} or any timm model name")


def mlp(in_dim: int, hidden: int, out: int, layers: int = 2, bn_last: bool = False, bias_last: bool = True) -> nn.Sequential:
    """Projector/predictor MLP: (Linear-BN-ReLU) x (layers-1) then Linear (+BN), as in SimCLR/BYOL/VICReg."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out, bias=bias_last and not bn_last))
    if bn_last:
        mods.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*mods)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


__all__ = ["BACKBONES", "create_backbone", "register_backbone", "mlp", "count_params", "torch"]
from fastssl.models import vit as _vit  # noqa: E402,F401  (registers ViTs)
