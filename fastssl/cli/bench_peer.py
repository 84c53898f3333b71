"""``fastssl-bench peer``: end-to-end pretraining against the peer library (lightly), side by side.

    fastssl-bench peer --data /tmp/peer --n 2000 --methods simclr,dino --rounds 2 --out peer.json
    fastssl-bench peer --smoke --data DIR --json          # tiny sizes: checks the code paths (a test runs it)

With the defaults (ResNet-18, 96 px, batch 128, 12 timed steps) one round of SimCLR's four
CPU arms took 6 minutes on two idle cores (two rounds: 740 s), DINO's about twice that.

Arms, per method (SimCLR, DINO), each a fresh process, over interleaved rounds (the arm
order alternates between rounds, so a slow drift of a shared machine hits every arm alike).
The headline is fastssl's images/s over lightly-tuned's when that arm ran (over lightly's
otherwise): compile and channels_last are two lines any lightly user can add, so the quotient
against the tuned arm is what the data path (and the method's implementation) alone is worth.
Default arms: all five with ``--device cuda``; on the CPU all but lightly-tuned (inductor's
compile takes minutes there and gains little), which ``--arms`` adds.

- ``lightly``: lightly's documented plain-PyTorch loop (its examples/pytorch/simclr.py and
  dino.py): torchvision ``resnet18`` with ``fc`` removed, ``SimCLRProjectionHead(512, 512,
  128)`` + ``NTXentLoss()`` + SGD(lr 0.06), or the DINO student/teacher with
  ``DINOProjectionHead(512, 512, 64, 2048)``, ``DINOLoss(output_dim=2048,
  warmup_teacher_temp_epochs=5)``, Adam(lr 1e-3), cosine EMA momentum 0.996 -> 1 and the
  last layer frozen in epoch 0; data: ``LightlyDataset(folder, SimCLRTransform /
  DINOTransform)`` in a DataLoader (shuffle, drop_last, ``--workers``). ``--arch
  vit_small_patch16``: timm's ``vit_small_patch16_224(num_classes=0, dynamic_img_size=True)``
  (lightly's ViT-S/16 DINO benchmark's backbone; the CLS token, 384 features), the same
  21.7 M parameters as fastssl's. ``--local-views``: DINO's local crops on both sides.
- ``lightly-tuned``: the ``lightly`` arm plus the two lines a careful user adds, nothing else:
  ``model.to(memory_format=torch.channels_last)`` (and channels_last inputs) and
  ``torch.compile`` in place of what the loop calls (SimCLR's model; DINO's student forward
  and ``forward_teacher``), with the trainer's options (``dynamic=False``; backend
  ``--compile-backend``). Each lightly arm records its ``settings``: they differ in
  ``channels_last``, ``compile`` and ``compile_options`` only (a test checks it).
- ``fastssl``: ``fastssl-train`` (``python -m fastssl.train``) with the matching settings:
  same photos (the ffcv ``.beton`` made from the folder, or the folder with
  ``--backend torch``), timm ``resnet18`` (the same 11.2 M backbone parameters), the same
  head sizes, loss temperature, optimizer, learning rate (constant), batch, image sizes
  and steps, lightly's jitter strengths. images/s and losses come from the run's
  ``metrics.jsonl`` (``train.log_every=1``), not from a loop of ours.
- ``bare-fastssl`` / ``bare-lightly``: the bare model, no data: forward + backward +
  optimizer step on one fixed batch of random views of the same shapes, with fastssl's
  method (``fastssl-bench step``'s code: channels_last, the trainer's optimizer) and with
  the lightly arm's model, loss and optimizer. The faster of the two is ``bare``, the
  limit of a training step on this machine; each arm is reported against it and
  against its own model's bare figure.
- ``stages-fastssl`` (not timed): the fastssl data path's CPU cost by stage, measured in
  isolation in a fresh process (the lightly arm profiles its own stages after its run).

images/s of an end-to-end arm = images of the timed steps / their summed step time (from
fetching the batch to the end of the optimizer step), after ``--warmup`` steps plus the batches the
arm's loader holds ready (``warmup_steps``: its queue fills while the first step compiles); the trainer
measures its steps the same way. First/last loss: the loss of the first and of the last
step. CPU time per image, by stage (milliseconds of CPU, all threads/processes):
decode, crop (RandomResizedCrop + flip), photometric (jitter, grayscale, blur, solarise,
to-tensor, normalise) and model (forward + backward + optimizer):
- lightly: decode/crop/photometric timed op by op on ``--profile-images`` photos, one
  thread, after the run; model = the main process's CPU time over the timed steps (its
  DataLoader workers do the data work);
- fastssl: ffcv decodes and crops in one pass (``decode+crop``): CPU time of the loader
  without the photometric stage over a whole epoch; photometric: the CPU stage on those
  crops; model: the ``bare-fastssl`` arm's CPU time per image.
``process_cpu_ms_per_image``: the whole arm process's CPU time (its children included,
start-up included) over the images it trained on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("simclr", "dino")
ARMS = ("lightly", "lightly-tuned", "fastssl", "bare-fastssl", "bare-lightly")
# The CPU default leaves lightly-tuned out: inductor takes minutes per shape on a few cores and gains
# little there (see engine.cpu_weight_gradients); the arm answers a GPU question. --arms adds it.
CPU_ARMS = ("lightly", "fastssl", "bare-fastssl", "bare-lightly")
LIGHTLY_ARMS = ("lightly", "lightly-tuned")
LIGHTLY_SIMCLR = {"temperature": 0.5, "lr": 0.06, "proj_dim": 128}   # NTXentLoss(), SGD(lr=0.06)
LIGHTLY_DINO = {"hidden": 512, "bottleneck": 64, "out_dim": 2048, "lr": 1e-3, "teacher_temp": 0.04,
                "momentum": 0.996, "warmup_teacher_temp_epochs": 5, "freeze_last_layer": 1}


# ----------------------------------------------------------------------------- helpers


def _cpu(who=resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _cpu_all() -> float:
    return _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "timm", "lightly", "ffcv", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    head = _git("rev-parse", "--short", "HEAD")
    if head:
        out["fastssl_head"] = head
        out["train_py_commit"] = _git("log", "-1", "--format=%h", "--", "fastssl/train.py")
        out["train_py_dirty"] = bool(_git("status", "--porcelain", "--", "fastssl/train.py"))
    return out


def local_size_for(size: int, patch: int = 1) -> int:
    """DINO's local crop at ``size`` px globals: 96/224 of it (96 px at 224), as fastssl-bench loader, rounded
    to a multiple of ``patch`` (a ViT's patch size: both arms' ViTs need whole patches)."""
    return max(16, patch * round(size * 96 / 224 / patch))


FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "vit_small_patch16": 384}
# The lightly arm's ViT: timm's, as lightly's own ViT-S/16 DINO benchmark builds it (dynamic_img_size for the
# 96 px local crops); num_classes=0 leaves the CLS-token features, what its example's dino_vits16 returns.
TIMM_VIT = {"vit_small_patch16": "vit_small_patch16_224"}


def proj_hidden(arch: str) -> int:
    """SimCLR's projector width: the backbone's feature width, as in lightly's examples
    (``SimCLRProjectionHead(512, 512, 128)`` on ResNet-18, its default 2048-2048-128 on ResNet-50)."""
    if arch not in FEATURE_DIM:
        raise ValueError(f"--arch {arch!r}: the peer benchmark knows {sorted(FEATURE_DIM)}")
    return FEATURE_DIM[arch]


def _count(params) -> int:
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- the lightly side


class LightlyArm:
    """lightly's documented SimCLR / DINO example: model, criterion, optimizer and one training step."""

    def __init__(self, method: str, device: str = "cpu", arch: str = "resnet18", precision: str = "fp32",
                 tuned: bool = False, compile_backend: str = "inductor", compile_mode: str | None = None):
        import copy

        import torch
        import torchvision
        from torch import nn

        self.method, self.device, self.tuned = method, device, tuned
        # bf16 as a lightly user gets it (Lightning's precision="bf16-mixed" is autocast): the loop's
        # forward passes and loss under torch.autocast, parameters and optimizer in fp32.
        self.autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
        if arch in TIMM_VIT:
            import timm

            backbone = timm.create_model(TIMM_VIT[arch], num_classes=0, dynamic_img_size=True)
            feat = backbone.num_features  # 384
        else:
            resnet = getattr(torchvision.models, arch)()
            feat = resnet.fc.in_features  # 512 (resnet18) / 2048 (resnet50)
            backbone = nn.Sequential(*list(resnet.children())[:-1])
        if method == "simclr":
            from lightly.loss import NTXentLoss
            from lightly.models.modules import SimCLRProjectionHead

            c = LIGHTLY_SIMCLR

            class SimCLR(nn.Module):
                def __init__(self, backbone):
                    super().__init__()
                    self.backbone = backbone
                    self.projection_head = SimCLRProjectionHead(feat, proj_hidden(arch), c["proj_dim"])

                def forward(self, x):
                    return self.projection_head(self.backbone(x).flatten(start_dim=1))

            self.model = SimCLR(backbone).to(device)
            self.criterion = NTXentLoss(temperature=c["temperature"])
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=c["lr"])
            self.backbone = self.model.backbone
        elif method == "dino":
            from lightly.loss import DINOLoss
            from lightly.models.modules import DINOProjectionHead
            from lightly.models.utils import deactivate_requires_grad

            c = LIGHTLY_DINO

            class DINO(nn.Module):
                def __init__(self, backbone, input_dim):
                    super().__init__()
                    self.student_backbone = backbone
                    self.student_head = DINOProjectionHead(input_dim, c["hidden"], c["bottleneck"], c["out_dim"],
                                                           freeze_last_layer=c["freeze_last_layer"])
                    self.teacher_backbone = copy.deepcopy(backbone)
                    self.teacher_head = DINOProjectionHead(input_dim, c["hidden"], c["bottleneck"], c["out_dim"])
                    deactivate_requires_grad(self.teacher_backbone)
                    deactivate_requires_grad(self.teacher_head)

                def forward(self, x):
                    return self.student_head(self.student_backbone(x).flatten(start_dim=1))

                def forward_teacher(self, x):
                    return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

            self.model = DINO(backbone, feat).to(device)
            self.criterion = DINOLoss(output_dim=c["out_dim"],
                                      warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"]).to(device)
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["lr"])
            self.backbone = self.model.student_backbone
        else:
            raise ValueError(f"no lightly loop for method {method!r} (have {METHODS})")
        self.model.train()
        # lightly-tuned: the two lines a careful user adds to the example, nothing else. channels_last weights
        # (and inputs, in step); torch.compile of what the loop calls, with the options fastssl's trainer uses
        # (dynamic=False: DINO's two crop sizes get a static graph each rather than one dynamic graph).
        self.compiled: list[str] = []
        self.compile_options = {"dynamic": False, "backend": compile_backend, "mode": compile_mode}
        self.memory_format = torch.channels_last if tuned else torch.preserve_format  # preserve: .to()'s default
        if tuned:
            self.model.to(memory_format=torch.channels_last)
            # The forward as an attribute, not nn.Module.compile(): lightly's DINO loop calls model.forward(view),
            # which Module.compile() leaves eager; torch.compile(model) compiles both calls, as here.
            self.model.forward = torch.compile(self.model.forward, **self.compile_options)
            self.compiled.append("model.forward")
            if method == "dino":
                self.model.forward_teacher = torch.compile(self.model.forward_teacher, **self.compile_options)
                self.compiled.append("model.forward_teacher")
        self.settings = {"method": method, "arch": arch, "device": device, "precision": precision,
                         "model": type(self.model).__name__, "backbone": type(backbone).__name__,
                         "criterion": repr(self.criterion), "optimizer": type(self.optimizer).__name__,
                         "optimizer_defaults": {k: v for k, v in self.optimizer.defaults.items()
                                                if isinstance(v, (int, float, str, bool, type(None), tuple))},
                         "channels_last": tuned, "compile": self.compiled,
                         "compile_options": self.compile_options if tuned else None}

    def params(self) -> dict:
        return {"backbone": _count(self.backbone.parameters()),
                "trainable": _count(p for p in self.model.parameters() if p.requires_grad)}

    def step(self, views, epoch: int, epochs: int):
        """One step of lightly's example loop; returns the detached loss."""
        import torch

        m, dev, fmt = self.model, self.device, self.memory_format
        nb = torch.device(dev).type == "cuda"
        if self.method == "simclr":
            x0 = views[0].to(dev, non_blocking=nb, memory_format=fmt)
            x1 = views[1].to(dev, non_blocking=nb, memory_format=fmt)
            with self.autocast:
                z0 = m(x0)
                z1 = m(x1)
                loss = self.criterion(z0, z1)
            loss.backward()
        else:
            from lightly.models.utils import update_momentum
            from lightly.utils.scheduler import cosine_schedule

            momentum_val = cosine_schedule(epoch, epochs, LIGHTLY_DINO["momentum"], 1)
            update_momentum(m.student_backbone, m.teacher_backbone, m=momentum_val)
            update_momentum(m.student_head, m.teacher_head, m=momentum_val)
            views = [view.to(dev, non_blocking=nb, memory_format=fmt) for view in views]
            global_views = views[:2]
            with self.autocast:
                teacher_out = [m.forward_teacher(view) for view in global_views]
                student_out = [m.forward(view) for view in views]
                loss = self.criterion(teacher_out, student_out, epoch=epoch)
            loss.backward()
            m.student_head.cancel_last_layer_gradients(current_epoch=epoch)  # only the student head's
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


