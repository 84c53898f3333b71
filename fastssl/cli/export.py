"""``fastssl-export RUN_DIR|CKPT [--format auto|torchvision|timm|native] [--out FILE] [--pt]``.

Getting the backbone out is what an SSL run is for. This writes the backbone alone (no
projector, predictor, teacher or optimizer) as safetensors (``--pt`` or an ``--out`` ending
in ``.pt``/``.pth``: a ``torch.save`` state dict instead), with a small JSON beside it
(same name, ``.json``): architecture, image size, normalisation, the run and step it came
from, and the call that loads it. Formats:

* ``torchvision``: torchvision's ResNet keys without ``fc``. fastssl's ``resnet18/34/50/101``
  (and timm's ``resnet152``) are timm ResNets, which keep torchvision's parameter names, so::

      m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()
      m.load_state_dict(safetensors.torch.load_file(path), strict=True)

* ``timm``: loads offline through timm's own pretrained path::

      timm.create_model(meta["timm"]["model_name"], pretrained=True,
                        pretrained_cfg_overlay=dict(file=path, **meta["timm"]["pretrained_cfg_overlay"]),
                        **meta["timm"]["kwargs"])

  ``pretrained_cfg_overlay`` carries ``num_classes=0`` (the file has no classifier, so timm
  builds the model headless and loads strictly; without it timm builds a 1000-class ``fc``
  and refuses the file for the missing ``fc.*``), and the run's ``input_size``/``mean``/``std``,
  so ``timm.data.resolve_data_config(model=m)`` gives the run's preprocessing. fastssl's ViTs
  are written in timm's ``VisionTransformer`` layout (class-token position folded into
  ``pos_embed``); ``kwargs`` rebuild the same network (``fc_norm=False``: fastssl's ``avg``
  pool means the patch tokens *after* the final norm; ``dynamic_img_size=True``: any input
  size, position embeddings resampled as in training).
* ``native``: the backbone module's own state dict; :func:`load_backbone` rebuilds it from
  the JSON's ``model`` section. The only format for fastssl's CPU ResNets (``resnet_tiny``,
  ``resnet_nano``, ``resnet_nano_s2``: a 3x3 stem without max-pool, which neither library builds).
* ``auto`` (default): torchvision for torchvision ResNets, timm for ViTs and other timm
  models, native otherwise.

Exit status: 0 written, 2 bad input (checkpoint, format), 4 the disk is full (the partial
file is removed; the line names the space needed).

After writing, the file is loaded back the way the JSON says and its features are compared
with the run's own ``method.embed`` on random images (``verified`` in the JSON;
``--no-verify`` skips it). The checkpoint is read with ``weights_only=True``;
``--trust-checkpoint`` opens one that needs full pickle (SECURITY.md).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

FORMATS = ("auto", "torchvision", "timm", "native")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# fastssl ViT name -> the timm model whose defaults it matches (the JSON's kwargs pin every size anyway)
TIMM_VITS = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_small_patch16": "vit_small_patch16_224",
             "vit_base_patch16": "vit_base_patch16_224", "vit_small_patch8": "vit_small_patch8_224",
             "vit_base_patch8": "vit_base_patch8_224", "vit_micro_patch8": "vit_tiny_patch16_224"}
EVAL_CROP_PCT = 0.875  # pipelines.crops.EVAL_CROP_RATIO: evaluation resizes to size / 0.875, centre-crops size


class ExportError(ValueError):
    """The backbone cannot be written in the requested format; the message says which format can."""


# ----------------------------------------------------------------------------- what the run holds


def _core(m: nn.Module) -> nn.Module:
    return getattr(m, "_orig_mod", m)   # a torch.compile wrapper around the backbone


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as plain contiguous CPU tensors (safetensors refuses views and shared storage)."""
    from fastssl.compile import clean_state_dict

    return {k: v.detach().cpu().contiguous().clone() for k, v in clean_state_dict(_core(m).state_dict()).items()}


def _is_timm_model(m: nn.Module) -> bool:
    return type(_core(m)).__module__.startswith("timm.")


def _is_fastssl_vit(m: nn.Module) -> bool:
    from fastssl.models.vit import is_vit

    return is_vit(m)


