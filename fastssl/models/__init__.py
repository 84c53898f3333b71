"""Backbones (timm, CIFAR-stem ResNets, tiny CPU-sized ResNets) and heads.

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


def _small_resnet(channels: tuple[int, int, int, int], drop_path: float, stem_stride: int = 1) -> tuple[nn.Module, int]:
    from timm.models.resnet import BasicBlock, ResNet

    net = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=0, channels=channels,
                 drop_path_rate=drop_path)
    # A 3x3 stride-1 stem without max-pool, as wide as the first stage: small images keep
    # their resolution (CIFAR-style), and no 1x1 projection is needed into stage 1.
    c0 = channels[0]
    net.conv1 = nn.Conv2d(3, c0, 3, stem_stride, 1, bias=False)
    net.bn1 = nn.BatchNorm2d(c0)
    net.maxpool = nn.Identity()
    net.layer1[0] = BasicBlock(c0, c0)
    return net, net.num_features


@register_backbone("resnet_tiny")
def resnet_tiny(model_cfg) -> tuple[nn.Module, int]:
    """A 4-stage ResNet (timm BasicBlocks, one per stage, widths 32-256) for CPU runs at 32-64 px."""
    return _small_resnet((32, 64, 128, 256), model_cfg.drop_path)


@register_backbone("resnet_nano")
def resnet_nano(model_cfg) -> tuple[nn.Module, int]:
    """``resnet_tiny`` at half width (16-128): about 2x the images/s on 2 CPU cores, for the demo."""
    return _small_resnet((16, 32, 64, 128), model_cfg.drop_path)


@register_backbone("resnet_nano_s2")
def resnet_nano_s2(model_cfg) -> tuple[nn.Module, int]:
    """``resnet_nano`` with a stride-2 stem: every stage at half the resolution, ~4x fewer FLOPs.

    The demo's backbone: at 32 px views (16 px after the stem, 2 px in the last stage) it trained at
    2.5x resnet_nano's images/s on 2 cores, and 75 epochs of it reached a higher kNN top-1 (39.0)
    than 60 of resnet_nano (35.2) in 205 s against about 400 s (configs/demo/simclr.yaml).
    """
    return _small_resnet((16, 32, 64, 128), model_cfg.drop_path, stem_stride=2)


def _timm_resnet(name: str):
    def build(model_cfg) -> tuple[nn.Module, int]:
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=model_cfg.drop_path)
        return net, net.num_features

    return build


for _n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet200"):
    register_backbone(_n)(_timm_resnet(_n))

# solo-learn's CIFAR stem (solo/methods/base.py, BaseMethod.__init__, when data.dataset is cifar10/cifar100):
#   conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False); maxpool = nn.Identity()
# padding=2 is solo-learn's (a 32 px image becomes 34 px, and the last stage's map 5x5); lightly's
# ResNetGenerator (lightly/models/resnet.py) pads by 1 (4x4). The CIFAR recipes replicate solo-learn's tables.
CIFAR_STEM_PADDING = 2


def _cifar_resnet(name: str):
    def build(model_cfg) -> tuple[nn.Module, int]:
        # timm's ResNet with only the stem's conv replaced and its max-pool removed: every other module and
        # state-dict key is timm's (bn1, layer1-4 unchanged), so checkpoints, FSDP wrapping and the native
        # export treat it as the ImageNet model with a 3x3 conv1 (64 x 3 x 3 x 3).
        net, dim = _timm_resnet(name)(model_cfg)
        stem = net.conv1
        net.conv1 = nn.Conv2d(3, stem.out_channels, kernel_size=3, stride=1, padding=CIFAR_STEM_PADDING, bias=False)
        net.maxpool = nn.Identity()
        return net, dim

    build.__doc__ = (f"timm's {name} with solo-learn's CIFAR stem (3x3 conv, stride 1, padding "
                     f"{CIFAR_STEM_PADDING}; no max-pool), for 32-96 px images.")
    return build


for _n in ("resnet18", "resnet50"):
    register_backbone(f"{_n}_cifar")(_cifar_resnet(_n))


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