_GEOMETRIC = ("RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRotation", "RandomRotate",
              "RandomRotationTransform")


def _is_geometric(op) -> bool:
    name = type(op).__name__
    if name in _GEOMETRIC or "Rotat" in name:
        return True
    inner = getattr(op, "transforms", None)
    return name == "RandomApply" and bool(inner) and all(_is_geometric(t) for t in inner)


def profile_lightly_stages(paths: list[str], transform) -> dict:
    """CPU ms per image of decode, crop and photometric work of lightly's transform, op by op, one thread."""
    import torch
    from PIL import Image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    acc = {"decode": 0.0, "crop": 0.0, "photometric": 0.0}
    try:
        for p in paths:
            t = time.thread_time()
            with open(p, "rb") as f:
                img = Image.open(f).convert("RGB")  # lightly's / torchvision's pil_loader
            acc["decode"] += time.thread_time() - t
            for vt in transform.transforms:
                comp = getattr(vt, "transform", vt)
                ops = getattr(comp, "transforms", None) or [comp]
                x = img
                for op in ops:
                    t = time.thread_time()
                    x = op(x)
                    acc["crop" if _is_geometric(op) else "photometric"] += time.thread_time() - t
    finally:
        torch.set_num_threads(threads)
    return {k: round(1000 * v / max(1, len(paths)), 3) for k, v in acc.items()}


