"""Typed configuration: dataclasses per concern, YAML recipes, ``a.b=value`` overrides.

``load_config(path, overrides)`` reads a YAML recipe from ``configs/`` (with the
base recipes its ``defaults:`` names merged under it, :func:`read_recipe`), applies
command-line overrides and validates everything before any work starts: an
unknown key fails naming the closest valid key, a bad value names the key and
the expected type. Numbers are read as people type them (``1e-3``, ``.5``,
``1_000``) in a file and on the command line alike. Derived values (per-process
batch, scaled learning rate, steps) are computed once, in :func:`derive`, and
never stored in the config.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastssl.pipelines.recipes import AugConfig, ViewSpec, preset
from fastssl.grad_clip import CLIP_MODES
from fastssl.hostmem import HOST_ALLOCS
from fastssl.models.cpu_conv import CPU_CONV_WGRADS
from fastssl.registry import closest


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what to do."""


@dataclass
class DataConfig:
    train: str = ""                 # .beton file or image folder (train split)
    val: str = ""                   # .beton file or image folder (kNN / probe evaluation)
    backend: str = "auto"           # auto | ffcv | dali | torch | webdataset (auto: ffcv for .beton, webdataset
                                    # for tar shards, torch for image folders)
    workers: int = 2                # decoding processes/threads
    worker_timeout: float = 300     # torch back-end: seconds a DataLoader worker may take for one batch before the
                                    # run stops naming it (exit 7); 0 waits forever
    worker_start: str = "auto"      # torch/webdataset workers: auto (fork; forkserver once CUDA is in use: a forked
                                    # child cannot free CUDA memory) | fork | forkserver | spawn
    in_memory: bool = True          # ffcv: true reads the .beton through the OS page cache (mmap; ffcv's os_cache,
                                    # FFCV's ImageNet example's in_memory=1): shared by every loader, evicted under
                                    # pressure. false: ffcv's process cache, a copy per loader of the pages an epoch
                                    # needs; with a shuffled order that is most of the file
    shuffle_buffer: int = 1000      # webdataset: samples per worker in the shuffle buffer
    photometric: str = "auto"       # the photometric stage: auto (OpenCV on the CPU, eager torch on a GPU) | torch |
                                    # compiled (the same ops fused by torch.compile) | cv2 (CPU only)

    def __post_init__(self):
        _choice("data.backend", self.backend, ("auto", "ffcv", "dali", "torch", "webdataset"))
        _range("data.worker_timeout", self.worker_timeout, 0, None)
        _choice("data.worker_start", self.worker_start, ("auto", "fork", "forkserver", "spawn"))
        _choice("data.photometric", self.photometric, ("auto", "torch", "compiled", "cv2"))


@dataclass
class ModelConfig:
    backbone: str = "resnet18"      # a fastssl.models name (resnet18, resnet50, vit_small_patch16, ...) or timm name
    drop_path: float = 0.0          # stochastic depth (ViTs)
    attn: str = "sdpa"              # ViT attention: sdpa (FlashAttention on CUDA) | xformers | naive
    global_pool: str = "avg"        # ViTs: avg (mean of patch tokens) | token (class token)
    layer_scale: float = 0.0        # ViTs: LayerScale init value, 0 = off
    patch_drop: float = 0.0         # ViTs in joint-embedding methods: fraction of patch tokens dropped
    frozen_patch_embed: bool = False  # MoCo v3's frozen random patch projection

    def __post_init__(self):
        _choice("model.attn", self.attn, ("sdpa", "xformers", "naive"))
        _choice("model.global_pool", self.global_pool, ("avg", "token"))
        _range("model.patch_drop", self.patch_drop, 0.0, 0.95)


@dataclass
class MethodConfig:
    """Base of every method's config; each method file subclasses it with its own keys."""

    name: str = "simclr"


@dataclass
class TwoViewConfig(MethodConfig):
    """Base of the two-view methods' configs (SimCLR, BYOL, MoCo v3, SimSiam, NNCLR, VICReg, Barlow Twins).

    They run backbone, projector and predictor once per view, so BatchNorm normalises each view's
    batch with its own statistics, as their reference code (and lightly's, solo-learn's loops) does.
    ``joint_bn=True``: one call over both views, whose BN statistics mix the two views of every
    image; demo SimCLR lost 7 kNN points that way (BENCHMARKS.md, "Accuracy against lightly": BatchNorm per view closes most
    of the accuracy gap). The multi-crop methods (DINO, SwAV) batch crops by resolution, as their
    reference code does.
    """

    joint_bn: bool = False


