"""The trainer: ``accelerate launch fastssl/train.py --config C key=value ...``.

One optimizer step: ``accum_steps`` micro-batches from the loader (views already
normalised on the device) -> ``method(views, step)`` -> backward -> clip ->
optimizer step with the step's lr/wd -> ``method.after_step(step)`` (EMA,
centres, queues: once per optimizer step) -> online probe on detached features.
The loop never syncs with the host per step: losses accumulate on the device
and are read every ``train.log_every`` steps; non-finite losses are flagged on
the device and checked at those points, naming the first bad step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fastssl import checkpoint as ckpt_io
from fastssl.compile import clean_state_dict, compile_module
from fastssl.config import Config, ConfigError, Derived, all_keys, derive, load_config, save_config, to_dict
from fastssl.schedules import cosine, progressive_size


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- set-up helpers


def pick_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def run_dir_for(cfg: Config) -> Path:
    name = cfg.train.name or f"{cfg.method.name}-{cfg.model.backbone}-{Path(cfg.data.train).stem or 'data'}"
    return Path(cfg.train.out_dir) / name


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "platform": platform.platform(), "device": str(device),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for pkg in ("torch", "torchvision", "timm", "accelerate", "numpy", "numba", "triton", "ffcv", "nvidia-dali-cuda120", "fastssl"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


class MetricsLog:
    """Append-only ``metrics.jsonl`` (main process only); lines are flushed as written."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.f = open(path, "a") if enabled else None

    def write(self, **rec) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


