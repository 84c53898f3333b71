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

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One config built into the trainer's own :class:`~fastssl.engine.TrainCore` + fixed random views.

    The step timed is :func:`fastssl.engine.train_step`, the trainer's: same precision, compile
    (in place, with its eager fallback), scaled lr and schedules, clipping and hooks.
    """

    def __init__(self, name: str, config: str | None, overrides: list[str], batch: int | None, device: torch.device):
        from fastssl.config import derive, load_config
        from fastssl.engine import TrainCore, make_accelerator
        from fastssl.pipelines import Batch

        self.name, self.overrides = name, overrides
        cfg = load_config(config, overrides)
        if batch:
            cfg.optim.batch_size = batch
        cfg.optim.accum_steps = 1
        self.cfg = cfg
        self.batch = cfg.optim.batch_size
        self.device = device
        torch.manual_seed(cfg.train.seed)
        acc = make_accelerator(cfg, device)
        # A nominal dataset of 1000 steps per epoch: the schedules and the lr scaling as in training.
        d = derive(cfg, num_samples=self.batch * 1000)
        self.core = TrainCore(cfg, d, acc)
        self.bf16, self.compiled = self.core.bf16, self.core.compiled
        self.method = self.core.method
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(0)
        vdt = torch.bfloat16 if self.bf16 else torch.float32  # the loader hands views in the step's precision
        views = [torch.randn(self.batch, 3, v.size, v.size, generator=g).to(acc.device, vdt, memory_format=fmt)
                 for v in cfg.aug.resolved_views()]
        self.batch_obj = Batch(views=views, labels=None, indices=torch.arange(self.batch, device=acc.device))
        self.params = self.core.params
        self.step_i = 0

    @property
    def last_loss(self) -> torch.Tensor:
        return self.core.loss_sum / max(self.core.n_micro, 1)

    def step(self) -> None:
        from fastssl.engine import train_step

        self.core.reset_logs()  # device-side zeroing only: no host sync
        train_step(self.core, [self.batch_obj], self.step_i % self.core.d.total_steps)
        self.step_i += 1

    def timed(self, n: int) -> float:
        from fastssl.benchmarking import Timer

        _sync(self.device)  # earlier variants' work must not land in this one's interval
        with Timer(self.device) as t:
            for _ in range(n):
                self.step()
        return t.seconds()

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
    if len({v.bf16 for v in variants}) > 1:
        # accelerate's mixed-precision state is process-wide: variants of one run share it.
        raise ValueError("--compare variants must share train.precision (accelerate's precision is per process)")
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


# Named sets of cases (``--suite``): name, config, overrides, batch, compare variants.
SUITES = {
    # The GPU recipe's figures, in order of the goals they measure (a timeout cuts the last).
    "gpu": [
        # per-view BatchNorm (the default) against the one joint call over both views
        ("simclr_rn50_bf16_compiled", "configs/imagenet/simclr_rn50.yaml", ["train.res_start=0"], 256,
         [["method.joint_bn=true"]]),
        ("dino_vits16_bf16", "configs/imagenet/dino_vits16.yaml", [], 128, [["model.attn=naive"]]),
        ("mae_vitb16_bf16", "configs/imagenet/mae_vitb16.yaml", [], 256, [["method.mask_ratio=0.0"]]),
    ],
    # The same code path on a CPU in seconds (a test runs it).
    "smoke": [
        ("simclr_demo", "configs/demo/simclr.yaml", ["aug.global_size=16"], 8, []),
        ("mae_demo", "configs/demo/mae.yaml", [], 8, [["method.mask_ratio=0.0"]]),
        ("dino_demo", "configs/demo/dino.yaml", ["aug.num_local=2"], 8, [["model.attn=naive"]]),
    ],
}


def run_suite(name: str, device: torch.device, quick: bool = False, emit=print, cases: list[str] | None = None) -> dict:
    """Every case of ``SUITES[name]``; one JSON line per case via ``emit`` as it finishes (a timeout keeps
    what was measured). A failing case is reported with its error and does not hide the others."""
    import traceback
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if name == "smoke":
        steps, warmup, rounds = 1, 1, 1
    else:  # warm-up 3: compile, cuDNN autotune and the allocator settle within the first steps
        steps, warmup, rounds = (8, 3, 2) if quick else (30, 5, 3)
    results = {}
    known = [c[0] for c in SUITES[name]]
    for c in cases or []:
        if c not in known:
            raise ValueError(f"--cases: no case {c!r} in suite {name!r} (have {', '.join(known)})")
    for case, cfg, ov, batch, compares in SUITES[name]:
        if cases and case not in cases:
            continue
        path = cfg if Path(cfg).is_file() else str(root / cfg)
        try:
            results[case] = run(path, ov, compares, steps, warmup, rounds, batch, device)
            if device.type == "cuda":
                results[case]["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            results[case] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        emit(json.dumps({"case": case, **results[case]}))
        sys.stdout.flush()
    return results


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
    ap.add_argument("--suite", choices=sorted(SUITES), help="run a named set of cases (gpu: the GPU recipe's "
                    "figures; smoke: the same on a CPU in seconds), one JSON line per case")
    ap.add_argument("--quick", action="store_true", help="--suite: fewer timed steps")
    ap.add_argument("--cases", default="", help="--suite: comma-separated subset of its cases")
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
    if args.suite:
        try:
            res = run_suite(args.suite, torch.device("cpu") if args.suite == "smoke" else torch.device(dev), args.quick,
                            cases=[c for c in args.cases.split(",") if c])
        except ValueError as e:
            print(f"fastssl-bench step: {e}", file=sys.stderr)
            return 2
        return 1 if any("error" in r for r in res.values()) else 0
    if not args.config:
        print("fastssl-bench step: give --config C (or --suite gpu|smoke)", file=sys.stderr)
        return 2
    try:
        res = run(args.config, rest, args.compare, args.steps, args.warmup, args.rounds, args.batch, torch.device(dev))
    except ConfigError as e:
        print(f"fastssl-bench step: config error: {e}", file=sys.stderr)
        return 2
    from fastssl.benchmarking import write_json

    text = write_json(res, args.out, indent=2)
    if args.json:
        print(text)
    else:
        for v in res["variants"]:
            print(f"{v['name']:<32} {v['method']:>12} {v['backbone']:>18} batch {v['batch']:>4}  "
                  f"{v['steps_per_s']:8.3f} steps/s  {v['images_per_s']:9.1f} img/s  x{v['images_per_s_vs_base']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