@dataclass
class OptimConfig:
    name: str = "lars"              # lars | adamw | sgd
    batch_size: int = 256           # GLOBAL images per optimizer step (all processes x accumulation)
    accum_steps: int = 1            # micro-batches per optimizer step (EMA/queues advance once per step)
    lr: float = 0.3                 # base learning rate at base_batch (section 3.8.1 scaling rule)
    lr_scaling: str = "linear"      # linear | sqrt | none: lr = base * (batch/base_batch)^{1, 1/2, 0}; SimCLR's
                                    # small-batch rule lr = 0.075 x sqrt(batch) is lr=0.075, sqrt, base_batch=1
    base_batch: int = 256
    min_lr_ratio: float = 0.0       # cosine ends at lr * min_lr_ratio
    warmup_epochs: float = 10.0     # linear warm-up, then cosine decay (per step)
    weight_decay: float = 1e-6
    weight_decay_end: float = -1.0  # <0: constant weight decay; else cosine wd schedule (DINO)
    momentum: float = 0.9           # sgd / lars momentum; adamw beta1
    beta2: float = 0.999            # adamw
    lars_eta: float = 0.02          # LARS trust coefficient (SimCLR: 0.001 with lr 0.3*bs/256; solo-learn 0.02)
    clip_grad: float = 0.0          # max gradient norm, 0 = off
    clip_mode: str = "global"       # global: one norm over all parameters (torch clip_grad_norm_; DINOv2 per
                                    # module) | per_param: each parameter's own norm (DINO's utils.clip_gradients),
                                    # fastssl/grad_clip.py
    foreach: str = "auto"           # lars / sgd update: auto (the library's choice: multi-tensor on CUDA) | on | off
                                    # (a per-parameter loop: the A/B arm of fastssl-bench step)

    def __post_init__(self):
        _choice("optim.name", self.name, ("lars", "adamw", "sgd"))
        _choice("optim.foreach", self.foreach, ("auto", "on", "off"))
        _choice("optim.clip_mode", self.clip_mode, CLIP_MODES)
        _choice("optim.lr_scaling", self.lr_scaling, ("linear", "sqrt", "none"))
        _range("optim.batch_size", self.batch_size, 2, None)
        _range("optim.accum_steps", self.accum_steps, 1, None)
        _range("optim.lr", self.lr, 0.0, None)


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0              # >0: stop after this many optimizer steps (schedules still span `epochs`)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: str = "auto"           # auto (on CUDA) | on | off: torch.compile the backbone
    compile_mode: str = "default"   # torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune |
                                    # reduce-overhead (longer compiles; a GPU run measures which pays)
    compile_scope: str = "backbone"  # what train.compile compiles: backbone | method (the method's whole forward:
                                    # backbone, projector and loss in one graph, where the forward does not read
                                    # the step; other methods compile the backbone and say so)
    cudnn_benchmark: bool = False   # CUDA: cuDNN times its algorithms per convolution shape on first use and keeps
                                    # the fastest (torch.backends.cudnn.benchmark); fastssl-bench step measures it
    channels_last: bool = True      # NHWC weights (CUDA and CPU oneDNN)
    host_alloc: str = "auto"        # auto (retain on CPU) | retain | system: keep freed host memory for the next step
                                    # instead of page-faulting it in again (fastssl/hostmem.py)
    cpu_conv_wgrad: str = "auto"    # CPU conv weight gradients: auto (a GEMM or a forward conv where timed 15%
                                    # faster than oneDNN's, per shape, once per machine) | onednn | gemm | conv |
                                    # conv_nchw (fastssl/models/cpu_conv.py)
    out_dir: str = "runs"
    name: str = ""                  # run directory name; empty: <method>-<backbone>-<data stem>
    resume: str = "false"           # true: continue from the run dir's newest readable checkpoint; auto: the same
                                    # when one exists and its config matches (requeued jobs), else start; false
    keep_checkpoints: int = 2       # step-numbered checkpoints kept (last.pt links the newest)
    ckpt_every_epochs: int = 1      # periodic checkpoints (also always at the end)
    ckpt_every_steps: int = 0       # >0: also every N optimizer steps
    log_every: int = 10             # steps between metric lines (values read one log point later: no host wait)
    progress: bool = True           # progress (fastssl.progress: a bar on a terminal, lines otherwise)
    res_start: int = 0              # progressive resolution: global-view size at epoch 0 (0 = off)
    res_end_epoch: float = 0.85     # ... reaches aug.global_size at this fraction of the epochs
    res_step: int = 32              # sizes are rounded to this multiple (bounded number of recompiles)
    log_with: str = "none"          # experiment trackers mirroring metrics.jsonl: none | tensorboard | wandb | mlflow,
                                    # several comma-separated (tensorboard,wandb)
    strategy: str = "ddp"           # several processes: ddp (replicated model, DistributedDataParallel) | fsdp (FSDP2:
                                    # parameters, gradients and optimizer states sharded; ViT blocks one unit each)
    collective_timeout: float = 300  # several processes: seconds without a finished step before the run stops naming
                                    # the rank that hangs (exit 6; fastssl.faults.Watchdog); 0 turns the watchdog off
    first_step_timeout: float = 1800  # ... for the first step of a process, which compiles (torch.compile, autotune)

    def __post_init__(self):
        self.log_with = _trackers("train.log_with", self.log_with)
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("train.compile", str(self.compile), ("auto", "on", "off"))
        _choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        _choice("train.compile_scope", self.compile_scope, ("backbone", "method"))
        _choice("train.host_alloc", self.host_alloc, HOST_ALLOCS)
        _choice("train.cpu_conv_wgrad", self.cpu_conv_wgrad, CPU_CONV_WGRADS)
        _choice("train.strategy", self.strategy, ("ddp", "fsdp"))
        _range("train.epochs", self.epochs, 1, None)
        _range("train.max_steps", self.max_steps, 0, None)
        _run_name("train.name", self.name)
        # YAML/overrides give booleans (or on/off, which str fields receive for them): one spelling.
        words = {"true": "true", "on": "true", "yes": "true", "1": "true", "false": "false", "off": "false",
                 "no": "false", "0": "false", "auto": "auto"}
        r = str(self.resume).lower()
        if r not in words:
            raise ConfigError(f"train.resume={self.resume!r} is not valid: expected true/false/auto")
        self.resume = words[r]
        _range("train.keep_checkpoints", self.keep_checkpoints, 1, None)
        _range("train.collective_timeout", self.collective_timeout, 0, None)
        _range("train.first_step_timeout", self.first_step_timeout, 0, None)


