"""``fastssl-bench accuracy``: does fastssl's speed cost accuracy? kNN top-1 after the same
number of steps as lightly's loop, on the built-in data, evaluated by one protocol.

    fastssl-bench accuracy --data /tmp/acc --epochs 60 --seeds 0,1 --out acc.json
    fastssl-bench accuracy --smoke --json         # tiny sizes: checks the code paths (a test runs it)

Both arms train the demo recipe (``--config``, default ``demo/simclr``) for ``--epochs`` epochs of
the same images, each in a fresh process:

- ``fastssl``: ``python -m fastssl.train`` on the ``.beton`` (intermediate evaluations off).
- ``lightly``: a lightly user's loop with the same recipe: ``LightlyDataset`` over the same images
  as JPEG folders with ``SimCLRTransform`` set to the recipe's view (crop scale, jitter strengths and
  probability, grey, blur, flip) in a DataLoader (shuffle, drop_last, the same workers),
  ``SimCLRProjectionHead`` + ``NTXentLoss`` at the recipe's sizes and temperature, AdamW at the
  recipe's lr and weight decay with lightly's ``CosineWarmupScheduler`` (the recipe's warm-up and
  final lr ratio), per step. The backbone is fastssl's (``model.backbone`` of the recipe: lightly
  takes any ``nn.Module``), so both arms train the same network.

Evaluation, one function for both arms and for each arm's random init: backbone features of the
centre crop at the recipe's size, from fastssl's evaluation loaders over the ``.beton`` (train split
as the memory bank, val split queried), weighted kNN (``eval.knn_k``, ``eval.knn_temperature``;
cookbook section 3.7.1). The fastssl arm's own end-of-run kNN must equal this re-evaluation
(reported as ``fastssl_self_reported``), which checks that the protocol is the trainer's.

Goal: fastssl's kNN top-1 at most 2 points below lightly's, mean over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastssl.cli.bench_peer import _versions  # package versions and the git head, as bench peer records them

GOAL_POINTS = 2.0


def _overrides(args) -> list[str]:
    kv = [f"train.epochs={args.epochs}"]
    if args.smoke:
        kv += ["aug.global_size=16", "model.backbone=resnet_tiny", "method.proj_hidden=64", "method.proj_dim=32",
               "optim.batch_size=32", "optim.warmup_epochs=0"]
    return kv + list(args.set or [])


def ensure_data(data: Path, smoke: bool) -> Path:
    """The built-in shapes as ``.beton`` and JPEG folders (the demo's sizes, or tiny ones with --smoke)."""
    if (data / "train.beton").is_file() and (data / "val.beton").is_file() and (data / "train").is_dir():
        return data
    from fastssl.cli.prepare import main as prepare

    sizes = ["--classes", "10", "--per-class", "20", "--val-per-class", "10", "--size", "32"] if smoke else \
        ["--classes", "10", "--per-class", "200", "--val-per-class", "50", "--size", "64"]
    rc = prepare(["synthetic", str(data), *sizes, "--seed", "0", "--jpeg-folders"])
    if rc not in (0, None):
        raise SystemExit(f"fastssl-bench accuracy: writing the built-in data to {data} failed")
    return data


# ----------------------------------------------------------------------------- arms (fresh processes)


def arm_fastssl(spec: dict) -> dict:
    from fastssl.train import main as train_main

    work = Path(spec["work"])
    name = f"fastssl-s{spec['seed']}"
    argv = ["--config", spec["config"], f"data.train={spec['data']}/train.beton", f"data.val={spec['data']}/val.beton",
            f"train.seed={spec['seed']}", "data.backend=ffcv", f"data.workers={spec['workers']}",
            f"train.out_dir={work}", f"train.name={name}", "train.resume=false", "train.progress=false",
            "eval.every_epochs=0", "eval.final=true", *spec["overrides"]]
    t = time.perf_counter()
    rc = train_main(argv)
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"fastssl-train exited {rc}: {' '.join(argv)}")
    s = json.loads((work / name / "summary.json").read_text())
    return {"run_dir": str(work / name), "wall_seconds": wall, "train_seconds": s["wall_seconds"],
            "steps": s["steps"], "self_reported_knn_top1": s["knn_top1"], "final_loss": s["final_loss"],
            "command": "python -m fastssl.train " + " ".join(argv)}