def pick_format(fmt: str, name: str, backbone: nn.Module) -> str:
    """``auto`` -> the format this backbone loads in elsewhere; an impossible request -> :class:`ExportError`."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    vit, timm_model = _is_fastssl_vit(backbone), _is_timm_model(backbone)
    tv_ok = timm_model and name in TORCHVISION_RESNETS
    timm_ok = (vit and name in TIMM_VITS) or (timm_model and not _custom_stem(backbone))
    if fmt == "auto":
        return "torchvision" if tv_ok else "timm" if timm_ok else "native"
    if fmt == "torchvision" and not tv_ok:
        if name in ("resnet_tiny", "resnet_nano", "resnet_nano_s2"):
            why = (f"{name!r} is fastssl's CIFAR-style ResNet (3x3 stem, no max-pool, "
                   "one block per stage), not a torchvision architecture")
        elif vit:
            why = f"{name!r} is a ViT; torchvision's ViTs use another layout"
        else:
            why = f"{name!r} is not one of torchvision's ResNets ({', '.join(TORCHVISION_RESNETS)})"
        raise ExportError(f"--format torchvision: {why}. Use --format native (fastssl.cli.export.load_backbone)"
                          + (" or --format timm" if timm_ok else "") + ".")
    if fmt == "timm" and not timm_ok:
        raise ExportError(f"--format timm: {name!r} is not an architecture timm.create_model builds "
                          "(fastssl's own stem or layout). Use --format native (fastssl.cli.export.load_backbone).")
    return fmt


def _custom_stem(backbone: nn.Module) -> bool:
    # resnet_tiny / resnet_nano(_s2) are timm ResNet instances with a replaced stem (a 3x3 conv, stride 1
    # or 2, and no max-pool): timm cannot rebuild them by name. timm's own ResNets always pool the stem.
    m = _core(backbone)
    return isinstance(getattr(m, "maxpool", None), nn.Identity) and getattr(getattr(m, "conv1", None),
                                                                            "kernel_size", None) == (3, 3)


# ----------------------------------------------------------------------------- the three layouts


def _torchvision_state(name: str, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """timm ResNet keys == torchvision ResNet keys; checked against torchvision's model, minus ``fc``."""
    import torchvision

    sd = _state(backbone)
    want = {k: v.shape for k, v in getattr(torchvision.models, name)().state_dict().items() if not k.startswith("fc.")}
    got = {k: v.shape for k, v in sd.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got))[:5] or [k for k in want if want[k] != got[k]][:5]
        raise ExportError(f"--format torchvision: the backbone's tensors differ from torchvision's {name} "
                          f"(e.g. {diff}); use --format timm or native")
    return sd


def _timm_vit_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """fastssl ViT -> timm VisionTransformer keys.

    fastssl keeps the class token's position apart (``cls_pos``) so patch positions can be
    resampled alone; timm adds ``pos_embed`` (1, 1 + N, D) to cat(cls_token, patches), i.e.
    the same sum with ``pos_embed = cat(cls_pos, pos_embed)``. The patch conv is timm's
    ``patch_embed.proj``. Blocks use timm's layer names already (norm1, attn.qkv, attn.proj,
    ls1.gamma, norm2, mlp.fc1/fc2, ls2.gamma).
    """
    sd = _state(backbone)
    out = {}
    for k, v in sd.items():
        if k == "cls_pos":
            continue
        if k == "pos_embed":
            v = torch.cat([sd["cls_pos"], v], dim=1)
        elif k.startswith("patch_embed."):
            k = "patch_embed.proj." + k.split(".", 1)[1]
        out[k] = v
    return out


def _timm_spec(name: str, backbone: nn.Module, model_cfg, image_size: int, mean, std) -> dict:
    """What timm.create_model needs besides the file: model name, model kwargs, pretrained_cfg overlay."""
    overlay = {"num_classes": 0, "input_size": [3, image_size, image_size], "mean": list(mean), "std": list(std),
               "crop_pct": EVAL_CROP_PCT}
    if _is_fastssl_vit(backbone):
        v = _core(backbone)
        kwargs = {"patch_size": v.patch, "embed_dim": v.dim, "depth": len(v.blocks),
                  "num_heads": v.blocks[0].attn.heads, "img_size": v.grid[0] * v.patch,
                  "mlp_ratio": v.blocks[0].mlp.fc1.out_features / v.dim, "global_pool": v.global_pool,
                  "fc_norm": False, "dynamic_img_size": True}
        if model_cfg.layer_scale > 0:
            kwargs["init_values"] = model_cfg.layer_scale
        return {"model_name": TIMM_VITS[name], "kwargs": kwargs, "pretrained_cfg_overlay": overlay}
    return {"model_name": name, "kwargs": {}, "pretrained_cfg_overlay": overlay}


