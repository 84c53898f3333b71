"""SSL methods, one small file each, registered by name, and the protocol they follow.

A method is an ``nn.Module`` that owns its modules (backbone, heads, teacher). It is built
from plain arguments, ``SimCLR(backbone="resnet18", proj_dim=128, temperature=0.1)`` or
``create_method("simclr", backbone="resnet18")``, or from a :class:`fastssl.config.Config`
with ``cls.from_config(cfg, total_steps)`` (what ``create_method(cfg, total_steps)``, the
trainer's builder, calls). :class:`SSLMethod` below is the whole contract, in code: the
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
- ``from_config(cfg, total_steps)`` (classmethod): the method built from a Config. Default:
  :func:`build_from_config` (the constructor arguments below, filled from ``cfg``).

State that must survive a resume lives in registered buffers and submodules (teachers,
centres, queues), so ``state_dict()`` checkpoints it; there is no other state hook.

Constructor arguments (the same in every method, so generic code can build any of them):

- ``backbone``: a name (a fastssl backbone such as ``resnet_tiny`` or any timm model) or an
  ``nn.Module`` mapping (B, 3, H, W) -> (B, F); ``feat_dim`` gives F for a module without a
  ``num_features`` attribute (``resolve_backbone(backbone, feat_dim)`` turns the pair into
  ``(module, F)``).
- one keyword argument per key of the method's config dataclass (``method.<key>``), same
  names and defaults (a test checks), so ``from_config`` passes ``cfg.method`` through.
- ``total_steps`` (methods with per-step schedules, e.g. the EMA momentum's cosine):
  optimizer steps in the run; None holds the schedule at its start value.
- ``steps_per_epoch`` (methods with durations counted in epochs: DINO's teacher-temperature
  warm-up and last-layer freeze, SwAV's prototype freeze and queue start): None makes those
  durations zero.
- constructor parameters named like a ``model.*`` key (MAE's ``attn``) receive that key.

Register with ``@register_method("name", config=NameConfig, recipe="simclr")``;
the config class subclasses :class:`fastssl.config.MethodConfig`. Without ``config``, one is
made from the constructor's keyword arguments (their defaults and types). Tests
iterate over :data:`METHODS`, so a new method is tested once registered.

A method outside fastssl needs no registration in fastssl: ``method.name=pkg.module:Class``
imports ``pkg.module`` and registers ``Class`` under that name (its ``config`` and ``recipe``
class attributes, when present, are used), and so does an entry point in the group
``fastssl.methods`` (``name = "pkg.module:Class"`` in the package's metadata).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import pkgutil
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from fastssl.registry import Registry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fastssl.methods"


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

    @classmethod
    def from_config(cls, cfg, total_steps: int) -> "SSLMethod": ...


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

    @classmethod
    def from_config(cls, cfg, total_steps: int):
        """Build from a :class:`fastssl.config.Config`: ``cfg.method``'s keys as keyword arguments,
        the backbone from ``cfg.model``, and the run's schedule lengths (see the module docstring)."""
        return build_from_config(cls, cfg, total_steps)



_CONTEXT = ("backbone", "feat_dim", "total_steps", "steps_per_epoch")     # filled by from_config, not method.*


def build_from_config(cls, cfg, total_steps: int):
    """``cls(**method keys, backbone=..., feat_dim=..., [total_steps, steps_per_epoch, model.* keys])``.

    Only the context arguments the constructor names are passed, so a method without schedules
    does not have to accept ``total_steps``.
    """
    from fastssl.methods._common import steps_per_epoch
    from fastssl.models import create_backbone

    kwargs = {f.name: getattr(cfg.method, f.name) for f in dataclasses.fields(cfg.method) if f.name != "name"}
    params = inspect.signature(cls).parameters
    backbone, feat_dim = create_backbone(cfg.model)
    context: dict[str, Any] = {"backbone": backbone, "feat_dim": feat_dim, "total_steps": total_steps,
                               "steps_per_epoch": steps_per_epoch(cfg, total_steps)}
    context.update({f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model) if f.name != "backbone"})
    kwargs.update({k: v for k, v in context.items() if k in params and k not in kwargs})
    return cls(**kwargs)


