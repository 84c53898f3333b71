"""Checkpoints: written atomically, holding everything a resume needs, and loaded without running code.

A checkpoint is one ``torch.save`` dict: the method's state (teacher, centre,
queues are registered buffers, so they come with it), optimizer, online probe,
step/epoch counters, the RNG states and the resolved config. It is written to
a temporary file and renamed, so a run killed mid-write keeps the previous one.

Loading runs no code (SECURITY.md). Every value is a tensor or a plain type
(dict, list, tuple, str, int, float, bool, None), so :func:`load` reads it with
``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which rebuilds
only tensors and containers and refuses any other global
(https://pytorch.org/docs/stable/notes/serialization.html#weights-only). The RNG
states, which Python and numpy give as tuples holding a numpy array, are stored
as lists and tensors (:func:`rng_state`). :func:`save_atomic` checks the file it
wrote before renaming it, so a checkpoint that would need pickle is never
published. Checkpoints of older fastssl versions (numpy arrays in the RNG state) or of
other tools open only with ``trust=True`` (the CLIs' ``--trust-checkpoint``),
which is ``torch.load(weights_only=False)``: full pickle, which can run any code
the file carries, the same opt-in torch >= 2.6, timm and Hugging Face
``transformers`` ask for.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRUST_FLAG = "--trust-checkpoint"
TRUST_HELP = ("load a checkpoint that needs full pickle (torch.load weights_only=False): older fastssl checkpoints "
              "(numpy RNG state) or other tools' files. Pickle can run any code the file carries; use it only for "
              "files you wrote or trust")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the one-line message names the file and what to do."""


class UntrustedCheckpointError(CheckpointError):
    """The file needs full pickle to load (it holds objects other than tensors and plain types)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty or not a ``torch.save`` checkpoint."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp``, check it loads with ``weights_only=True``, then rename.

    Readers never see a half-written file. A full disk (ENOSPC, EDQUOT) removes the partial
    ``.tmp`` and raises :class:`fastssl.faults.DiskFull` naming the path and the bytes needed; the
    previous checkpoint is untouched. A state that would need pickle to load
    (a callable, a numpy array, a custom class) raises ``TypeError`` naming what it
    holds, here at save time instead of at the next resume; the previous checkpoint stays.
    """
    from fastssl import fault_injection

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    f = None
    try:
        with open(tmp, "wb") as raw:
            inner = raw
            if fault_injection.PLAN is not None and fault_injection.fire("enospc", "save"):
                inner = fault_injection.FillsUp(raw, what=f"checkpoint {path.name}")
            f = _WriteErrors(inner)
            torch.save(obj, f)
            raw.flush()
            os.fsync(raw.fileno())
    except (OSError, RuntimeError) as e:
        # torch.save turns an error of the file's write() into a RuntimeError ("unexpected pos"):
        # the OSError that _WriteErrors saw says what it was.
        cause = e if isinstance(e, OSError) else (f.error if f is not None else None)
        tmp.unlink(missing_ok=True)
        from fastssl.faults import SPACE_ERRNOS, DiskFull

        if isinstance(cause, OSError) and cause.errno in SPACE_ERRNOS:
            raise DiskFull(path, state_nbytes(obj), "checkpoint") from None
        raise
    # Reads only the pickle record, never the tensor data: about a millisecond per save.
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
    if unsafe:
        tmp.unlink(missing_ok=True)
        raise TypeError(f"refusing to write {path}: it would need pickle to load ({', '.join(unsafe)}); "
                        f"store tensors and plain types (dict, list, str, int, float, bool, None)")
    os.replace(tmp, path)


class _WriteErrors:
    """A file's ``write`` that remembers the ``OSError`` it raised (torch.save reports only a RuntimeError)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def state_nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: about what its checkpoint file takes."""
    seen, total = set(), 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            try:
                key = (x.untyped_storage().data_ptr(), x.device)
                size = x.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                key, size = id(x), x.numel() * x.element_size()
            if key not in seen:
                seen.add(key)
                total += size
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