def arm_lightly(spec: dict) -> dict:
    import torch
    from lightly.data import LightlyDataset
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from lightly.utils.scheduler import CosineWarmupScheduler
    from torch import nn

    from fastssl.models import create_backbone
    from fastssl.rundir import cpu_threads

    cfg = load_config_for(spec, spec["seed"])
    if cfg.method.name != "simclr":
        raise SystemExit(f"fastssl-bench accuracy: the lightly arm covers simclr recipes, not {cfg.method.name!r}")
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(cpu_threads(1))  # the trainer's choice, so both arms compute alike
    v = cfg.aug.resolved_views()[0]
    transform = SimCLRTransform(
        input_size=v.size, cj_prob=v.jitter_p, cj_strength=1.0, cj_bright=v.brightness, cj_contrast=v.contrast,
        cj_sat=v.saturation, cj_hue=v.hue, min_scale=v.scale_min, random_gray_scale=v.gray_p,
        gaussian_blur=v.blur_p, sigmas=(v.blur_sigma_min, v.blur_sigma_max), hf_prob=v.flip_p)
    dataset = LightlyDataset(str(Path(spec["data"]) / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                                         num_workers=spec["workers"])
    backbone, feat_dim = create_backbone(cfg.model)

    class SimCLR(nn.Module):  # lightly's examples/pytorch/simclr.py, with the recipe's sizes
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SimCLRProjectionHead(feat_dim, cfg.method.proj_hidden, cfg.method.proj_dim)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

    model = SimCLR()
    criterion = NTXentLoss(temperature=cfg.method.temperature)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * cfg.train.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=round(cfg.optim.warmup_epochs * steps_per_epoch),
                                      max_epochs=total, end_value=cfg.optim.min_lr_ratio)
    losses = []
    t = time.perf_counter()
    model.train()
    for _ in range(cfg.train.epochs):
        for batch in loader:
            x0, x1 = batch[0]
            loss = criterion(model(x0), model(x1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses.append(loss.detach())
    wall = time.perf_counter() - t
    out = Path(spec["work"]) / f"lightly-s{spec['seed']}.pt"
    torch.save(backbone.state_dict(), out)
    return {"backbone_file": str(out), "train_seconds": wall, "steps": len(losses),
            "final_loss": float(losses[-1]) if losses else None}


def evaluate(spec: dict) -> dict:
    """kNN top-1 of each arm's backbone and of the random init, one protocol (see the module docstring)."""
    import torch

    from fastssl.checkpoint import load_for_eval
    from fastssl.compile import clean_state_dict
    from fastssl.evaluation import extract_features, knn_top1
    from fastssl.models import create_backbone
    from fastssl.pipelines.loader import build_loader

    cfg = load_config_for(spec, spec["seeds"][0])
    views = cfg.aug.resolved_views()[:1]
    loaders = [build_loader(cfg.data, views, split, 256, torch.device("cpu"), train=False, drop_last=False,
                            workers=spec["workers"], backend="ffcv") for split in ("train", "val")]
    num_classes = loaders[0].num_classes

    @torch.no_grad()
    def knn(backbone) -> float:
        backbone.eval()
        feats = []
        for ld in loaders:
            ld.set_epoch(0)
            feats.append(extract_features(backbone, ld, "cpu"))
        (trx, try_), (vax, vay) = feats
        return knn_top1(trx, try_, vax, vay, num_classes=num_classes, k=cfg.eval.knn_k,
                        temperature=cfg.eval.knn_temperature)

    out = {}
    for seed in spec["seeds"]:
        c = load_config_for(spec, seed)
        torch.manual_seed(seed)
        init, _ = create_backbone(c.model)
        _, method, _ = load_for_eval(spec["runs"][str(seed)]["fastssl"]["run_dir"])
        lb, _ = create_backbone(c.model)
        path = spec["runs"][str(seed)]["lightly"]["backbone_file"]
        lb.load_state_dict(clean_state_dict(torch.load(path, weights_only=True)))
        out[str(seed)] = {"init": knn(init), "fastssl": knn(method.backbone), "lightly": knn(lb)}
    out["protocol"] = {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, "image_size": views[0].size,
                       "features": f"backbone pooled ({cfg.model.backbone}), centre crop",
                       "train_split": f"{cfg.data.train} ({loaders[0].num_samples} images)",
                       "eval_split": f"{cfg.data.val} ({loaders[1].num_samples} images)"}
    return out


def load_config_for(spec: dict, seed: int):
    from fastssl.config import load_config

    return load_config(spec["config"], [f"data.train={spec['data']}/train.beton", f"data.val={spec['data']}/val.beton",
                                        f"train.seed={seed}", *spec["overrides"]])


ARMS = {"fastssl": arm_fastssl, "lightly": arm_lightly, "evaluate": evaluate}


def run_arm(arm: str, spec: dict, work: Path) -> dict:
    """One arm in a fresh Python process (no state shared with the other arm)."""
    spec_file = work / f"spec-{arm}-{os.getpid()}.json"
    out_file = work / f"out-{arm}-{os.getpid()}.json"
    spec_file.write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "-m", "fastssl.cli.bench_accuracy", "--arm", arm, "--spec", str(spec_file),
                        "--result", str(out_file)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"arm {arm} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(out_file.read_text())


def summarise(spec: dict, runs: dict, evals: dict) -> dict:
    rows, diffs = [], []
    for seed in spec["seeds"]:
        e, r = evals[str(seed)], runs[str(seed)]
        diff = e["fastssl"] - e["lightly"]
        diffs.append(diff)
        rows.append({"seed": seed, "knn_top1_init": e["init"], "knn_top1_fastssl": e["fastssl"],
                     "knn_top1_lightly": e["lightly"], "fastssl_minus_lightly": diff,
                     "fastssl_self_reported": r["fastssl"]["self_reported_knn_top1"],
                     "steps": {"fastssl": r["fastssl"]["steps"], "lightly": r["lightly"]["steps"]},
                     "train_seconds": {"fastssl": r["fastssl"]["train_seconds"], "lightly": r["lightly"]["train_seconds"]},
                     "final_loss": {"fastssl": r["fastssl"]["final_loss"], "lightly": r["lightly"]["final_loss"]}})
    mean = statistics.fmean(diffs)
    return {"benchmark": "accuracy", "config": spec["config"], "overrides": spec["overrides"], "seeds": spec["seeds"],
            "rows": rows, "mean_fastssl_minus_lightly": mean, "goal": f">= -{GOAL_POINTS} points",
            "goal_met": mean >= -GOAL_POINTS, "protocol": evals["protocol"],
            "versions": _versions(),
            "fastssl_command": runs[str(spec["seeds"][0])]["fastssl"]["command"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-bench accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="", help="folder with train.beton, val.beton and train/ (written if missing)")
    ap.add_argument("--config", default="demo/simclr", help="the recipe both arms train (a SimCLR recipe)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="", help="folder for the arms' runs and backbones (default: a new temporary one)")
    ap.add_argument("--set", nargs="*", help="extra config overrides for both arms (key=value)")
    ap.add_argument("--smoke", action="store_true", help="tiny data and model, 1 epoch: checks the code paths")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        res = ARMS[args.arm](json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(res))
        return 0
    try:
        import lightly  # noqa: F401
    except ImportError:
        print("fastssl-bench accuracy: the peer arm needs lightly: pip install 'fastssl[peer]' (or lightly>=1.5)",
              file=sys.stderr)
        return 2
    if args.smoke:
        args.epochs = min(args.epochs, 1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastssl-acc-"))
    work.mkdir(parents=True, exist_ok=True)
    data = ensure_data(Path(args.data) if args.data else work / "data", args.smoke)
    spec = {"config": args.config, "data": str(data), "work": str(work), "workers": args.workers,
            "overrides": _overrides(args), "seeds": [int(s) for s in args.seeds.split(",")]}
    runs: dict = {}
    for i, seed in enumerate(spec["seeds"]):
        s = {**spec, "seed": seed}
        order = ("fastssl", "lightly") if i % 2 == 0 else ("lightly", "fastssl")  # alternate: drift hits both
        runs[str(seed)] = {arm: run_arm(arm, s, work) for arm in order}
        if not args.json:
            print(f"seed {seed}: trained both arms", file=sys.stderr)
    evals = run_arm("evaluate", {**spec, "runs": runs}, work)
    res = summarise(spec, runs, evals)
    from fastssl.benchmarking import write_json

    if args.out:
        write_json(res, args.out)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res["rows"]:
            print(f"seed {r['seed']}: kNN top-1 fastssl {r['knn_top1_fastssl']:.1f} / lightly {r['knn_top1_lightly']:.1f}"
                  f" (init {r['knn_top1_init']:.1f}); fastssl - lightly {r['fastssl_minus_lightly']:+.1f} points; "
                  f"train s fastssl {r['train_seconds']['fastssl']:.0f} / lightly {r['train_seconds']['lightly']:.0f}")
        print(f"runs and backbones: {work}")
        print(f"mean fastssl - lightly: {res['mean_fastssl_minus_lightly']:+.1f} points "
              f"(goal >= -{GOAL_POINTS:g}: {'met' if res['goal_met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
