"""fastssl: fast self-supervised pretraining (the SSL cookbook, Balestriero et al. 2023).

The public Python API, in four parts (each name is imported on first use, so ``import fastssl``
itself loads neither torch nor any optional package):

- data: ``build_loader(data_cfg, views, split, batch_size, device)`` yields ``Batch(views, labels,
  indices)``; ``AugConfig`` / ``ViewSpec`` describe the views (cookbook section 3.1).
- losses (cookbook section 2): ``nt_xent`` (SimCLR; DCL with ``decoupled=True``), ``info_nce``
  (MoCo), ``vicreg``, ``barlow_twins`` (each with a ``*_terms`` twin returning the named terms),
  ``byol_loss``, ``negative_cosine`` (SimSiam), ``dino_loss``, ``swav_loss`` with ``sinkhorn``.
- models: ``create_backbone(name)`` -> ``(module, feat_dim)``, ``ProjectionHead``, ``DINOHead``.
- methods: ``SimCLR``, ``BYOL``, ``DINO``, ... built from plain arguments
  (``SimCLR(backbone="resnet18", proj_dim=128, temperature=0.1)``), or by name with
  ``create_method("simclr", backbone="resnet18")``; ``list_methods()``; ``register_method``.
  A method's ``forward(views, step)`` returns ``{"loss", "features", ...logged scalars}``; call
  ``after_step(step)`` after each optimizer step (EMA teachers, centres, queues).
- ``train(data=..., method=..., backbone=..., out=..., config=..., **overrides)``: trains as ``fastssl-train``
  does and returns the run directory and its summary (``fastssl.train.fit``); ``load_config`` / ``Config``
  build a config for ``fastssl.train.train(cfg)``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute" it is imported from on first use
_LAZY: dict[str, str] = {
    # data
    "build_loader": "fastssl.pipelines.loader:build_loader",
    "Batch": "fastssl.pipelines:Batch",
    "AugConfig": "fastssl.pipelines.recipes:AugConfig",
    "ViewSpec": "fastssl.pipelines.recipes:ViewSpec",
    # config
    "Config": "fastssl.config:Config",
    "load_config": "fastssl.config:load_config",
    # models
    "ProjectionHead": "fastssl.models.heads:ProjectionHead",
    "DINOHead": "fastssl.models.heads:DINOHead",
    # methods
    "create_method": "fastssl.methods:create_method",
    "list_methods": "fastssl.methods:list_methods",
    "register_method": "fastssl.methods:register_method",
    "MethodHooks": "fastssl.methods:MethodHooks",
    "SSLMethod": "fastssl.methods:SSLMethod",
}
_LOSSES = ("nt_xent", "nt_xent_terms", "info_nce", "info_nce_terms", "vicreg", "vicreg_terms", "barlow_twins",
           "barlow_twins_terms", "byol_loss", "negative_cosine", "dino_loss", "swav_loss", "sinkhorn")
_METHODS = ("BarlowTwins", "BYOL", "DCL", "DINO", "MAE", "MoCoV3", "NNCLR", "SimCLR", "SimSiam", "SwAV", "VICReg")
_LAZY.update({n: f"fastssl.losses:{n}" for n in _LOSSES})
_LAZY.update({n: f"fastssl.methods:{n}" for n in _METHODS})

__all__ = sorted([*_LAZY, "create_backbone", "list_backbones", "train", "__version__"])


def create_backbone(name: str, **model_kw: Any):
    """``(module, feat_dim)``: a fastssl backbone (``resnet_tiny``, ``vit_small_patch16``, ...) or any timm model.

    The module maps (B, 3, H, W) -> (B, feat_dim) pooled features. ``model_kw``: the ``model.*``
    config keys (``drop_path``, ``attn``, ...). A :class:`fastssl.config.ModelConfig` is accepted too.
    """
    from fastssl.config import ModelConfig
    from fastssl.models import create_backbone as _create

    cfg = ModelConfig(backbone=name, **model_kw) if isinstance(name, str) else name
    return _create(cfg)


def list_backbones() -> list[str]:
    """The backbones fastssl registers (any timm model name works in ``create_backbone`` too)."""
    from fastssl.models import BACKBONES

    return BACKBONES.names()


def _train_module():
    # fastssl/train.py makes itself callable on import (its module class calls ``fit``), so
    # ``fastssl.train(...)`` works whichever of ``import fastssl.train`` or this lookup came first.
    return importlib.import_module("fastssl.train")


def __getattr__(name: str) -> Any:
    if name == "train":
        return _train_module()
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'fastssl' has no attribute {name!r}")
    mod_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(mod_name), attr)
    globals()[name] = value                     # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
