"""``torch.compile`` for the trainer and the benchmarks: in place, with an eager fallback.

Two things the plain ``module = torch.compile(module)`` gets wrong for a training run:

- it wraps the module in an ``OptimizedModule``, so every key of the state dict gains an
  ``_orig_mod.`` prefix and a checkpoint no longer loads into an uncompiled method
  (``fastssl-eval``, ``fastssl-export``). ``nn.Module.compile`` compiles the module's
  call in place instead, leaving the module tree and its keys untouched;
- compilation is lazy: a ``try`` around ``torch.compile`` never sees a compile error,
  which surfaces at the first forward and would end the run. :func:`compile_module`
  catches errors of the compiler (and anything at the first call), warns once, and
  runs eager from then on. Compile is a speed-up, never a requirement.

Shapes: ``dynamic=False`` by default. DINO's multi-crop (2 sizes) and progressive
resolution (sizes rounded to ``train.res_step``) give a handful of static shapes; one
static graph per size is faster than a dynamic-shape graph, and the recompile limit is
raised so that every size of a run gets its own graph instead of falling back to eager.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

# Distinct input shapes a run may compile before dynamo gives up (its default is 8):
# progressive resolution 160->224 in steps of 32 is 3 sizes, x2 views sizes for DINO.
RECOMPILE_LIMIT = 32

logger = logging.getLogger(__name__)


def raise_recompile_limit() -> None:
    """Let every shape of a run (``RECOMPILE_LIMIT``) have its own graph instead of falling back to eager."""
    try:
        import torch._dynamo as dynamo

        for key in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, max(getattr(dynamo.config, key), RECOMPILE_LIMIT))
    except Exception:  # noqa: BLE001 - the limit is a tuning, not a requirement
        pass


def _is_compiler_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "triton")) or "BackendCompilerFailed" in type(e).__name__


def compile_module(module: nn.Module, *, dynamic: bool | None = False, backend="inductor", mode: str | None = None,
                   name: str = "backbone", log=None) -> nn.Module:
    """Compile ``module``'s forward in place; returns ``module`` (same object, same state-dict keys).

    If compilation fails (at the first call, or later with a compiler error such as a
    recompile that breaks), prints one warning naming the error and runs eager.
    ``log``: callable taking the message (default: this module's logger, as a warning).
    """
    log = log or logger.warning
    raise_recompile_limit()
    try:
        compiled = torch.compile(module._call_impl, dynamic=dynamic, backend=backend, mode=mode)
    except Exception as e:  # noqa: BLE001 - e.g. no compiler on this platform
        log(f"torch.compile of the {name} is unavailable ({type(e).__name__}: {e}); running eager")
        return module
    state = {"calls": 0, "failed": False}

    def call(*args, **kwargs):
        if state["failed"]:
            return module._call_impl(*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            from fastssl.faults import is_out_of_memory

            if (state["calls"] > 0 or is_out_of_memory(e)) and not _is_compiler_error(e):
                # A real error of the model, not of the compiler: do not hide it. An out-of-memory error
                # of the first step goes to the trainer's handler, which names the fix.
                raise
            state["failed"] = True
            module.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            state["calls"] += 1
            return out
        # Outside the except block: its traceback would keep the failed graph's buffers alive.
        log(f"torch.compile of the {name} failed ({module.compile_error}); running eager "
            f"(set train.compile=off to skip compiling)")
        return module._call_impl(*args, **kwargs)

    # nn.Module.__call__ dispatches to _compiled_call_impl when set (what nn.Module.compile does).
    module._compiled_call_impl = call
    module.compile_state = state
    return module


class eager:
    """``with eager(module):`` calls run the module uncompiled (evaluation: other batch sizes and no_grad
    would each compile a new graph under ``dynamic=False``, for a pass that runs once an epoch)."""

    def __init__(self, module: nn.Module):
        self.module, self.saved = module, None

    def __enter__(self):
        self.saved = getattr(self.module, "_compiled_call_impl", None)
        self.module._compiled_call_impl = None
        return self.module

    def __exit__(self, *exc):
        self.module._compiled_call_impl = self.saved
        return False


def is_compiled(module: nn.Module) -> bool:
    """True while ``module`` runs through its compiled call (compiled and not fallen back)."""
    st = getattr(module, "compile_state", None)
    return st is not None and not st["failed"]


def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (``_orig_mod.`` of torch.compile, ``module.`` of DDP) from state-dict keys.

    Checkpoints written before compile went in place carry ``backbone._orig_mod.*`` keys; they load through this.
    """
    out = {}
    for k, v in sd.items():
        parts = [p for p in k.split(".") if p != "_orig_mod"]
        if parts and parts[0] == "module":
            parts = parts[1:]
        out[".".join(parts)] = v
    return out


if not hasattr(nn.Module, "_compiled_call_impl"):  # pragma: no cover - torch < 2.2
    warnings.warn("this torch has no in-place module compile; fastssl needs torch >= 2.2", stacklevel=1)
