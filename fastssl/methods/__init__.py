"""SSL methods, one small file each, registered by name.

A method is an ``nn.Module`` built as ``cls(cfg, total_steps)`` that owns its
modules (backbone, heads, teacher) and exposes:

- ``forward(views, step) -> dict``: ``views`` is the Batch's list of
  normalised (B, 3, S, S) tensors (globals first, then locals); returns
  ``"loss"`` (scalar, with grad), ``"features"`` ((B, F) detached backbone
  features of ``views[0]``, for the online probe) and any other scalar tensors
  to log (detached; the trainer syncs them only every ``log_every`` steps).
- ``after_step(step)``: once per *optimizer* step (EMA teacher, centre, queue),
  never per micro-batch, so gradient accumulation does not change them.
- ``embed(images) -> (B, F)``: backbone features for evaluation.
- optional ``before_optimizer_step(step)``: after backward and clipping,
  before the optimizer step (DINO's last-layer / SwAV's prototype freezing).
- optional ``param_groups(weight_decay) -> list[dict]`` (e.g. DINO's last
  layer) and ``on_train_step_start(step)``/``extra_state`` for checkpointed
  buffers (registered buffers are checkpointed with the state dict anyway).

Register with ``@register_method("name", config=NameConfig, recipe="simclr")``;
the config class subclasses :class:`fastssl.config.MethodConfig`. Tests
iterate over :data:`METHODS`, so a new method is tested once registered.
"""
from __future__ import annotations

import importlib
import pkgutil

from fastssl.registry import Registry

METHODS: Registry = Registry("method")


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