@torch.no_grad()
def evaluate_knn(method, train_loader, val_loader, cfg: Config, device, num_classes: int, max_val: int = 0) -> dict:
    """kNN top-1 (section 3.7.1) and RankMe (section 3.7.2) of backbone features; protocol included."""
    from fastssl.evaluation import extract_features, knn_top1, rankme

    from fastssl.compile import eager

    was_training = method.training
    method.eval()
    embed = method.embed
    with eager(method.backbone):  # no new graphs for eval batch sizes / no_grad
        tr_x, tr_y = extract_features(embed, train_loader, device)
        va_x, va_y = extract_features(embed, val_loader, device, max_samples=max_val or None)
    top1 = knn_top1(tr_x, tr_y, va_x, va_y, num_classes=num_classes, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    rm = rankme(va_x)
    method.train(was_training)
    protocol = {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, "similarity": "cosine, weighted votes",
                "features": f"backbone pooled ({cfg.model.backbone})", "image_size": cfg.aug.global_size,
                "train_split": f"{cfg.data.train} ({len(tr_y)} images, centre crop)",
                "eval_split": f"{cfg.data.val} ({len(va_y)} images, centre crop)"}
    return {"knn_top1": float(top1), "rankme": float(rm), "protocol": protocol}


# ----------------------------------------------------------------------------- the run


def train(cfg: Config) -> dict:
    """Run (or resume) one pretraining run; returns the summary dict (also written to summary.json)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from fastssl.methods import create_method
    from fastssl.optim import build_optimizer
    from fastssl.pipelines.loader import build_loader

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a .beton or image folder (e.g. data.train=data/demo/train.beton); "
                          "`fastssl-prepare synthetic data/demo` writes the built-in dataset")
    device = pick_device(cfg)
    cuda = device.type == "cuda"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cuda)
    from accelerate.state import AcceleratorState

    # A second run in one process (tests, notebooks, sweeps) may change precision: accelerate keeps
    # its first choice unless its state is reset (the distributed part, PartialState, is kept).
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda)
    device = acc.device
    rank, world = acc.process_index, acc.num_processes
    if device.type == "cpu":
        # Processes share the cores: one intra-op pool per process would oversubscribe them.
        # (Measured on 2 idle cores: 2 torch threads beside 2 decoder threads ran the demo
        # about 1.6x faster than 1 thread, so the decoders are not given cores of their own.)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    set_seed(cfg.train.seed + rank)
    out = run_dir_for(cfg)
    ckpt_path = out / "checkpoints" / "last.pt"
    resume = cfg.train.resume and ckpt_path.is_file()
    if cfg.train.resume and not ckpt_path.is_file() and acc.is_main_process:
        print(f"[fastssl] train.resume=true but {ckpt_path} does not exist: starting a new run", file=sys.stderr)

    # ---- data: each process a disjoint shard; micro-batch = global batch / (world * accum)
    views = cfg.aug.resolved_views()
    # Views in the step's precision: bf16 halves the bytes the loader writes; fp32 runs need fp32 input.
    view_dtype = torch.bfloat16 if bf16 else torch.float32
    probe_loader = build_loader(cfg.data, views, "train", 2, device, seed=cfg.train.seed, rank=rank,
                                world_size=world, backend=cfg.data.backend, workers=cfg.data.workers, train=True,
                                dtype=view_dtype)
    d: Derived = derive(cfg, probe_loader.num_samples, world)
    del probe_loader
    loader = build_loader(cfg.data, views, "train", d.micro_batch, device, seed=cfg.train.seed, rank=rank,
                          world_size=world, backend=cfg.data.backend, workers=cfg.data.workers, train=True,
                          dtype=view_dtype)
    num_classes = loader.num_classes

    # ---- model, optimizer, schedules (precomputed per step)
    method = create_method(cfg, d.total_steps).to(device)
    if cfg.train.channels_last:
        # Also on the CPU: oneDNN convolutions run NHWC about 1.5x faster (resnet_tiny at 32 px, 2 cores).
        method = method.to(memory_format=torch.channels_last)
    opt = build_optimizer(method, cfg.optim, d.lr)
    lr_sched = cosine(d.lr, d.lr * cfg.optim.min_lr_ratio, d.total_steps, d.warmup_steps)
    wd_end = cfg.optim.weight_decay_end if cfg.optim.weight_decay_end >= 0 else cfg.optim.weight_decay
    wd_sched = cosine(cfg.optim.weight_decay, wd_end, d.total_steps)
    probe = None
    if cfg.eval.online_probe and num_classes:
        from fastssl.evaluation import OnlineLinearProbe

        probe = OnlineLinearProbe(method.feat_dim, num_classes, lr=cfg.eval.probe_lr).to(device)
    if cfg.train.compile == "on" or (cfg.train.compile == "auto" and cuda):
        # In place (state-dict keys keep no `_orig_mod.`), eager fallback at the first failing call.
        compile_module(method.backbone)
    model, opt = acc.prepare(method, opt)
    core = acc.unwrap_model(model)

    # ---- run directory and state
    step, epoch0, batch0, wall0, knn_init = 0, 0, 0, 0.0, None
    if resume:
        state = ckpt_io.load(ckpt_path)
        core.load_state_dict(clean_state_dict(state["method"]))
        opt.load_state_dict(state["optimizer"])
        if probe is not None and state.get("probe"):
            probe.load_state_dict(state["probe"])
        step, epoch0, batch0 = state["step"], state["epoch"], state["batch_in_epoch"]
        wall0, knn_init = state.get("wall_seconds", 0.0), state.get("knn_init")
        ckpt_io.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    if acc.is_main_process:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "env.json").write_text(json.dumps({**environment(device), "world_size": world,
                                                  "derived": asdict(d), "precision": "bf16" if bf16 else "fp32"}, indent=2))
        if not resume and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
    log = MetricsLog(out / "metrics.jsonl", acc.is_main_process)

    def eval_loaders():
        # Fresh loaders per evaluation (evaluation is rare; building one costs about a second),
        # so an evaluation never depends on the state a previous pass left in a loader.
        return tuple(
            build_loader(cfg.data, views[:1], split, 256, device, seed=0, rank=0, world_size=1,
                         backend=cfg.data.backend, workers=cfg.data.workers, train=False, drop_last=False,
                         dtype=view_dtype)
            for split in ("train", "val"))

    can_eval = bool((cfg.eval.final or cfg.eval.every_epochs) and cfg.data.val and num_classes)
    if can_eval and knn_init is None and acc.is_main_process and cfg.eval.final:
        knn_init = evaluate_knn(core, *eval_loaders(), cfg, device, num_classes)
        log.write(kind="eval", step=0, epoch=0, wall=0.0, init=True, **{k: v for k, v in knn_init.items() if k != "protocol"})

    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss

    def check_finite() -> None:
        bad = int(first_bad)
        if bad >= 0:
            msg = (f"non-finite loss at step {bad} (method {cfg.method.name}, lr {lr_sched[bad]:.3g}); "
                   f"stopping. The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none (no checkpoint yet)'}. "
                   f"Try a lower optim.lr, optim.clip_grad=3.0 or train.precision=fp32.")
            log.write(kind="error", step=bad, message=msg)
            raise NonFiniteLoss(msg)

    def save(epoch: int, batch_in_epoch: int, wall: float) -> None:
        check_finite()  # never overwrite the last good checkpoint with a diverged model
        acc.wait_for_everyone()
        rngs = [ckpt_io.rng_state()]  # this process's; others' are equal up to the seed offset
        if acc.is_main_process:
            ckpt_io.save_atomic({
                "method": core.state_dict(), "optimizer": opt.state_dict(),
                "probe": probe.state_dict() if probe is not None else None,
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": d.total_steps,
                "wall_seconds": wall, "knn_init": knn_init, "rng": rngs, "config": to_dict(cfg)}, ckpt_path)

    # ---- the loop
    model.train()
    loss_sum = torch.zeros((), device=device)
    log_sums: dict[str, torch.Tensor] = {}
    probe_correct = torch.zeros((), device=device)
    probe_seen = 0
    n_logged, wait_s, busy_s = 0, 0.0, 0.0
    totals: dict = {}
    bi = batch0
    t_run = time.perf_counter()
    bar = None
    if cfg.train.progress and acc.is_main_process:
        from tqdm import tqdm

        bar = tqdm(total=d.run_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout)
    micro = cfg.optim.accum_steps
    before_opt = getattr(core, "before_optimizer_step", None)
    done = step >= d.run_steps
    epoch = epoch0
    for epoch in range(epoch0, cfg.train.epochs):
        if done:  # resumed a finished run
            break
        size = progressive_size(epoch, cfg.train.epochs, cfg.train.res_start, cfg.aug.global_size,
                                cfg.train.res_end_epoch, cfg.train.res_step)
        loader.set_epoch(epoch, global_size=size if cfg.train.res_start else None)
        it = iter(loader)
        skip = batch0 * micro if epoch == epoch0 else 0
        for _ in range(skip):  # resume mid-epoch: the same batches in the same order, already seen
            next(it)
        bi = batch0 if epoch == epoch0 else 0
        while bi < d.steps_per_epoch and step < d.run_steps:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = float(lr_sched[step]) * g.get("lr_scale", 1.0)
                if g.get("apply_wd", False):  # groups without decay (biases, norms) keep 0
                    g["weight_decay"] = float(wd_sched[step])
            for mi in range(micro):
                tw = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                wait_s += time.perf_counter() - tw
                sync = contextlib.nullcontext() if mi == micro - 1 else acc.no_sync(model)
                with sync, acc.autocast():
                    outd = model(batch.views, step)
                    loss = outd["loss"] / micro
                acc.backward(loss)
                ld = outd["loss"].detach()
                loss_sum += ld
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(ld), step, first_bad)
                for k, v in outd.items():
                    if k not in ("loss", "features") and torch.is_tensor(v) and v.ndim == 0:
                        log_sums[k] = log_sums.get(k, 0) + v.detach().float()
                if probe is not None and batch.labels is not None:
                    _, correct = probe.step(outd["features"].float(), batch.labels)
                    probe_correct += correct
                    probe_seen += batch.labels.shape[0]
            if cfg.optim.clip_grad > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            if before_opt is not None:
                before_opt(step)  # e.g. DINO/SwAV: zero the frozen last layer's / prototypes' grads
            opt.step()
            opt.zero_grad(set_to_none=True)
            core.after_step(step)
            step += 1
            bi += 1
            busy_s += time.perf_counter() - t0
            n_logged += micro

            if step % cfg.train.log_every == 0 or step == d.run_steps or bi == d.steps_per_epoch:
                check_finite()  # the only host sync of the loop, every log_every steps
                rec = {"kind": "train", "step": step, "epoch": epoch, "wall": wall0 + time.perf_counter() - t_run,
                       "loss": float(loss_sum) / n_logged, "lr": float(lr_sched[step - 1]),
                       "images_per_second": n_logged * d.micro_batch * world / max(busy_s, 1e-9),
                       "data_wait": wait_s / max(busy_s, 1e-9), "size": size}
                rec.update({k: float(v) / n_logged for k, v in log_sums.items()})
                if probe is not None and probe_seen:
                    rec["linear_top1_online"] = 100.0 * float(probe_correct) / probe_seen
                if cuda:
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                log.write(**rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}",
                                    img_s=f"{rec['images_per_second']:.0f}", wait=f"{rec['data_wait']:.0%}", refresh=False)
                    bar.update(step - bar.n)
                loss_sum.zero_()
                log_sums.clear()
                n_logged, wait_s, busy_s = 0, 0.0, 0.0
                probe_correct.zero_()
                probe_seen = 0
                totals_update(totals, rec)
            if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                save(epoch, bi, wall0 + time.perf_counter() - t_run)
        done = step >= d.run_steps
        end_of_epoch = bi >= d.steps_per_epoch
        ep_done = epoch + 1 if end_of_epoch else epoch
        if can_eval and cfg.eval.every_epochs and end_of_epoch and ep_done % cfg.eval.every_epochs == 0 \
                and acc.is_main_process and not done:
            last_eval = evaluate_knn(core, *eval_loaders(), cfg, device, num_classes, cfg.eval.val_subset)
            log.write(kind="eval", step=step, epoch=ep_done, wall=wall0 + time.perf_counter() - t_run,
                      **{k: v for k, v in last_eval.items() if k != "protocol"})
        if end_of_epoch and cfg.train.ckpt_every_epochs and ep_done % cfg.train.ckpt_every_epochs == 0:
            save(ep_done if end_of_epoch else epoch, 0 if end_of_epoch else bi, wall0 + time.perf_counter() - t_run)
        if done:
            break  # leave `epoch` at the epoch the run stopped in (the final checkpoint records it)
    wall = wall0 + time.perf_counter() - t_run
    if bar is not None:
        bar.close()
    end_of_epoch = bi >= d.steps_per_epoch
    save(epoch + 1 if end_of_epoch else epoch, 0 if end_of_epoch else bi, wall)

    summary: dict = {}
    if acc.is_main_process:
        final = evaluate_knn(core, *eval_loaders(), cfg, device, num_classes) if can_eval and cfg.eval.final else {}
        if final:
            log.write(kind="eval", step=step, epoch=epoch + 1, wall=wall, **{k: v for k, v in final.items() if k != "protocol"})
        summary = make_summary(cfg, d, totals, final, knn_init, wall, step, bf16, device)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    acc.end_training()
    return summary


def totals_update(t: dict, rec: dict) -> None:
    """Running means over the logged windows, for the summary."""
    for k in ("images_per_second", "data_wait", "loss", "linear_top1_online"):
        if k in rec:
            t.setdefault(k, []).append(rec[k])


def make_summary(cfg, d, t, final, knn_init, wall, step, bf16, device) -> dict:
    def mean(k):
        v = t.get(k, [])
        # Skip the first window: it holds warm-up/compilation.
        v = v[1:] if len(v) > 2 else v
        return float(np.mean(v)) if v else None

    last = t.get("linear_top1_online", [])
    knn_protocol = (final or knn_init or {}).get("protocol")
    return {
        "method": cfg.method.name, "backbone": cfg.model.backbone, "backend": cfg.data.backend,
        "data": cfg.data.train, "epochs": cfg.train.epochs, "steps": step, "global_batch": d.global_batch,
        "precision": "bf16" if bf16 else "fp32", "device": str(device),
        "knn_top1": final.get("knn_top1") if final else None,
        "knn_top1_init": knn_init.get("knn_top1") if knn_init else None,
        "linear_top1_online": float(np.mean(last[-3:])) if last else None,
        "rankme": final.get("rankme") if final else None,
        "rankme_init": knn_init.get("rankme") if knn_init else None,
        "images_per_second": mean("images_per_second"),
        "wall_seconds": wall,
        "data_wait_fraction": mean("data_wait"),
        "final_loss": t.get("loss", [None])[-1],
        "protocol": {
            "knn": knn_protocol,
            "linear_top1_online": "linear head on detached backbone features of view 0 (augmented), "
                                  "trained alongside; accuracy on the last 3 logged training windows",
            "rankme": "RankMe (section 3.7.2) of backbone features of the eval split",
            "images_per_second": "training images (global batch) per second of step time, after the first log window",
        },
    }


def print_summary(summary: dict, run_dir: Path) -> None:
    keys = ["method", "backbone", "steps", "knn_top1", "knn_top1_init", "linear_top1_online", "rankme",
            "rankme_init", "images_per_second", "data_wait_fraction", "wall_seconds"]
    w = max(len(k) for k in keys)
    print(f"\n{'-' * 48}\nsummary ({run_dir}/summary.json)")
    for k in keys:
        v = summary.get(k)
        s = f"{v:.3f}" if isinstance(v, float) else str(v)
        print(f"  {k:<{w}}  {s}")
    if summary.get("protocol", {}).get("knn"):
        p = summary["protocol"]["knn"]
        print(f"  (kNN: k={p['k']}, T={p['temperature']}, {p['features']}, {p['eval_split']})")
    print("-" * 48)


# ----------------------------------------------------------------------------- command line


def help_text(cfg: Config) -> str:
    lines = ["", "config keys (set with key.sub=value; current values shown):"]
    for k, tp, v in all_keys(cfg):
        lines.append(f"  {k:<34} {tp:<8} {v!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="fastssl-train", add_help=False,
        description="Pretrain a self-supervised model. Example: fastssl-train --config configs/demo/simclr.yaml "
                    "data.train=data/demo/train.beton optim.batch_size=256 train.epochs=2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="YAML recipe (configs/...)")
    ap.add_argument("--resume", action="store_true", help="same as train.resume=true")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--help", "-h", action="store_true", help="show this help and every config key")
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") and "=" not in r]
    try:
        if bad:
            raise ConfigError(f"unknown option {bad[0]!r}; options are --config, --resume, --print-config, --help; "
                              f"config keys are given as key.sub=value")
        cfg = load_config(args.config, [r for r in rest])
        if args.resume:
            cfg.train.resume = True
    except ConfigError as e:
        if args.help:
            ap.print_help()
            print(help_text(Config()))
            return 0
        print(f"fastssl-train: config error: {e}", file=sys.stderr)
        return 2
    if args.help:
        ap.print_help()
        print(help_text(cfg))
        return 0
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"fastssl-train: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"fastssl-train: {e}", file=sys.stderr)
        return 3
    if summary:
        print_summary(summary, run_dir_for(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