def config_from_signature(cls: type, name: str) -> type:
    """A ``MethodConfig`` dataclass whose keys are ``cls``'s keyword arguments with bool/int/float/str defaults.

    Lets a method written as a plain class (no config dataclass) be configured from YAML and the
    command line (``method.<arg>=value``) like the built-in ones.
    """
    from fastssl.config import MethodConfig

    fields: list[tuple[str, type, Any]] = [("name", str, dataclasses.field(default=name))]
    for p in inspect.signature(cls).parameters.values():
        if p.name in _CONTEXT or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TypeError(f"method {name!r}: constructor argument {p.name!r} needs a default (fastssl fills only "
                            f"{', '.join(_CONTEXT)}), or give the class a `config` dataclass attribute")
        if isinstance(p.default, (bool, int, float, str)):
            fields.append((p.name, type(p.default), dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields, bases=(MethodConfig,))


def register_method(name: str, *, config: type | None = None, recipe: str = "simclr"):
    """Class decorator: register a method with its config dataclass and default augmentation recipe.

    ``config`` None: a config dataclass made from the constructor (:func:`config_from_signature`).
    """
    def deco(cls):
        return METHODS.register(name, config=config or config_from_signature(cls, name), recipe=recipe)(cls)

    return deco


def _check_method_class(obj: Any, name: str) -> None:
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise TypeError(f"method {name!r} is {obj!r}, not an nn.Module subclass")
    missing = [h for h in ("after_step", "before_optimizer_step", "embed", "param_groups", "from_config")
               if not hasattr(obj, h)]
    if missing:
        raise TypeError(f"method {name!r} lacks {missing}: subclass fastssl.methods.MethodHooks before nn.Module "
                        f"(class {obj.__name__}(MethodHooks, nn.Module)), which supplies them")


def _register_external(registry: Registry, name: str, obj: Any) -> bool:
    _check_method_class(obj, name)
    config = getattr(obj, "config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        config = config_from_signature(obj, name)
    registry.register(name, config=config, recipe=getattr(obj, "recipe", "simclr"))(obj)
    log.info("registered method %r from %s.%s", name, obj.__module__, obj.__qualname__)
    return True


def _resolve_method(registry: Registry, name: str) -> bool:
    """An unregistered method name: ``pkg.module:Class`` (imported), else an entry point of that name."""
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            # the user's module (or its package) is missing, not a module it imports
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise KeyError(f"method {name!r}: no module {mod_name!r} on sys.path (for "
                               f"method.name=package.module:Class, install the package or add its folder to "
                               f"PYTHONPATH)") from None
            raise
        if name in registry:                              # the module registered it itself on import
            return True
        obj = mod
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise KeyError(f"method {name!r}: module {mod_name!r} has no {attr!r}")
            obj = getattr(obj, part)
        return _register_external(registry, name, obj)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _register_external(registry, name, ep.load())
    return False


METHODS: Registry = Registry("method", resolver=_resolve_method,
                             hint="a method of your own: method.name=package.module:Class, or an entry point in "
                                  f"the group {ENTRY_POINT_GROUP!r}")


def list_methods() -> list[str]:
    """The registered method names (the built-in ones, plus any user method looked up so far)."""
    return METHODS.names()


def create_method(cfg_or_name, total_steps: int | None = None, **kwargs):
    """Build a method: ``create_method(cfg, total_steps)`` from a Config (the trainer's call), or
    ``create_method("simclr", backbone="resnet18", proj_dim=128)`` from plain arguments (timm-style).
    A name may be ``pkg.module:Class`` (see the module docstring)."""
    if isinstance(cfg_or_name, str):
        if total_steps is not None:
            kwargs["total_steps"] = total_steps
        return METHODS.get(cfg_or_name)(**kwargs)
    if kwargs:
        raise TypeError(f"create_method(cfg, total_steps) takes no keyword arguments, got {sorted(kwargs)}: "
                        f"set them in cfg.method")
    if total_steps is None:
        raise TypeError("create_method(cfg, total_steps): total_steps is required with a Config")
    return METHODS.get(cfg_or_name.method.name).from_config(cfg_or_name, total_steps)


def _import_all() -> None:
    # Every module in this package registers itself on import.
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


_import_all()

# The built-in classes by name, for ``fastssl.methods.SimCLR(backbone="resnet18", ...)``, and the
# backbone argument's resolver, for methods written outside fastssl.
from fastssl.methods._common import resolve_backbone  # noqa: E402
from fastssl.methods.barlow_twins import BarlowTwins  # noqa: E402
from fastssl.methods.byol import BYOL  # noqa: E402
from fastssl.methods.dcl import DCL  # noqa: E402
from fastssl.methods.dino import DINO  # noqa: E402
from fastssl.methods.mae import MAE  # noqa: E402
from fastssl.methods.mocov3 import MoCoV3  # noqa: E402
from fastssl.methods.nnclr import NNCLR  # noqa: E402
from fastssl.methods.simclr import SimCLR  # noqa: E402
from fastssl.methods.simsiam import SimSiam  # noqa: E402
from fastssl.methods.swav import SwAV  # noqa: E402
from fastssl.methods.vicreg import VICReg  # noqa: E402

__all__ = ["METHODS", "SSLMethod", "MethodHooks", "register_method", "create_method", "list_methods",
           "resolve_backbone", "BarlowTwins", "BYOL", "DCL", "DINO", "MAE", "MoCoV3", "NNCLR", "SimCLR", "SimSiam",
           "SwAV", "VICReg"]