def _describe_transform(transform) -> dict:
    """The transform's class and its views' ops by name (its repr holds object addresses: differs per process)."""
    views = []
    for vt in transform.transforms:
        comp = getattr(vt, "transform", vt)
        views.append([type(op).__name__ for op in (getattr(comp, "transforms", None) or [comp])])
    return {"class": type(transform).__name__, "views": views}


def lightly_transform_for(spec: dict):
    """lightly's transform for the arm: its SimCLRTransform / DINOTransform at our sizes (``local_views`` local crops)."""
    if spec["method"] == "dino":
        from lightly.transforms import DINOTransform

        return DINOTransform(global_crop_size=spec["size"], local_crop_size=spec["local_size"],
                             n_local_views=spec.get("local_views", 6))
    from fastssl.cli.bench_loader import lightly_transform

    return lightly_transform(spec["method"], spec["size"], spec["local_size"])


def lightly_arm_for(spec: dict, tuned: bool) -> LightlyArm:
    return LightlyArm(spec["method"], spec["device"], spec["arch"], spec["precision"], tuned=tuned,
                      compile_backend=spec.get("compile_backend", "inductor"), compile_mode=spec.get("compile_mode"))


def arm_lightly(spec: dict, tuned: bool = False) -> dict:
    """The lightly arm (``tuned``: lightly-tuned, the same loop compiled and channels_last)."""
    import torch
    from lightly.data import LightlyDataset

    torch.manual_seed(spec["seed"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    arm = lightly_arm_for(spec, tuned)
    transform = lightly_transform_for(spec)
    dataset = LightlyDataset(spec["folder"], transform=transform)
    # pin_memory on a GPU: what a tuned lightly user sets (its example leaves it off).
    loader_kw = {"batch_size": spec["batch"], "shuffle": True, "drop_last": True, "num_workers": spec["workers"],
                 "pin_memory": spec["device"] == "cuda"}
    dataloader = torch.utils.data.DataLoader(dataset, **loader_kw)
    warm = warmup_steps(spec, "lightly-tuned" if tuned else "lightly")
    total = warm + spec["steps"]
    spe = len(dataloader)
    epochs = math.ceil(total / spe)
    losses, step_s, wait_s = [], [], []
    step, cpu0, cpu1 = 0, _cpu(), 0.0
    for epoch in range(epochs):
        it = iter(dataloader)
        while step < total:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            loss = arm.step(batch[0], epoch, epochs)
            losses.append(float(loss))
            step_s.append(time.perf_counter() - t0)
            wait_s.append(t1 - t0)
            step += 1
            if step == warm:
                cpu0 = _cpu()
            if step == total:
                cpu1 = _cpu()
        del it
    timed = step_s[warm:]
    images = spec["batch"] * len(timed)
    out = {"images_per_second": images / sum(timed), "losses": losses, "steps": len(losses),
           "data_wait_fraction": sum(wait_s[warm:]) / sum(timed), "steps_per_epoch": spe,
           "params": arm.params(), "torch_threads": torch.get_num_threads(),
           "main_process_cpu_ms_per_image": 1000 * (cpu1 - cpu0) / images,
           # What this arm ran with, to compare the two lightly arms key by key.
           "settings": {**arm.settings, "dataloader": loader_kw, "transform": _describe_transform(transform),
                        "warmup": warm, "steps": spec["steps"], "seed": spec["seed"],
                        "threads": spec["threads"]}}
    if spec.get("profile_images"):
        root = Path(spec["folder"])
        paths = [str(root / f) for f in sorted(dataset.get_filenames())[: spec["profile_images"]]]
        stages = profile_lightly_stages(paths, transform)
        stages["model"] = round(out["main_process_cpu_ms_per_image"], 3)
        out["cpu_ms_per_image"] = stages
    return out


def arm_bare_lightly(spec: dict) -> dict:
    import torch

    torch.manual_seed(spec["seed"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    arm = lightly_arm_for(spec, False)
    views = _fixed_views(spec)
    spe = max(1, spec.get("steps_per_epoch", 10**9))
    total = spec["bare_warmup"] + spec["bare_steps"]
    epochs = math.ceil(total / spe)
    return _time_bare(lambda i: arm.step(views, i // spe, epochs), spec, arm.params(), torch.get_num_threads())


def _fixed_views(spec: dict, channels_last: bool = False) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    sizes = [spec["size"]] * 2 + ([spec["local_size"]] * spec.get("local_views", 6) if spec["method"] == "dino" else [])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(spec["batch"], 3, s, s, generator=g).contiguous(memory_format=fmt).to(spec["device"])
            for s in sizes]


def _time_bare(step, spec: dict, params: dict, threads: int) -> dict:
    # float(loss) waits for the step: on a GPU each step is timed to its end, as in the end-to-end arms.
    losses = []
    for i in range(spec["bare_warmup"]):
        losses.append(float(step(i)))
    c0, t0 = _cpu(), time.perf_counter()
    for i in range(spec["bare_warmup"], spec["bare_warmup"] + spec["bare_steps"]):
        losses.append(float(step(i)))
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    images = spec["batch"] * spec["bare_steps"]
    return {"images_per_second": images / wall, "losses": losses, "steps": len(losses), "params": params,
            "torch_threads": threads, "cpu_ms_per_image": {"model": round(1000 * cpu / images, 3)}}


def warmup_steps(spec: dict, arm: str) -> int:
    """Untimed steps of an end-to-end arm: ``--warmup`` plus the batches its loader holds ready.

    A loader's workers fill their queue while the first step compiles (a minute on a GPU). Without
    this, a run of a few dozen timed steps is served from that queue and measures the model, not
    the data path: a torch DataLoader holds ``num_workers x prefetch_factor`` batches (2 by default,
    lightly's arms), fastssl's torch and webdataset back-ends 4 per worker, ffcv
    ``batches_ahead`` + its 2 slots.
    """
    workers = int(spec.get("workers") or 0)
    if arm in ("lightly", "lightly-tuned"):
        depth = 2 * workers
    elif spec.get("backend") in ("torch", "webdataset"):
        depth = 4 * workers
    else:  # ffcv (batches_ahead 2 + 2 slots), DALI (its prefetch queue)
        depth = 4
    return int(spec["warmup"]) + depth


# ----------------------------------------------------------------------------- the fastssl side


def fastssl_overrides(spec: dict) -> list[str]:
    """``fastssl-train`` keys that match the lightly arm (the same photos, model sizes, optimizer, steps)."""
    method, total = spec["method"], warmup_steps(spec, "fastssl") + spec["steps"]
    kv = {
        "data.train": spec["source"], "data.val": "", "data.backend": spec["backend"], "data.workers": spec["workers"],
        "data.photometric": spec.get("photometric", "auto"),
        "aug.recipe": method, "aug.global_size": spec["size"], "aug.local_size": spec["local_size"],
        "model.backbone": spec["arch"], "method.name": method,
        "optim.batch_size": spec["batch"], "optim.lr_scaling": "none", "optim.warmup_epochs": 0,
        "optim.min_lr_ratio": 1.0, "optim.weight_decay": 0.0, "optim.clip_grad": 0.0,
        "train.max_steps": total, "train.epochs": math.ceil(total / max(1, spec["steps_per_epoch"])),
        "train.log_every": 1, "train.progress": "false", "train.precision": spec["precision"],
        "train.compile": spec["compile"], "train.device": spec["device"], "train.ckpt_every_epochs": 0,
        "train.seed": spec["seed"],
        "eval.final": "false", "eval.online_probe": "false", "eval.every_epochs": 0,
    }
    if method == "simclr":
        c = LIGHTLY_SIMCLR
        kv.update({"method.temperature": c["temperature"], "method.proj_hidden": proj_hidden(spec["arch"]),
                   "method.proj_dim": c["proj_dim"], "method.proj_layers": 2, "optim.name": "sgd",
                   "optim.lr": c["lr"], "optim.momentum": 0.0})
        from fastssl.cli.bench_loader import LIGHTLY_JITTER

        for i in range(2):  # lightly's SimCLRTransform strengths (our preset's are BYOL's)
            for k, v in zip(("brightness", "contrast", "saturation", "hue"), LIGHTLY_JITTER["simclr"]):
                kv[f"aug.views.{i}.{k}"] = v
    else:
        c = LIGHTLY_DINO
        # Adam = AdamW without weight decay; the DINO preset's jitter equals lightly's DINOTransform's.
        kv["aug.num_local"] = spec.get("local_views", 6)
        kv.update({"method.hidden": c["hidden"], "method.bottleneck": c["bottleneck"], "method.out_dim": c["out_dim"],
                   "method.head_layers": 3, "method.head_bn": "false", "method.momentum": c["momentum"],
                   "method.momentum_end": 1.0, "method.teacher_temp": c["teacher_temp"],
                   "method.teacher_temp_end": c["teacher_temp"], "method.freeze_last_layer_epochs": c["freeze_last_layer"],
                   "optim.name": "adamw", "optim.lr": c["lr"], "optim.momentum": 0.9, "optim.beta2": 0.999})
    if spec.get("run_dir"):
        kv["train.out_dir"], kv["train.name"] = str(Path(spec["run_dir"]).parent), Path(spec["run_dir"]).name
    return [f"{k}={v}" for k, v in kv.items()]


def read_fastssl_run(run_dir: Path, warmup: int, batch: int) -> dict:
    """images/s, losses and data wait of a ``train.log_every=1`` run, from its metrics.jsonl and summary.json."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = sorted((r for r in recs if r.get("kind") == "train"), key=lambda r: r["step"])
    timed = [r for r in train if r["step"] > warmup]
    secs = [batch / r["images_per_second"] for r in timed]
    out = {"images_per_second": batch * len(timed) / sum(secs), "losses": [r["loss"] for r in train],
           "steps": len(train), "data_wait_fraction": sum(r["data_wait"] * s for r, s in zip(timed, secs)) / sum(secs)}
    summary = json.loads((run_dir / "summary.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    out["summary_images_per_second"] = summary.get("images_per_second")
    out["torch_threads"] = env.get("torch_threads")
    out["steps_per_epoch"] = env.get("derived", {}).get("steps_per_epoch")
    return out


def arm_bare_fastssl(spec: dict) -> dict:
    import torch

    from fastssl.cli.bench_step import Variant

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    v = Variant("bare-fastssl", None, fastssl_overrides(spec), spec["batch"], torch.device(spec["device"]))

    def step(i):
        v.step()
        return v.last_loss

    params = {"backbone": _count(v.method.backbone.parameters()), "trainable": _count(v.params)}
    return _time_bare(step, spec, params, torch.get_num_threads())


def arm_stages_fastssl(spec: dict) -> dict:
    """CPU ms per image of the fastssl data path by stage: decode+crop (one pass) over an epoch, then photometric."""
    import gc

    import torch

    from fastssl.config import load_config
    from fastssl.pipelines.loader import build_loader, make_finisher

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = load_config(None, fastssl_overrides(spec))
    views = cfg.aug.resolved_views()
    loader = build_loader(cfg.data, views, "train", spec["batch"], "cpu", seed=spec["seed"], workers=spec["workers"],
                          backend=cfg.data.backend, photometric=False)
    loader.set_epoch(0)
    for k, _ in enumerate(loader):  # warm-up: compilation, worker start
        if k + 1 >= 2:
            break
    loader.set_epoch(1)
    kept, images = [], 0
    c0 = _cpu_all()
    it = iter(loader)
    for b in it:
        images += b.views[0].shape[0]
        if len(kept) < 3:
            kept.append([v.clone() for v in b.views])
    del it, loader
    gc.collect()
    decode_crop = _cpu_all() - c0
    fin = make_finisher(views, "cpu", spec["seed"], True, photometric=True, dtype=torch.float32)
    fin(kept[0], 0)  # warm-up
    c0 = _cpu()
    for i, crops in enumerate(kept):
        fin(crops, i + 1)
    photometric = _cpu() - c0
    n_phot = sum(c[0].shape[0] for c in kept)
    return {"backend": cfg.data.backend, "images": images,
            "cpu_ms_per_image": {"decode+crop": round(1000 * decode_crop / max(1, images), 3),
                                 "photometric": round(1000 * photometric / max(1, n_phot), 3)}}


ARM_FUNCS = {"lightly": arm_lightly, "lightly-tuned": lambda spec: arm_lightly(spec, tuned=True),
             "bare-lightly": arm_bare_lightly, "bare-fastssl": arm_bare_fastssl,
             "stages-fastssl": arm_stages_fastssl}


# ----------------------------------------------------------------------------- the parent


def run_arm(arm: str, spec: dict, workdir: Path, tag: str) -> dict:
    """One arm in a fresh process; adds its pid, wall time and whole-process CPU time."""
    result = workdir / f"{tag}.result.json"
    spec = dict(spec)
    if arm == "fastssl":
        spec["run_dir"] = str(workdir / "runs" / tag)
        cmd = [sys.executable, "-m", "fastssl.train", *fastssl_overrides(spec)]
    else:
        sp = workdir / f"{tag}.spec.json"
        sp.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "fastssl.cli.bench_peer", "--arm", arm, "--spec", str(sp), "--result", str(result)]
    load0 = os.getloadavg()[0]
    code = _git("log", "-1", "--format=%h", "--", "fastssl", "pipelines")  # a shared checkout may move mid-run
    c0, t0 = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = p.communicate()
    wall, cpu = time.perf_counter() - t0, _cpu(resource.RUSAGE_CHILDREN) - c0
    if p.returncode != 0:
        raise RuntimeError(f"arm {arm} ({tag}) failed with exit code {p.returncode}:\n{log[-4000:]}")
    if arm == "fastssl":
        out = read_fastssl_run(Path(spec["run_dir"]), warmup_steps(spec, "fastssl"), spec["batch"])
        out["command"] = "python -m fastssl.train " + " ".join(cmd[3:])
    else:
        out = json.loads(result.read_text())
    # The 1-minute load average before and after: others' work on a shared machine shows here.
    out.update({"pid": p.pid, "started_at": round(time.time() - wall, 3), "process_seconds": round(wall, 2),
                "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)], "code_commit": code})
    trained = spec["batch"] * out.get("steps", 0)
    if trained:
        out["process_cpu_ms_per_image"] = round(1000 * cpu / trained, 3)
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(method: str, rounds: list[dict], stages: list[dict]) -> dict:
    """Medians over rounds per arm, the images/s quotients and the CPU-per-image table."""
    arms = {}
    for arm in rounds[0]:
        per = [r[arm] for r in rounds if arm in r]  # the last round may be partial (a run cut short)
        a = {"images_per_second": _median([x["images_per_second"] for x in per]),
             "images_per_second_rounds": [round(x["images_per_second"], 2) for x in per],
             "first_loss": _median([x["losses"][0] for x in per]), "last_loss": _median([x["losses"][-1] for x in per]),
             "pids": [x["pid"] for x in per], "steps": per[0]["steps"], "torch_threads": per[0].get("torch_threads"),
             "loadavg_1min_rounds": [x.get("loadavg_1min") for x in per],
             "code_commit_rounds": [x.get("code_commit") for x in per]}
        for k in ("data_wait_fraction", "process_cpu_ms_per_image", "main_process_cpu_ms_per_image",
                  "summary_images_per_second"):
            if any(k in x for x in per):
                a[k] = _median([x.get(k) for x in per])
        if per[0].get("params"):
            a["params"] = per[0]["params"]
        cpu = [x["cpu_ms_per_image"] for x in per if x.get("cpu_ms_per_image")]
        if cpu:
            a["cpu_ms_per_image"] = {k: _median([c.get(k) for c in cpu]) for k in cpu[0]}
        for k in ("command", "settings"):
            if k in per[0]:
                a[k] = per[0][k]
        arms[arm] = a
    if "fastssl" in arms and stages:
        st = {k: _median([s["cpu_ms_per_image"][k] for s in stages]) for k in stages[0]["cpu_ms_per_image"]}
        if "bare-fastssl" in arms:
            st["model"] = arms["bare-fastssl"]["cpu_ms_per_image"]["model"]
        arms["fastssl"]["cpu_ms_per_image"] = st
        arms["fastssl"]["backend"] = stages[0]["backend"]
    if "fastssl" in arms and "bare-fastssl" in arms:
        arms["fastssl"]["params"] = arms["bare-fastssl"]["params"]   # the same config, built the same way
    ips = {k: v["images_per_second"] for k, v in arms.items()}
    ratios = {}
    for ref in LIGHTLY_ARMS:
        if "fastssl" in ips and ref in ips:
            key = "fastssl_over_" + ref.replace("-", "_")
            ratios[key] = ips["fastssl"] / ips[ref]
            ratios[key + "_rounds"] = [round(r["fastssl"]["images_per_second"] / r[ref]["images_per_second"], 3)
                                       for r in rounds if "fastssl" in r and ref in r]
    # The headline: fastssl against lightly as a careful user runs it (compiled, channels_last) when that arm
    # ran, so the quotient is the data path's and not the two lines lightly's example leaves out.
    ref = next((x for x in LIGHTLY_ARMS[::-1] if x in ips), None)
    headline = None
    if "fastssl" in ips and ref:
        key = "fastssl_over_" + ref.replace("-", "_")
        headline = {"ratio": key, "against": ref, "value": round(ratios[key], 4),
                    "rounds": ratios[key + "_rounds"]}
    bares = {k: v for k, v in ips.items() if k.startswith("bare-")}
    if bares:
        best = max(bares, key=bares.get)
        ratios["bare"] = best
        for arm in ("fastssl", *LIGHTLY_ARMS):
            if arm in ips:
                ratios[f"{arm.replace('-', '_')}_over_bare"] = ips[arm] / bares[best]
                if f"bare-{arm}" in ips:
                    ratios[f"{arm}_over_own_bare"] = ips[arm] / ips[f"bare-{arm}"]
    ratios = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ratios.items()}
    for a in arms.values():
        for k in ("images_per_second", "first_loss", "last_loss", "data_wait_fraction", "process_cpu_ms_per_image",
                  "main_process_cpu_ms_per_image", "summary_images_per_second"):
            if isinstance(a.get(k), float):
                a[k] = round(a[k], 4)
    return {"method": method, "headline": headline, "arms": arms, "ratios": ratios, "rounds": rounds,
            "stages_fastssl_rounds": stages}


def _table(res: dict) -> str:
    lines = ["| method | arm | images/s (rounds) | x lightly-tuned | x lightly | x bare | first -> last loss | "
             "CPU ms/image: decode / crop / photometric / model |", "|---|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        ips = {k: v["images_per_second"] for k, v in r["arms"].items()}
        bare = ips.get(r["ratios"].get("bare"))
        for arm, a in r["arms"].items():
            c = a.get("cpu_ms_per_image", {})
            model = f"{c['model']:.1f}" if "model" in c else "-"  # fastssl's model CPU comes from its bare arm
            if "decode+crop" in c:
                st = f"{c['decode+crop']:.2f} (decode+crop) / {c.get('photometric', 0):.2f} / {model}"
            elif "decode" in c:
                st = f"{c['decode']:.2f} / {c['crop']:.2f} / {c['photometric']:.2f} / {model}"
            else:
                st = f"- / - / - / {model}"
            xs = [f"{ips[arm] / ips[ref]:.2f}" if ref in ips else "-" for ref in ("lightly-tuned", "lightly")]
            xb = f"{ips[arm] / bare:.2f}" if bare else "-"
            lines.append(f"| {m} | {arm} | {ips[arm]:.1f} ({', '.join(f'{x:.1f}' for x in a['images_per_second_rounds'])}) "
                         f"| {xs[0]} | {xs[1]} | {xb} | {a['first_loss']:.3f} -> {a['last_loss']:.3f} | {st} |")
    return "\n".join(lines)


def _headline(res: dict) -> str:
    """One line per method: fastssl's images/s over the headline arm's, with the rounds."""
    out = []
    for m, r in res["methods"].items():
        h = r.get("headline")
        if h:
            out.append(f"{m}: fastssl / {h['against']} = {h['value']:.2f}x "
                       f"(rounds: {', '.join(f'{x:.2f}' for x in h['rounds'])})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="fastssl-bench peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "fastssl-peer-photos"),
                    help="folder holding train/ (JPEG ImageFolder) and train.beton; written if missing "
                         "(--n photo-like 400x350 JPEGs, as fastssl-bench loader --make-imagenet-like)")
    ap.add_argument("--n", type=int, default=2000, help="photos to write when --data has none")
    ap.add_argument("--methods", default="simclr,dino")
    ap.add_argument("--arms", default="", help="comma-separated subset of " + ",".join(ARMS) + " (default: all on "
                    "cuda; on the CPU all but lightly-tuned, whose compile takes minutes there)")
    ap.add_argument("--backend", default="auto", help="fastssl's back-end: auto (ffcv when installed), ffcv or torch")
    ap.add_argument("--size", type=int, default=96, help="global view size, px")
    ap.add_argument("--arch", default="resnet18", choices=sorted(FEATURE_DIM), help="both arms' backbone")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: both arms train on the GPU (fastssl's torch back-end then decodes there)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: the trainer's bf16 autocast; the lightly arm's steps under torch.autocast(bf16)")
    ap.add_argument("--compile", default="auto", choices=["auto", "off", "on"],
                    help="fastssl's train.compile (auto: on with --device cuda, as the trainer's default; off on the CPU)")
    ap.add_argument("--photometric", default="auto", choices=["auto", "torch", "compiled", "cv2"],
                    help="fastssl's data.photometric (how its photometric stage runs)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="lightly-tuned's torch.compile backend (eager / aot_eager: checks the code path, quickly)")
    ap.add_argument("--local-size", type=int, default=0, help="DINO local view size (0: 96/224 of --size)")
    ap.add_argument("--local-views", type=int, default=6,
                    help="DINO local views (6: lightly's DINOTransform default; DINO's ViT-S/16 recipe uses 10)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per end-to-end arm")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps before them, beyond the batches each arm's loader holds ready")
    ap.add_argument("--bare-steps", type=int, default=5)
    ap.add_argument("--bare-warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="data workers of both arms")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every arm (0: torch's default / the trainer's)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--profile-images", type=int, default=48, help="photos the lightly stage profile runs on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code paths")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.arm:  # a child: one arm, its result as JSON in --result
        spec = json.loads(Path(a.spec).read_text())
        Path(a.result).write_text(json.dumps(ARM_FUNCS[a.arm](spec)))
        return 0
    try:
        import lightly  # noqa: F401
    except ImportError:
        print("fastssl-bench peer: needs lightly: pip install 'fastssl[peer]'", file=sys.stderr)
        return 2
    if a.smoke:
        a.size, a.batch, a.steps, a.warmup, a.bare_steps, a.bare_warmup = 32, 8, 2, 1, 2, 1
        a.workers, a.profile_images, a.n = min(a.workers, 1), 4, 40
    methods = a.methods.split(",")
    arms = a.arms.split(",") if a.arms else list(ARMS if a.device == "cuda" else CPU_ARMS)
    bad = [m for m in methods if m not in METHODS] + [x for x in arms if x not in ARMS]
    if bad:
        ap.error(f"unknown method or arm {bad[0]!r}: methods {METHODS}, arms {ARMS}")
    from fastssl.cli.bench_loader import make_imagenet_like

    root = Path(a.data)
    backend = a.backend
    if backend == "auto":
        try:
            import ffcv  # noqa: F401

            backend = "ffcv"
        except ImportError:
            backend = "torch"
    if not ((root / "train").is_dir() and (backend != "ffcv" or (root / "train.beton").is_file())):
        make_imagenet_like(str(root), a.n, workers=max(1, a.workers), beton=backend == "ffcv")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible")
    folder = str(root / "train")
    n_images = sum(1 for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    spec = {"folder": folder, "source": str(root / "train.beton") if backend == "ffcv" else folder,
            "backend": backend, "size": a.size,
            "local_size": a.local_size or local_size_for(a.size, 16 if a.arch.startswith("vit") else 1),
            "arch": a.arch, "device": a.device, "precision": a.precision,
            "compile": a.compile if a.compile != "auto" else ("on" if a.device == "cuda" else "off"),
            "compile_backend": a.compile_backend, "local_views": a.local_views,
            "batch": a.batch, "steps": a.steps, "warmup": a.warmup, "bare_steps": a.bare_steps,
            "bare_warmup": a.bare_warmup, "workers": a.workers, "threads": a.threads, "seed": a.seed,
            "steps_per_epoch": n_images // a.batch, "profile_images": a.profile_images,
            "photometric": a.photometric}
    if spec["steps_per_epoch"] < 1:
        ap.error(f"{folder} holds {n_images} images, fewer than a batch of {a.batch}")
    t_start = time.perf_counter()
    versions = _versions()  # at the start; "versions_end" too if the checkout moved during the run
    per_method: dict = {m: {"rounds": [], "stages": []} for m in methods}

    def result(done: int) -> str:
        """The JSON of the rounds done so far (written to --out; ``rounds_done`` < ``rounds``: cut short)."""
        from fastssl.benchmarking import write_json

        res = {"benchmark": "peer", "argv": argv, "cpu_count": os.cpu_count(), "versions": versions,
               "settings": {**{k: v for k, v in spec.items() if k != "source"}, "data": str(root), "images": n_images,
                            "rounds": max(1, a.rounds), "rounds_done": done, "arms": arms, "smoke": a.smoke},
               "methods": {m: summarise(m, per_method[m]["rounds"], per_method[m]["stages"]) for m in methods
                           if per_method[m]["rounds"]},
               "seconds": round(time.perf_counter() - t_start, 1)}
        if _versions() != versions:
            res["versions_end"] = _versions()
        res["headline"] = {m: r["headline"] for m, r in res["methods"].items() if r.get("headline")}
        res["table"] = _table(res)
        return write_json(res, a.out)

    with tempfile.TemporaryDirectory(prefix="fastssl-peer-") as tmp:
        work = Path(tmp)
        for k in range(max(1, a.rounds)):
            order = arms if k % 2 == 0 else arms[::-1]
            for m in methods:
                s = {**spec, "method": m}
                got: dict = {}
                per_method[m]["rounds"].append(got)  # filled arm by arm
                for arm in order:
                    got[arm] = run_arm(arm, s, work, f"{m}-{arm}-r{k}")
                    if not a.json:
                        print(f"[round {k + 1}] {m:>6} {arm:>12}: {got[arm]['images_per_second']:8.1f} img/s  "
                              f"loss {got[arm]['losses'][0]:.3f} -> {got[arm]['losses'][-1]:.3f}", flush=True)
                    if a.out:  # the arms so far: a run cut short (a timeout) keeps them; rounds_done counts whole rounds
                        result(k)
                per_method[m]["rounds"][-1] = {arm: got[arm] for arm in arms}
                if "fastssl" in arms and a.device == "cpu":  # the CPU data path's stages (a GPU decodes on the GPU)
                    per_method[m]["stages"].append(run_arm("stages-fastssl", s, work, f"{m}-stages-r{k}"))
    text = result(max(1, a.rounds))
    if a.json:
        print(text)
    else:
        res = json.loads(text)
        print(res["table"])
        print(_headline(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
