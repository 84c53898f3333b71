"""Checkpoints: written atomically, holding everything a resume needs.

A checkpoint is one ``torch.save`` dict: the method's state (teacher, centre,
queues are registered buffers, so they come with it), optimizer, online probe,
step/epoch counters, the RNG states and the resolved config. It is written to
a temporary file and renamed, so a run killed mid-write keeps the previous one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp`` then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first, or point at a run directory that has checkpoints/last.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


def resolve(path: str | os.PathLike) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    p = Path(path)
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


def load_for_eval(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(cfg, method, step)`` from a run directory or checkpoint, method in eval mode on ``device``."""
    from fastssl.config import config_from_dict
    from fastssl.methods import create_method

    ckpt = load(resolve(path))
    cfg = config_from_dict(ckpt["config"])
    from fastssl.compile import clean_state_dict

    method = create_method(cfg, ckpt["total_steps"])
    method.load_state_dict(clean_state_dict(ckpt["method"]))  # older checkpoints carry `_orig_mod.` keys
    return cfg, method.to(device).eval(), int(ckpt["step"])
