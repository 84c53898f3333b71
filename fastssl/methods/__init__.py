"""SSL methods, one small file each, registered by name, and the protocol they follow.

A method is an ``nn.Module`` built as ``cls(cfg, total_steps)`` that owns its modules
(backbone, heads, teacher). :class:`SSLMethod` below is the whole contract, in code: the
trainer (``fastssl/train.py``), ``fastssl-bench step``, evaluation and export use nothing else.
Methods subclass :class:`MethodHooks` (before ``nn.Module``), which supplies every hook a
method may leave out, so only what a method changes is written in its file.

- ``backbone`` (``nn.Module``, (B, 3, H, W) -> (B, feat_dim) pooled features) and
  ``feat_dim`` (int). The trainer may ``torch.compile`` the backbone in place.
- ``forward(views, step) -> dict``: ``views`` is the Batch's list of normalised
  (B, 3, S, S) tensors (globals first, then locals); returns ``"loss"`` (scalar, with
  grad), ``"features"`` ((B, feat_dim) detached backbone features of ``views[0]``, for the
  online probe) and any other scalar tensors to log (detached; the trainer syncs them only
  every ``log_every`` steps). Shared log names mean the same tensor in every method:
  ``z_std`` is :func:`fastssl.methods._common.embedding_std` of the *projector* output of
  ``views[0]`` (online/student branch, before any predictor; DINO: its head's MLP up to the
  bottleneck); a method without a projector (MAE) does not log it. Other tensors carry
  other names (BYOL's ``target_std``: the EMA target's projection).
- ``after_step(step)``: once per *optimizer* step (EMA teacher, centre, queue), never per
  micro-batch, so gradient accumulation does not change them. Default: nothing.
- ``before_optimizer_step(step)``: after backward and clipping, before the optimizer step
  (DINO's last-layer / SwAV's prototype freezing). Default: nothing.
- ``embed(images) -> (B, feat_dim)``: backbone features for evaluation. Default:
  ``self.backbone(images)``.
- ``param_groups(weight_decay) -> list[dict]``: the optimizer's groups
  (:func:`fastssl.optim.build_optimizer` calls it). Default:
  :func:`fastssl.optim.default_param_groups` (no decay on biases and norms).

State that must survive a resume lives in registered buffers and submodules (teachers,
centres, queues), so ``state_dict()`` checkpoints it; there is no other state hook.

Register with ``@register_method("name", config=NameConfig, recipe="simclr")``;
the config class subclasses :class:`fastssl.config.MethodConfig`. Tests
iterate over :data:`METHODS`, so a new method is tested once registered.
"""
from __future__ import annotations

import importlib
import pkgutil

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from fastssl.registry import Registry

METHODS: Registry = Registry("method")


@runtime_checkable
class SSLMethod(Protocol):
    """What every registered method provides (see the module docstring for each member's contract)."""

    backbone: nn.Module
    feat_dim: int

    def __call__(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]: ...

    def after_step(self, step: int) -> None: ...

    def before_optimizer_step(self, step: int) -> None: ...

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def param_groups(self, weight_decay: float) -> list[dict]: ...


class MethodHooks:
    """Defaults for :class:`SSLMethod`'s hooks: no-ops, backbone features, the default optimizer groups.

    Mix in before ``nn.Module`` (``class SimCLR(MethodHooks, nn.Module)``); a method overrides
    only the hooks it needs, so a hook's presence in a file says the method uses it.
    """

    def after_step(self, step: int) -> None:
        """Once per optimizer step, after it (EMA teachers, centres, queues advance here)."""

    def before_optimizer_step(self, step: int) -> None:
        """After backward and gradient clipping, before the optimizer step (freeze a layer's grads here)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, feat_dim) backbone features, for evaluation and export."""
        return self.backbone(images)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups: by default, no weight decay on biases and normalisation parameters."""
        from fastssl.optim import default_param_groups

        return default_param_groups(self, weight_decay)


def register_method(name: str, *, config: type, recipe: str = "simclr"):
    """Class decorator: register a method with its config dataclass and default augmentation recipe."""
    return METHODS.register(name, config=config, recipe=recipe)


def create_method(cfg, total_steps: int):
    """Build the method named by ``cfg.method.name``."""
    return METHODS.get(cfg.method.name)(cfg, total_steps)


def _import_all() -> None:
    # Every module in this package registers itself on import.
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


_import_all()