# ----------------------------------------------------------------------------- RNG states as tensors and lists


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain types (loadable with ``weights_only=True``).

    ``python``: ``random.getstate()`` as ``{"version", "state": list of 625 ints, "gauss_next"}``;
    ``numpy``: the legacy global ``np.random`` MT19937 state, ``get_state(legacy=False)``'s dict
    with the 624-word key as an int64 tensor; ``torch``: ``torch.get_rng_state()``; ``cuda``
    (when available): one state tensor per device.
    """
    version, internal, gauss_next = random.getstate()
    ns = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    state = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(ns["bit_generator"]),
                  "key": torch.from_numpy(ns["state"]["key"].astype(np.int64)),
                  "pos": int(ns["state"]["pos"]), "has_gauss": int(ns["has_gauss"]), "gauss": float(ns["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s output; also the tuple form older checkpoints hold (numpy array inside)."""
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    else:
        random.setstate((py[0], tuple(py[1]), py[2]))
    nps = state["numpy"]
    if isinstance(nps, dict):
        key = np.asarray(nps["key"].numpy() if torch.is_tensor(nps["key"]) else nps["key"]).astype(np.uint32)
        np.random.set_state((nps["bit_generator"], key, int(nps["pos"]), int(nps["has_gauss"]), float(nps["gauss"])))
    else:
        np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Only the devices visible now: a run resumed under a narrower CUDA_VISIBLE_DEVICES (a scheduler
        # giving each task its own GPU) sees fewer devices than the run that saved the states.
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ----------------------------------------------------------------------------- loading


def _check_zip(path: Path) -> None:
    """Refuse a file that is not an uncompressed zip of ``torch.save``'s layout, before torch reads it.

    ``torch.save`` writes a zip of stored (uncompressed) records (PyTorch's
    ``PyTorchStreamWriter``); the reader would inflate a deflated record into a buffer of
    its declared size, so a small crafted file could claim gigabytes. Allowing stored
    records only, each inside the file, bounds what loading allocates by the file's size.
    """
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(f"{path}: not a torch.save zip checkpoint (truncated or empty; a legacy "
                                     f"pre-zip torch.save file opens only with {TRUST_FLAG})")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
            raise UntrustedCheckpointError(
                f"{path}: record {info.filename!r} is compressed or larger than the file, which torch.save never "
                f"writes; refusing to inflate it (pass {TRUST_FLAG} only if you trust the file)")


def load(path: str | os.PathLike, trust: bool = False) -> dict:
    """A checkpoint dict, read with ``torch.load(weights_only=True)`` onto the CPU.

    Raises ``FileNotFoundError``; :class:`UntrustedCheckpointError` when the file needs full
    pickle (an older fastssl checkpoint, another tool's, or a hostile file), naming the file,
    what it holds and the ``--trust-checkpoint`` opt-in; :class:`CorruptCheckpointError` when
    it is truncated or not a checkpoint. ``trust=True`` loads with ``weights_only=False``
    (full pickle: the file can run code) and is the only such call in fastssl.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first, or point at a run directory that has checkpoints/last.pt")
    if not trust:
        _check_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if not trust and "Weights only load failed" in str(e):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:
                unsafe = []
            if unsafe:
                shown = ", ".join(unsafe[:4]) + (f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else "")
                raise UntrustedCheckpointError(
                    f"{path}: refusing to load: it needs pickle, which can run code ({shown}); if you wrote it or "
                    f"trust its source, pass {TRUST_FLAG}") from None
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise CorruptCheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # torch wraps the restricted unpickler's reason in paragraphs of advice: keep the reason.
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    msg = m.group(1) if m else (text.splitlines()[0] if text else "")
    return f"{type(e).__name__}: {msg}"[:200] if msg else type(e).__name__


def resolve(path: str | os.PathLike) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    p = Path(path)
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


def load_for_eval(path: str | os.PathLike, device: str | torch.device = "cpu", trust: bool = False):
    """``(cfg, method, step)`` from a run directory or checkpoint, method in eval mode on ``device``.

    ``trust`` as in :func:`load` (``--trust-checkpoint``).
    """
    from fastssl.config import config_from_dict
    from fastssl.methods import create_method

    file = resolve(path)
    ckpt = load(file, trust=trust)
    missing = [k for k in ("config", "method", "total_steps", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CorruptCheckpointError(f"{file}: not a fastssl checkpoint (no {', '.join(map(repr, missing))})")
    cfg = config_from_dict(ckpt["config"])
    from fastssl.compile import clean_state_dict

    method = create_method(cfg, ckpt["total_steps"])
    method.load_state_dict(clean_state_dict(ckpt["method"]))  # older checkpoints carry `_orig_mod.` keys
    if cfg.train.channels_last:
        # As the trainer ran it: NHWC weights take cuDNN's and oneDNN's fast convolutions, which the
        # feature extraction and the 90 epochs of the papers' linear protocol spend most of their time in.
        method = method.to(memory_format=torch.channels_last)
    return cfg, method.to(device).eval(), int(ckpt["step"])