@dataclass
class EvalConfig:
    knn_k: int = 20                 # section 3.7.1: weighted kNN, k=20, T=0.07 (DINO's protocol)
    knn_temperature: float = 0.07
    every_epochs: int = 0           # >0: kNN + RankMe on the val subset every N epochs
    val_subset: int = 0             # >0: evaluate during training on the first N val images
    knn_stride: int = 1             # in-training kNN: the bank is every k-th train image (spread over every class);
                                    # the final evaluation always uses the whole split
    online_probe: bool = True       # linear head on detached features, trained alongside
    probe_lr: float = 0.1
    final: bool = True              # kNN/RankMe at the end (and on the random init)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- validation helpers

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid: {closest(str(value), list(choices))}")


def _range(key: str, value: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}={value!r} is out of range [{lo}, {hi if hi is not None else 'inf'}]")


TRACKERS = ("tensorboard", "wandb", "mlflow")
# the module(s) each tracker needs (any one of them), and what to install
_TRACKER_MODULES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
                    "wandb": (("wandb",), "wandb"), "mlflow": (("mlflow",), "mlflow")}


def _trackers(key: str, value: Any) -> str:
    """``train.log_with``: a comma-separated list of trackers (or none), normalised to ``a,b`` or ``none``."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    names: list[str] = []
    for part in str(value).split(","):
        name = part.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            raise ConfigError(f"{key}: unknown tracker {part.strip()!r}: {closest(name, ['none', *TRACKERS])} "
                              f"(several: {key}=tensorboard,wandb)")
        if name not in names:
            names.append(name)
    return ",".join(names) or "none"


def trackers(cfg: "Config") -> list[str]:
    """The trackers ``train.log_with`` names, in order (empty for none)."""
    return [] if cfg.train.log_with == "none" else cfg.train.log_with.split(",")


def _validate_trackers(cfg: "Config") -> None:
    """A tracker whose package is missing fails now, with the install command (not after the data loads)."""
    import importlib.util

    for name in trackers(cfg):
        modules, pip_name = _TRACKER_MODULES[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f"train.log_with={cfg.train.log_with} needs the {pip_name} package, which is not "
                              f"installed: pip install {pip_name}")


def _run_name(key: str, name: str) -> None:
    """A run name is a relative path that stays inside ``train.out_dir`` (SECURITY.md).

    Refused: absolute paths (POSIX ``/x``, Windows ``C:\\x`` or ``\\\\server``), any ``..``
    component, a home-directory ``~``, a NUL byte, or a name that is ``out_dir`` itself
    (``.``). Nested names (``ablations/lr0.1``) are allowed. Checked on the text, not by
    resolving: the run directory need not exist yet, and a symlink inside ``out_dir``
    is the owner's choice.
    """
    if not name:
        return  # empty: the trainer derives <method>-<backbone>-<data stem>
    import ntpath
    import posixpath

    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    why = None
    if "\0" in name:
        why = "holds a NUL byte"
    elif posixpath.isabs(name) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        why = "is an absolute path"
    elif ".." in parts:
        why = "has a '..' component"
    elif name.startswith("~"):
        why = "starts with '~'"
    elif not parts:
        why = "names train.out_dir itself"
    if why:
        raise ConfigError(f"{key}={name!r} {why}; it must be a relative name inside train.out_dir "
                          f"(e.g. {key}=simclr-rn50 or {key}=ablations/lr0.1); to write elsewhere, set train.out_dir")


def _method_config_cls(name: str) -> type:
    from fastssl.methods import METHODS

    try:
        return METHODS.meta(name)["config"]
    except KeyError as e:
        raise ConfigError(f"method.name: {e.args[0]}") from None


# A number as people type it: 1e-3, 3E-4, .5, 5., 1_000, -2e-5, +1.5 (Python's literal forms, no nan/inf).
_NUMBER = re.compile(r"[+-]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?")


def _number(value: Any) -> int | float | None:
    """``value`` as an int or float, or None when it is not a number.

    PyYAML follows YAML 1.1, whose floats need a dot: it reads ``1e-3``, ``3E-4`` and ``-2e-5``
    as strings, in a recipe and on the command line alike. Text that is a number is read here,
    digits-only text as an exact int (``1_000``), the rest as a float.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, str) or not _NUMBER.fullmatch(text := value.strip()):
        return None
    try:
        return int(text) if not any(c in text for c in ".eE") else float(text)
    except ValueError:  # misplaced underscores (1__0, 1_.5): not a number
        return None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}={value!r}: expected true/false")
    if tp is int:
        num = _number(value)
        if num is None or not math.isfinite(num) or num != int(num):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(num)
    if tp is float:
        num = _number(value)
        if num is None:
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(num)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: expected a string")
        # YAML turns on/off/yes/no into booleans; a str field (train.compile) wants the word back.
        return ("on" if value else "off") if isinstance(value, bool) else str(value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(f"{key}.{i}", v, inner) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict, validating keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            raise ConfigError(f"unknown config key {key!r}: {closest(key, valid)}")
        kwargs[k] = _coerce(key, v, hints[k])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}: {e}") from None