# ----------------------------------------------------------------------------- loading an export


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_meta(path: str | Path) -> dict:
    """The JSON written beside an export (``FILE`` with its suffix replaced by ``.json``)."""
    return json.loads(Path(path).with_suffix(".json").read_text())


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuild an exported backbone from its file and JSON, in eval mode, the way the JSON's ``load`` says.

    torchvision: ``torchvision.models.<arch>()`` with ``fc = Identity``, strict load; timm:
    ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``; native:
    :func:`fastssl.models.create_backbone` from the JSON's ``model`` section, strict load.
    """
    path = Path(path)
    meta = read_meta(path)
    fmt = meta["format"]
    if fmt == "torchvision":
        import torchvision

        m = getattr(torchvision.models, meta["architecture"])()
        m.fc = nn.Identity()
        m.load_state_dict(_read_weights(path), strict=True)
    elif fmt == "timm":
        import timm

        t = meta["timm"]
        overlay = dict(t["pretrained_cfg_overlay"], file=str(path))
        if "input_size" in overlay:                                 # JSON holds lists; timm's configs hold tuples
            overlay["input_size"] = tuple(overlay["input_size"])
        m = timm.create_model(t["model_name"], pretrained=True, pretrained_cfg_overlay=overlay, **t["kwargs"])
    elif fmt == "native":
        from fastssl.config import ModelConfig
        from fastssl.models import create_backbone

        m, _ = create_backbone(ModelConfig(**meta["model"]))
        m.load_state_dict(_read_weights(path), strict=True)
    else:
        raise ExportError(f"{path}: unknown export format {fmt!r} in its JSON")
    return m.eval()


# ----------------------------------------------------------------------------- export


def _run_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _load(path: Path, device: str, trust: bool):
    """``checkpoint.load_for_eval``, passing ``trust`` only where that function takes it (older versions do not)."""
    from fastssl import checkpoint

    if "trust" in inspect.signature(checkpoint.load_for_eval).parameters:
        return checkpoint.load_for_eval(path, device, trust=trust)
    if trust:
        logging.getLogger(__name__).warning("this fastssl's load_for_eval has no trust option; --trust-checkpoint "
                                            "ignored")
    return checkpoint.load_for_eval(path, device)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_snippet(fmt: str, fname: str, meta: dict) -> str:
    load = "safetensors.torch.load_file" if fname.endswith(".safetensors") else "torch.load"
    if fmt == "torchvision":
        return (f"m = torchvision.models.{meta['architecture']}(); m.fc = torch.nn.Identity(); "
                f"m.load_state_dict({load}({fname!r}), strict=True)")
    if fmt == "timm":
        t = meta["timm"]
        kw = "".join(f", {k}={v!r}" for k, v in t["kwargs"].items())
        return (f"timm.create_model({t['model_name']!r}, pretrained=True, pretrained_cfg_overlay=dict(file={fname!r}, "
                f"**meta['timm']['pretrained_cfg_overlay']){kw})")
    return f"fastssl.cli.export.load_backbone({fname!r})"


def export(path: str | Path, fmt: str = "auto", out: str | Path | None = None, *, pt: bool = False,
           trust: bool = False, verify: bool = True, device: str = "cpu") -> Path:
    """Write a run's backbone in ``fmt`` and its JSON; returns the weights file's path (see the module docstring)."""
    from fastssl import checkpoint
    from fastssl.config import to_dict
    from fastssl.pipelines.loader import IMAGENET_MEAN, IMAGENET_STD

    ckpt = checkpoint.resolve(path)
    cfg, method, step = _load(ckpt, device, trust)
    name, backbone = cfg.model.backbone, method.backbone
    fmt = pick_format(fmt, name, backbone)
    run = _run_dir(Path(ckpt))
    if out is None:
        out = run / "export" / f"{name}-{fmt}-step{step}{'.pt' if pt else '.safetensors'}"
    out = Path(out)
    as_pt = pt or out.suffix in (".pt", ".pth")
    if out.suffix == ".json":
        raise ExportError(f"--out {out}: the JSON is written beside the weights; name the weights file")
    image_size = cfg.aug.global_size
    meta: dict = {"format": fmt, "architecture": name, "backbone": name, "feat_dim": int(method.feat_dim),
                  "image_size": image_size,
                  "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                    "input": "RGB scaled to [0, 1], then (x - mean) / std per channel",
                                    "eval_crop": f"resize the short side to image_size / {EVAL_CROP_PCT}, "
                                                 "centre-crop image_size"},
                  "run": {"dir": str(run.resolve()), "name": run.name, "checkpoint": str(Path(ckpt).resolve()),
                          "step": step, "method": cfg.method.name},
                  "model": to_dict(cfg)["model"]}
    if fmt == "torchvision":
        state = _torchvision_state(name, backbone)
    elif fmt == "timm":
        meta["timm"] = _timm_spec(name, backbone, cfg.model, image_size, IMAGENET_MEAN, IMAGENET_STD)
        meta["architecture"] = meta["timm"]["model_name"]
        state = _timm_vit_state(backbone) if _is_fastssl_vit(backbone) else _state(backbone)
    else:
        state = _state(backbone)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_weights(state, out, as_pt, fmt)
    from fastssl import __version__

    meta.update(weights=out.name, weights_format="pt" if as_pt else "safetensors", sha256=_sha256(out),
                load=_load_snippet(fmt, out.name, meta), fastssl_version=__version__)
    json_path = out.with_suffix(".json")
    _write_json(json_path, meta, out)
    if verify:
        meta["verified"] = _verify(out, method, image_size)
        _write_json(json_path, meta, out)
    return out


def _write_weights(state: dict, out: Path, as_pt: bool, fmt: str) -> None:
    """The weights through ``out.tmp`` and a rename; a full disk removes the partial file and raises DiskFull."""
    from fastssl import fault_injection
    from fastssl.checkpoint import state_nbytes
    from fastssl.faults import DiskFull, is_disk_full

    tmp = out.with_name(out.name + ".tmp")
    try:
        if fault_injection.PLAN is not None and fault_injection.fire("enospc", "export"):
            tmp.write_bytes(b"\0" * 4096)  # what reached the disk before it filled
            raise fault_injection.enospc("export")
        if as_pt:
            torch.save(state, tmp)
        else:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt", "fastssl_export": fmt})  # timm/HF read "format"
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        # torch.save and safetensors report a failed write as RuntimeError/SafetensorError text: ask the disk.
        if is_disk_full(e) or _no_room(out, state_nbytes(state)) or "No space left" in str(e):
            raise DiskFull(out, state_nbytes(state), "export", fix="export again") from None
        raise
    tmp.replace(out)


def _no_room(out: Path, needed: int) -> bool:
    import shutil

    try:
        return shutil.disk_usage(out.parent).free < needed
    except OSError:
        return False


def _write_json(json_path: Path, meta: dict, weights: Path) -> None:
    """The JSON beside the weights; on a full disk both go (weights without their JSON cannot be loaded)."""
    from fastssl.faults import DiskFull, is_disk_full

    text = json.dumps(meta, indent=2) + "\n"
    tmp = json_path.with_name(json_path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(json_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if not is_disk_full(e):
            raise
        weights.unlink(missing_ok=True)
        raise DiskFull(json_path, len(text), "export metadata", fix="export again") from None


@torch.no_grad()
def _verify(out: Path, method: nn.Module, image_size: int, n: int = 2) -> dict:
    """Load the export back as a user would and compare its features with the run's ``embed`` on ``n`` images."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, image_size, image_size, generator=g)
    dev = next(method.parameters()).device
    want = method.embed(x.to(dev)).float().cpu()
    got = load_backbone(out)(x).float()
    err = (got - want).abs().max().item()
    tol = 1e-4 * max(1.0, want.abs().max().item())
    if got.shape != want.shape or not err <= tol:
        out.unlink(missing_ok=True)
        raise ExportError(f"{out}: the exported backbone's features differ from the run's (max |diff| {err:.3g}, "
                          f"shapes {tuple(got.shape)} vs {tuple(want.shape)}); nothing written")
    return {"images": n, "image_size": image_size, "max_abs_diff": err}


