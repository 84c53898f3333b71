"""``train.strategy=fsdp``: the method sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Units, sharded bottom-up over one 1-D device mesh of all processes (ZeRO-3: parameters,
gradients and optimizer states each live 1/world per process):

- every ViT block (:class:`fastssl.models.vit.Block`, and the blocks of a timm ViT), student and
  EMA teacher alike: one all-gather before the block's forward, freed after it, gathered again
  for its backward; gradients are reduce-scattered (averaged over processes, as DDP does);
- each module of the EMA teacher (``method.teacher[name]``): the teacher's patch embedding,
  norms and head are gathered for its forward only;
- the method itself (root): what is left (student patch embedding, norm, heads).

The EMA teacher is sharded like its student, so ``teacher <- m teacher + (1 - m) student`` runs
on each process's local shards (:func:`fastssl.methods._common.ema_update`), without any
communication, as DINOv2 does. Under bf16 the gathered parameters are bf16 and gradients are
reduced in fp32 (``MixedPrecisionPolicy``); the sharded parameters and optimizer states stay fp32.

Why ``fully_shard`` and not accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)``:
accelerate 1.x turns FSDP on only for GPU-like distributed types (its ``AcceleratorState``
leaves ``MULTI_CPU`` out), so the plugin cannot be tested on the CPU, and its wrapping
(``transformer_cls_names_to_wrap``) would also wrap the teacher's blocks into units whose
forward runs under ``no_grad`` without a unit for the teacher's other parameters. The calls
here are the ones accelerate's plugin makes (``fully_shard`` per block, then the root); the
Accelerator still owns the process group, autocast and the optimizer wrapper, on the CPU (gloo)
and on GPUs (NCCL) alike, so the path the 2-process CPU test checks is the one GPUs run.

Checkpoints stay in the single-process format: :func:`full_state` gathers the full model and
optimizer state (``torch.distributed.checkpoint.state_dict``, ``full_state_dict=True``,
offloaded to the CPU, on rank 0) and renumbers the optimizer state like ``Optimizer.state_dict()``,
so ``fastssl-eval``, ``fastssl-export`` and a DDP or one-process resume read an FSDP checkpoint
unchanged, and an FSDP run resumes any checkpoint (:func:`load_full_state`).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` went through :func:`shard_method` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def block_modules(method: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: fastssl ViT blocks and the items of any ``blocks`` ModuleList."""
    from fastssl.models.vit import Block

    out, seen = [], set()
    for name, m in method.named_modules():
        picks = [m] if isinstance(m, Block) else (list(m) if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "blocks" else [])
        for b in picks:
            if id(b) not in seen:
                seen.add(id(b))
                out.append(b)
    return out


def teacher_modules(method: nn.Module) -> list[nn.Module]:
    """The modules of the EMA teacher that are *called* (``teacher[name](x)``): each becomes a unit.

    A ``ModuleDict`` is never called itself, so a unit on it would never gather its parameters.
    """
    t = getattr(method, "teacher", None)
    if t is None:
        return []
    return list(t.values()) if isinstance(t, nn.ModuleDict) else [t]


def shard_method(method: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """Apply ``fully_shard`` to ``method``'s blocks, teacher modules and root, in place; returns ``method``.

    Call it before the optimizer is built (sharding replaces the parameters) and after the
    blocks are compiled (each block compiles its own forward; FSDP's hooks run outside the graph).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("train.strategy=fsdp needs torch.distributed initialised (several processes)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Every process built its own random init (seeded by rank); DDP broadcasts rank 0's, and so
    # does this (FSDP1's sync_module_states), before each process keeps its shard.
    with torch.no_grad():
        for t in [*method.parameters(), *method.buffers()]:
            dist.broadcast(t.data, src=0)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    kw = {"mesh": mesh, "mp_policy": mp}
    for blk in block_modules(method):
        fully_shard(blk, **kw)
    for t in teacher_modules(method):
        fully_shard(t, **kw)  # gathered for the teacher's forward, freed after it
    fully_shard(method, **kw)  # the root: the rest, kept gathered from forward to backward
    return method


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """Each optimizer group's parameter names (the model's FQNs), in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def full_model_state(model: nn.Module) -> dict:
    """The full model state dict, on the CPU on rank 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), full and on the CPU on rank 0 (empty elsewhere).

    A collective: every process calls it. The optimizer's state comes keyed by parameter name and
    is renumbered as ``Optimizer.state_dict()`` numbers it (groups in order, parameters in order).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    msd = full_model_state(model)
    osd = get_optimizer_state_dict(model, opt, options=_options())
    if not msd:  # not rank 0
        return {}, {}
    index = {}
    groups = []
    for g in osd["param_groups"]:
        ids = []
        for name in g["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**g, "params": ids})
    state = {index[name]: s for name, s in osd["state"].items()}
    return msd, {"state": state, "param_groups": groups}


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict) -> None:
    """Load a full (one-process format) model and optimizer state into the sharded ``model`` / ``opt``.

    Every process holds the full state (each reads the checkpoint) and keeps its own shards.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from fastssl.compile import clean_state_dict

    set_model_state_dict(model, clean_state_dict(model_sd), options=_options())
    names = [n for group in _param_names(model, opt) for n in group]
    if len(opt_sd["param_groups"]) != len(opt.param_groups) or \
            sum(len(g["params"]) for g in opt_sd["param_groups"]) != len(names):
        raise ValueError("the checkpoint's optimizer has other parameter groups than this run's")
    by_id = {}
    groups = []
    for g_saved, g_names in zip(opt_sd["param_groups"], _param_names(model, opt)):
        by_id.update(zip(g_saved["params"], g_names))
        groups.append({**g_saved, "params": g_names})
    fqn_sd = {"state": {by_id[i]: s for i, s in opt_sd["state"].items()}, "param_groups": groups}
    # Parameters the optimizer has not stepped yet (DINO's last layer in its frozen first epoch) have no
    # state: torch first gives every parameter a state (a zero-gradient step at lr 0), so those are
    # removed again, as Optimizer.load_state_dict would leave them.
    set_optimizer_state_dict(model, opt, fqn_sd, options=_options(strict=False))
    params = dict(model.named_parameters())
    for name in set(names) - set(fqn_sd["state"]):
        opt.state.pop(params[name], None)