def _set_path(tree: dict, dotted: str, value: Any, all_keys: list[str]) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: index out of range (the list has {len(node)} items)")
            node = node[int(p)]
            continue
        if p not in node or node[p] is None:
            node[p] = {}
        elif not isinstance(node[p], (dict, list)):
            raise ConfigError(f"unknown config key {dotted!r}: {closest(dotted, all_keys)}")
        node = node[p]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{dotted}: index out of range (the list has {len(node)} items)")
        node[int(last)] = value
    else:
        node[last] = value


def all_keys(cfg: Config | None = None) -> list[tuple[str, str, Any]]:
    """Every settable key as (dotted name, type name, default/current value)."""
    cfg = cfg or Config()
    out = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            key = f"{prefix}.{f.name}"
            if dataclasses.is_dataclass(val):
                walk(val, key)
            elif f.name == "views":
                out.append((key, "list of view specs", f"(preset of {prefix}.recipe)"))
                for vf in dataclasses.fields(ViewSpec):
                    out.append((f"{key}.N.{vf.name}", typing.get_type_hints(ViewSpec)[vf.name].__name__, vf.default))
            else:
                tp = hints[f.name]
                out.append((key, getattr(tp, "__name__", str(tp)), val))

    for f in dataclasses.fields(cfg):
        walk(getattr(cfg, f.name), f.name)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=0.5'`` -> ``('optim.lr', 0.5)`` (values parsed as YAML scalars)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. optim.batch_size=256)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe, apply ``key=value`` overrides, validate; raises :class:`ConfigError`."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():  # not a file: a packaged recipe's name (simclr_rn50, demo/simclr, configs/demo/simclr.yaml)
            from fastssl.recipes import RecipeNotFound, resolve_recipe

            try:
                p = resolve_recipe(str(path))
            except RecipeNotFound as e:
                raise ConfigError(f"config {e.args[0]}") from None
        tree = read_recipe(p)
    parsed = [parse_override(o) for o in overrides]
    # The method's name decides which keys method.* accepts: apply it first.
    for k, v in parsed:
        if k == "method.name":
            tree.setdefault("method", {})
            tree["method"] = {"name": v} if tree["method"].get("name") not in (None, v) else {**tree["method"], "name": v}
    method_name = (tree.get("method") or {}).get("name", MethodConfig.name)
    mcls = _method_config_cls(method_name)
    keys_now = [k for k, _, _ in all_keys(Config(method=mcls()))]
    for k, v in parsed:
        if k.startswith("aug.views."):
            _materialize_views(tree)
        top = k.split(".")[0]
        if top not in {f.name for f in dataclasses.fields(Config)} or "." not in k:
            raise ConfigError(f"unknown config key {k!r}: {closest(k, keys_now)}")
        _set_path(tree, k, v, keys_now)
    for sec in tree:
        if sec not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"unknown config section {sec!r}: {closest(sec, [f.name for f in dataclasses.fields(Config)])}")
    sections = {}
    for f in dataclasses.fields(Config):
        cls = mcls if f.name == "method" else f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name]
        sections[f.name] = _build(cls, tree.get(f.name), f.name)
    cfg = Config(**sections)
    _validate_cross(cfg)
    return cfg