def main(argv: list[str] | None = None) -> int:
    from fastssl.checkpoint import TRUST_FLAG, TRUST_HELP

    ap = argparse.ArgumentParser(prog="fastssl-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="run directory (uses checkpoints/last.pt) or a checkpoint file")
    ap.add_argument("--format", default="auto", choices=FORMATS,
                    help="auto: torchvision for torchvision ResNets, timm for ViTs / timm models, else native")
    ap.add_argument("--out", default=None,
                    help="weights file (default RUN_DIR/export/<backbone>-<format>-step<N>.safetensors); "
                         "the JSON goes beside it")
    ap.add_argument("--pt", action="store_true", help="write a torch.save state dict (.pt) instead of safetensors")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip loading the file back and comparing its features with the run's")
    ap.add_argument(TRUST_FLAG, dest="trust_checkpoint", action="store_true", help=TRUST_HELP)
    args = ap.parse_args(argv)

    from fastssl.checkpoint import CheckpointError
    from fastssl.config import ConfigError
    from fastssl.faults import DISK_FULL_EXIT_CODE, DiskFull
    from fastssl.logs import configure

    configure()
    try:
        out = export(args.path, args.format, args.out, pt=args.pt, trust=args.trust_checkpoint,
                     verify=not args.no_verify)
    except DiskFull as e:  # the checkpoint it reads is untouched: the one line says where the space ran out
        print(f"fastssl-export: error: {e}", file=sys.stderr)
        return DISK_FULL_EXIT_CODE
    except (FileNotFoundError, CheckpointError, ConfigError, ExportError) as e:
        print(f"fastssl-export: error: {e}", file=sys.stderr)
        return 2
    meta = read_meta(out)
    print(f"wrote {out} ({meta['format']}: {meta['architecture']}, step {meta['run']['step']}) and "
          f"{out.with_suffix('.json').name}")
    print(f"load: {meta['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
