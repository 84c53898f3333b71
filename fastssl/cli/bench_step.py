"""``fastssl-bench step``: full training steps/s of a method on synthetic views (no data loading).

    fastssl-bench step --config configs/demo/dino.yaml --json
    fastssl-bench step --config configs/imagenet/mae_vitb16.yaml model.backbone=vit_small_patch16 \\
        --device cpu --batch 8 --steps 4 --compare method.mask_ratio=0.0 --json

One step = forward (autocast bf16 on CUDA unless ``train.precision=fp32``), backward,
gradient clipping (``optim.clip_grad``), ``before_optimizer_step``, optimizer step,
``after_step``: what the trainer does per optimizer step, minus the loader. Views are
random normalised tensors of the recipe's shapes (globals and locals). On CUDA the
backbone is compiled like the trainer does (``train.compile``) and channels_last is used.

``--compare k=v [k=v ...]`` adds a variant (repeatable); all variants are built first
and timed in interleaved rounds in one process, so machine noise hits them alike; the
JSON gives each variant's steps/s and images/s (median over rounds) and its ratio to the
first (the base config).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One config built into a method + optimizer + fixed random views on ``device``."""

    def __init__(self, name: str, config: str | None, overrides: list[str], batch: int | None, device: torch.device):
        from fastssl.config import load_config
        from fastssl.methods import create_method
        from fastssl.optim import build_optimizer

        self.name, self.overrides = name, overrides
        cfg = load_config(config, overrides)
        self.cfg = cfg
        self.batch = batch or cfg.optim.batch_size
        self.device = device
        cuda = device.type == "cuda"
        self.bf16 = cuda and cfg.train.precision != "fp32" or cfg.train.precision == "bf16"
        torch.manual_seed(cfg.train.seed)
        method = create_method(cfg, total_steps=10_000).to(device)
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        if cfg.train.channels_last:  # as the trainer: NHWC on CUDA and on the CPU (oneDNN)
            method = method.to(memory_format=torch.channels_last)
        self.compiled = cfg.train.compile == "on" or (cfg.train.compile == "auto" and cuda)
        if self.compiled:
            from fastssl.compile import compile_module

            compile_module(method.backbone)  # as the trainer: in place, eager fallback
        self.method = method.train()
        self.opt = build_optimizer(method, cfg.optim, cfg.optim.lr)
        self.params = [p for p in method.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(0)
        vdt = torch.bfloat16 if self.bf16 else torch.float32  # the loader hands views in the step's precision
        self.views = [torch.randn(self.batch, 3, v.size, v.size, generator=g).to(device, vdt, memory_format=fmt)
                      for v in cfg.aug.resolved_views()]
        self.step_i = 0
        self.last_loss = torch.zeros((), device=device)

    def step(self) -> None:
        m = self.method
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = m(self.views, self.step_i)
        out["loss"].backward()
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad)
        if hasattr(m, "before_optimizer_step"):
            m.before_optimizer_step(self.step_i)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        m.after_step(self.step_i)
        self.last_loss = out["loss"].detach()
        self.step_i += 1

    def timed(self, n: int) -> float:
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        _sync(self.device)
        return time.perf_counter() - t

    def describe(self) -> dict:
        c = self.cfg
        return {"name": self.name, "overrides": self.overrides, "method": c.method.name, "backbone": c.model.backbone,
                "batch": self.batch, "views": [v.size for v in c.aug.resolved_views()],
                "precision": "bf16" if self.bf16 else "fp32",
                "compiled": self.compiled and not getattr(self.method.backbone, "compile_error", None),
                "compile_error": getattr(self.method.backbone, "compile_error", None),
                "params_trainable": sum(p.numel() for p in self.params)}


def run(config, overrides, compares, steps, warmup, rounds, batch, device) -> dict:
    variants = [Variant("base", config, overrides, batch, device)]
    for i, extra in enumerate(compares):
        variants.append(Variant(" ".join(extra), config, overrides + extra, batch, device))
    for v in variants:  # warm-up: compilation, allocator, autotuning, BN stats
        for _ in range(warmup):
            v.step()
        _sync(device)
    per_round = max(steps // rounds, 1)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v.name].append(v.timed(per_round) / per_round)
    out = []
    for v in variants:
        s = statistics.median(times[v.name])
        loss = float(v.last_loss)
        out.append({**v.describe(), "sec_per_step": s, "steps_per_s": 1.0 / s, "images_per_s": v.batch / s,
                    "round_sec_per_step": times[v.name], "final_loss": loss,
                    "finite": bool(torch.isfinite(torch.tensor(loss)))})
    base = out[0]["images_per_s"]
    for o in out:
        o["images_per_s_vs_base"] = o["images_per_s"] / base
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return {"benchmark": "step", "config": config, "overrides": overrides, "steps_timed": per_round * rounds,
            "warmup": warmup, "rounds": rounds, "env": env, "variants": out,
            "protocol": "full optimizer steps (fwd, bwd, clip, opt step, after_step) on fixed random views; "
                        "median over interleaved rounds after warm-up; images/s = batch / sec_per_step"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="fastssl-bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", help="YAML recipe (configs/...)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (split into --rounds)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default optim.batch_size)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--compare", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                    help="a variant: the base config plus these overrides (repeatable)")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--out", help="also write the JSON here")
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        print(f"fastssl-bench step: unknown argument {bad[0]!r} (config keys are key.sub=value)", file=sys.stderr)
        return 2
    from fastssl.config import ConfigError

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        print("fastssl-bench step: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    try:
        res = run(args.config, rest, args.compare, args.steps, args.warmup, args.rounds, args.batch, torch.device(dev))
    except ConfigError as e:
        print(f"fastssl-bench step: config error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=2)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for v in res["variants"]:
            print(f"{v['name']:<32} {v['method']:>12} {v['backbone']:>18} batch {v['batch']:>4}  "
                  f"{v['steps_per_s']:8.3f} steps/s  {v['images_per_s']:9.1f} img/s  x{v['images_per_s_vs_base']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