def read_recipe(path: str | Path) -> dict:
    """The YAML recipe at ``path`` as one tree, its ``defaults`` resolved.

    ``defaults: [_base]`` (or ``defaults: _base.yaml``) names recipes this one builds on, as in
    Hydra: paths relative to this file's folder (so packaged recipes find theirs too), ``.yaml``
    optional. The bases are merged in order, then this file's own keys on top: mappings merge
    key by key, anything else (a number, a list such as ``aug.views``) replaces the base's value.
    A ``method`` section naming another method replaces the base's whole section (its keys
    belong to the other method). Bases may have bases; a loop is an error.
    """
    return _read_recipe(Path(path), ())


def _read_recipe(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        loop = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"{path}: its defaults include itself ({loop})")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (defaults, data, aug, model, method, "
                          f"optim, train, eval)")
    bases = tree.pop("defaults", None)
    if bases is None:
        return tree
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(f"{path}: defaults={bases!r}: expected a recipe file name or a list of them, relative to "
                          f"this file (e.g. defaults: [_base])")
    merged: dict = {}
    for name in bases:
        merged = _merge(merged, _read_recipe(_base_path(path, name), (*chain, path)))
    return _merge(merged, tree)


def _base_path(recipe: Path, name: str) -> Path:
    """The file ``defaults: [name]`` in ``recipe`` names: relative to its folder, ``.yaml`` optional."""
    p = recipe.parent / name.strip()
    if not p.is_file() and p.suffix not in (".yaml", ".yml"):
        p = p.with_name(p.name + ".yaml")
    if not p.is_file():
        near = sorted(q.stem for q in recipe.parent.glob("*.yaml") if q.resolve() != recipe)
        raise ConfigError(f"{recipe}: defaults names {name!r}, but there is no {p}: {closest(name, near)}")
    return p


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base`` (see :func:`read_recipe`); neither is modified."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        other_method = (k == "method" and isinstance(old, dict) and isinstance(v, dict)
                        and v.get("name", old.get("name")) != old.get("name"))
        if other_method:
            out[k] = copy.deepcopy(v)
        elif isinstance(old, dict) and isinstance(v, dict):
            out[k] = _merge(old, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _materialize_views(tree: dict) -> None:
    """Make ``aug.views`` an explicit list (from the recipe) so ``aug.views.N.key=`` can edit it."""
    aug = tree.setdefault("aug", {})
    if not aug.get("views"):
        recipe = aug.get("recipe") or _default_recipe(tree)
        aug["views"] = [dataclasses.asdict(v) for v in preset(recipe)]


def _default_recipe(tree: dict) -> str:
    name = (tree.get("method") or {}).get("name", MethodConfig.name)
    from fastssl.methods import METHODS

    return METHODS.meta(name).get("recipe", "simclr") if name in METHODS else "simclr"


def _validate_cross(cfg: Config) -> None:
    """Checks that involve several sections."""
    if not cfg.aug.recipe:
        from fastssl.methods import METHODS

        cfg.aug.recipe = METHODS.meta(cfg.method.name).get("recipe", "simclr")
    try:
        preset(cfg.aug.recipe)
    except KeyError as e:
        raise ConfigError(f"aug.recipe: {e.args[0]}") from None
    views = cfg.aug.resolved_views()
    if not views:
        raise ConfigError("aug: the recipe produces no views")
    for i, v in enumerate(views):
        why = v.problem()
        if why:
            raise ConfigError(f"aug.views.{i}.{why}")
    if cfg.train.res_start and cfg.train.res_start > cfg.aug.global_size:
        raise ConfigError(f"train.res_start={cfg.train.res_start} must be <= aug.global_size={cfg.aug.global_size}")
    _validate_backbone(cfg.model.backbone)
    _validate_backend(cfg)
    _validate_trackers(cfg)


def _validate_backbone(name: str) -> None:
    """``model.backbone`` must name a fastssl backbone or a timm model: checked now, not after the loaders."""
    from fastssl.models import BACKBONES

    if name in BACKBONES:
        return
    import timm

    if name in timm.list_models():
        return
    ours = list(BACKBONES.names())
    hint = closest(name, ours)
    if not hint.startswith("did you mean"):
        hint = closest(name, ours + list(timm.list_models()))
    raise ConfigError(f"model.backbone={name!r} is not a fastssl backbone nor a timm model: {hint}")


def _validate_backend(cfg: Config) -> None:
    """``data.backend`` is a known back-end, and fits the data it will read (when that data is there)."""
    import os

    from fastssl.pipelines.loader import BACKENDS, resolve_backend
    from fastssl.pipelines.webdataset_backend import is_shard_spec

    _choice("data.backend", cfg.data.backend, BACKENDS)
    for split in ("train", "val"):
        path = getattr(cfg.data, split)
        if path and (os.path.exists(path) or is_shard_spec(path)):
            try:
                resolve_backend(path, cfg.data.backend)
            except ValueError as e:
                raise ConfigError(f"data.{split}: {e}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from :func:`to_dict` output (a run directory's config.yaml)."""
    d = copy.deepcopy(d)
    mcls = _method_config_cls(d.get("method", {}).get("name", MethodConfig.name))
    sections = {}
    for f in dataclasses.fields(Config):
        cls = mcls if f.name == "method" else typing.get_type_hints(Config)[f.name]
        sections[f.name] = _build(cls, d.get(f.name), f.name)
    return Config(**sections)


# ----------------------------------------------------------------------------- derived values


@dataclass(frozen=True)
class Derived:
    """Everything computed from the config and the data size, in one place."""

    world_size: int
    micro_batch: int                # images per process per forward
    global_batch: int               # images per optimizer step (= optim.batch_size)
    steps_per_epoch: int            # optimizer steps
    total_steps: int                # optimizer steps the schedules span
    run_steps: int                  # steps this run will take (max_steps cap)
    lr: float                       # peak learning rate after batch scaling
    warmup_steps: int


def derive(cfg: Config, num_samples: int, world_size: int = 1) -> Derived:
    """Per-process batch, scaled LR (cookbook section 3.8.1) and step counts."""
    gb = cfg.optim.batch_size
    denom = world_size * cfg.optim.accum_steps
    if gb % denom:
        raise ConfigError(
            f"optim.batch_size={gb} must be divisible by processes x optim.accum_steps = {world_size} x "
            f"{cfg.optim.accum_steps}; try optim.batch_size={max(denom, gb // denom * denom)}")
    if num_samples < gb:
        raise ConfigError(f"the training set has {num_samples} images, fewer than optim.batch_size={gb}: "
                          f"lower optim.batch_size or use more data")
    steps_per_epoch = num_samples // gb  # drop_last: every step sees a full batch
    total = steps_per_epoch * cfg.train.epochs
    run = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    ratio = gb / cfg.optim.base_batch
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.optim.lr_scaling]
    return Derived(world_size=world_size, micro_batch=gb // denom, global_batch=gb,
                   steps_per_epoch=steps_per_epoch, total_steps=total, run_steps=run,
                   lr=cfg.optim.lr * scale, warmup_steps=int(round(cfg.optim.warmup_epochs * steps_per_epoch)))
