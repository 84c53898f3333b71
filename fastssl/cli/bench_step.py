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

What a performance review asks for, in the same JSON:

- ``flops_per_image``, ``tflops`` and ``fraction_of_peak`` per variant: the step's forward +
  backward FLOPs (:mod:`fastssl.flops`, ``torch.utils.flop_counter`` on the meta device at the
  step's batch, before the warm-up) times images/s, against the device's dense bf16 peak
  (``peak_tflops``: a table by GPU name, ``--peak-tflops`` overrides; None on the CPU unless given).
- ``peak_mem_gb``: the most memory the timed rounds held (CUDA: ``max_memory_allocated``
  after ``reset_peak_memory_stats``; CPU: the process's peak RSS, VmHWM, reset through
  ``/proc/self/clear_refs``; ``mem_source`` says which). Variants of one run share the device,
  so it covers all of them; per variant, ``step_transient_gb`` is one step's peak over what was
  held before it (activations, gradients, the photometric stage).
- ``--photometric``: each step takes fixed uint8 crops ``(B, S, S, 3)`` and labels through the
  recipe's ``Augmenter`` (``fastssl.pipelines.loader.make_finisher``, as the trainer's loader),
  and the online probe (``eval.online_probe``, ``--num-classes``) trains on them, as in training
  (the stage runs on the step's stream, so images/s includes it; the trainer's loader overlaps it);
  ``photometric_peak_gb`` is one call of the stage alone (its peak over what was held at its
  start, its output views included). The memory check of the GPU recipe:

    fastssl-bench step --config configs/imagenet/simclr_rn50.yaml train.res_start=0 --device cuda \\
        --batch 512 --photometric --steps 6 --warmup 3 --rounds 2 --json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


GB = 2**30


def _proc_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class Memory:
    """Peak memory over an interval: the CUDA allocator's on a GPU, the process's peak RSS on the CPU.

    ``source`` names the measure; None (with ``reason``) where neither is readable. On the CPU the
    RSS covers the whole process (interpreter, libraries, other variants), and freed memory the
    allocator keeps is counted until it is returned, so it is a ceiling, not the step's own need.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reason = None
        if device.type == "cuda":
            self.source = "torch.cuda.max_memory_allocated"
        elif _proc_kb("VmHWM") is not None and self._clear_refs():
            self.source = "process peak RSS (VmHWM, reset via /proc/self/clear_refs)"
        else:
            self.source, self.reason = None, "no CUDA allocator and no resettable peak RSS (/proc/self/clear_refs)"

    @staticmethod
    def _clear_refs() -> bool:
        try:  # "5" resets the process's peak RSS to its current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def now(self) -> float | None:
        """Bytes held now (after the device's queued work)."""
        if self.source is None:
            return None
        if self.device.type == "cuda":
            _sync(self.device)
            return float(torch.cuda.memory_allocated(self.device))
        return _proc_kb("VmRSS") * 1024.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source is not None:
            self._clear_refs()

    def peak(self) -> float | None:
        """Peak bytes since :meth:`reset` (waits for the device's queued work)."""
        if self.source is None:
            return None
        if self.device.type == "cuda":
            _sync(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        return _proc_kb("VmHWM") * 1024.0

    def over(self, fn) -> float | None:
        """GB that ``fn()`` held at its peak beyond what was held at its start."""
        start = self.now()
        self.reset()
        fn()
        peak = self.peak()
        return None if start is None or peak is None else max(peak - start, 0.0) / GB


class Variant:
    """One config built into the trainer's own :class:`~fastssl.engine.TrainCore` + fixed random views.

    The step timed is :func:`fastssl.engine.train_step`, the trainer's: same precision, compile
    (in place, with its eager fallback), scaled lr and schedules, clipping and hooks.
    """

    def __init__(self, name: str, config: str | None, overrides: list[str], batch: int | None, device: torch.device,
                 photometric: bool = False, num_classes: int = 1000):
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
        self.d = d
        self.photometric = photometric
        # The online probe needs labels: it runs when the photometric stage feeds labelled batches.
        self.core = TrainCore(cfg, d, acc, num_classes if photometric else None)
        self.bf16, self.compiled = self.core.bf16, self.core.compiled
        self.method = self.core.method
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(0)
        vdt = torch.bfloat16 if self.bf16 else torch.float32  # the loader hands views in the step's precision
        specs = cfg.aug.resolved_views()
        self.aug = None
        self.crops: list[torch.Tensor] = []
        if photometric:
            from fastssl.pipelines.loader import make_finisher

            # What a loader hands the stage: uint8 (B, S, S, 3) crops on the device, labels; the trainer's finisher.
            self.aug = make_finisher(specs, acc.device, cfg.train.seed, train=True, dtype=vdt, impl=cfg.data.photometric)
            self.crops = [torch.randint(0, 256, (self.batch, v.size, v.size, 3), generator=g, dtype=torch.uint8)
                          .to(acc.device) for v in specs]
            labels = torch.randint(0, num_classes, (self.batch,), generator=g).to(acc.device)
            views = []
        else:
            labels = None
            views = [torch.randn(self.batch, 3, v.size, v.size, generator=g).to(acc.device, vdt, memory_format=fmt)
                     for v in specs]
        self.batch_obj = Batch(views=views, labels=labels, indices=torch.arange(self.batch, device=acc.device))
        self.flops: dict = {}
        self.params = self.core.params
        self.step_i = 0

    @property
    def last_loss(self) -> torch.Tensor:
        return self.core.loss_sum / max(self.core.n_micro, 1)

    def step(self) -> None:
        from fastssl.engine import train_step

        self.core.reset_logs()  # device-side zeroing only: no host sync
        if self.device.type == "cuda":  # process-wide: each variant's own setting while its steps run
            torch.backends.cudnn.benchmark = bool(self.cfg.train.cudnn_benchmark)
        step = self.step_i % self.core.d.total_steps
        batch = self.batch_obj
        if self.aug is not None:  # the stage is keyed by the step, as the loader calls it
            batch = type(batch)(views=self.aug(self.crops, step), labels=batch.labels, indices=batch.indices)
        train_step(self.core, [batch], step)
        self.step_i += 1

    def count_flops(self) -> dict:
        """The step's forward + backward FLOPs at this batch (:func:`fastssl.flops.step_flops`), once."""
        from fastssl.flops import step_flops

        if not self.flops:
            self.flops = step_flops(self.cfg, self.d.total_steps, self.batch)
        return self.flops

    def photometric_peak_gb(self, mem: Memory) -> float | None:
        """GB one call of the photometric stage holds at its peak beyond what was held at its start."""
        if self.aug is None:
            return None
        # The output views exist when the call returns: the peak, read after it, includes them.
        return mem.over(lambda: self.aug(self.crops, self.step_i))

    def timed(self, n: int) -> float:
        from fastssl.benchmarking import Timer

        _sync(self.device)  # earlier variants' work must not land in this one's interval
        with Timer(self.device) as t:
            for _ in range(n):
                self.step()
        return t.seconds()

    def _compile_error(self) -> str | None:
        return getattr(self.method, "compile_error", None) or getattr(self.method.backbone, "compile_error", None)

    def describe(self) -> dict:
        from fastssl.optim import update_path

        c = self.cfg
        return {"name": self.name, "overrides": self.overrides, "method": c.method.name, "backbone": c.model.backbone,
                "batch": self.batch, "views": [v.size for v in c.aug.resolved_views()],
                "precision": "bf16" if self.bf16 else "fp32",
                "compiled": self.compiled and not self._compile_error(),
                "compile_error": self._compile_error(),
                "compile_scope": c.train.compile_scope if self.compiled else None,
                "cudnn_benchmark": bool(c.train.cudnn_benchmark) if self.device.type == "cuda" else None,
                "optimizer": c.optim.name, "optimizer_path": update_path(self.core.opt),
                "params_trainable": sum(p.numel() for p in self.params),
                "photometric": self.photometric, "online_probe": self.core.probe is not None,
                "augmenter": getattr(self.aug, "impl", None)}


def peak_for(device: torch.device, override: float | None = None) -> tuple[float | None, str | None]:
    """``(peak TFLOP/s, where it comes from)``: ``--peak-tflops``, else the dense bf16 table by GPU name."""
    from fastssl.flops import peak_bf16_tflops

    if override:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_tflops(name)
    return (peak, f"fastssl.flops.PEAK_BF16_TFLOPS: {name}, dense bf16") if peak else (None, None)


def run(config, overrides, compares, steps, warmup, rounds, batch, device, photometric: bool = False,
        num_classes: int = 1000, peak_tflops: float | None = None, flops: bool = True) -> dict:
    variants = [Variant("base", config, overrides, batch, device, photometric, num_classes)]
    for i, extra in enumerate(compares):
        variants.append(Variant(" ".join(extra), config, overrides + extra, batch, device, photometric, num_classes))
    if len({v.bf16 for v in variants}) > 1:
        # accelerate's mixed-precision state is process-wide: variants of one run share it.
        raise ValueError("--compare variants must share train.precision (accelerate's precision is per process)")
    if flops:  # outside the timing: a fresh copy of each method on the meta device
        for v in variants:
            v.count_flops()
    for v in variants:  # warm-up: compilation, allocator, autotuning, BN stats
        for _ in range(warmup):
            v.step()
        _sync(device)
    mem = Memory(device)
    # Untimed, after the warm-up: the stage alone, then one step's peak over what the device holds.
    stage_gb = {v.name: v.photometric_peak_gb(mem) for v in variants}
    step_gb = {v.name: mem.over(v.step) for v in variants}
    per_round = max(steps // rounds, 1)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    mem.reset()
    for _ in range(rounds):
        for v in variants:
            times[v.name].append(v.timed(per_round) / per_round)
    peak_b = mem.peak()
    peak, peak_src = peak_for(device, peak_tflops)
    out = []
    for v in variants:
        s = statistics.median(times[v.name])
        loss = float(v.last_loss)
        o = {**v.describe(), "sec_per_step": s, "steps_per_s": 1.0 / s, "images_per_s": v.batch / s,
             "round_sec_per_step": times[v.name], "final_loss": loss,
             "finite": bool(torch.isfinite(torch.tensor(loss))),
             "step_transient_gb": step_gb[v.name], "photometric_peak_gb": stage_gb[v.name]}
        if v.core.probe is not None:  # the last step's labelled rows the probe trained on (a host read, after timing)
            o["probe_rows_last_step"] = int(v.core.probe_seen)
        if v.flops:
            tflops = v.flops["flops_per_image"] * o["images_per_s"] / 1e12
            # The table's peak is the bf16 tensor cores': an fp32 step is no fraction of it (a peak given
            # with --peak-tflops is the user's, for whatever precision they run).
            comparable = peak and (v.core.bf16 or peak_src == "--peak-tflops")
            o.update({k: v.flops[k] for k in ("flops_per_image", "flops_per_step", "flop_count_device",
                                               "flop_count_batch")},
                     tflops=tflops, fraction_of_peak=tflops / peak if comparable else None)
        out.append(o)
    base = out[0]["images_per_s"]
    for o in out:
        o["images_per_s_vs_base"] = o["images_per_s"] / base
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    from fastssl.flops import FLOP_COUNT_SOURCE

    return {"benchmark": "step", "config": config, "overrides": overrides, "steps_timed": per_round * rounds,
            "warmup": warmup, "rounds": rounds, "env": env, "variants": out,
            "photometric": photometric, "num_classes": num_classes if photometric else None,
            "peak_mem_gb": None if peak_b is None else peak_b / GB, "mem_source": mem.source,
            "mem_note": mem.reason if mem.source is None else (
                "timed rounds, all variants resident" if device.type == "cuda" else
                "timed rounds; the whole process's RSS, freed memory the allocator keeps included"),
            "peak_tflops": peak, "peak_source": peak_src,
            "flop_count": FLOP_COUNT_SOURCE if flops else None,
            "protocol": "full optimizer steps (fwd, bwd, clip, opt step, after_step) on "
                        + ("fixed random uint8 crops through the photometric stage (Augmenter, keyed by the step) "
                           "with labels and the online probe, on the step's stream (the trainer's loader overlaps the stage on a "
                           "side stream: images/s here is step + stage)" if photometric else "fixed random views")
                        + "; median over interleaved rounds after warm-up; images/s = batch / sec_per_step; "
                          "tflops = flops_per_image x images/s"}


# Named sets of cases (``--suite``): name, config, overrides, batch, compare variants[, options of run()].
SUITES = {
    # The GPU recipe's figures, in order of the goals they measure (a timeout cuts the last).
    "gpu": [
        # per-view BatchNorm (the default) against the one joint call over both views
        ("simclr_rn50_bf16_compiled", "configs/imagenet/simclr_rn50.yaml", ["train.res_start=0"], 256,
         [["method.joint_bn=true"]]),
        ("dino_vits16_bf16", "configs/imagenet/dino_vits16.yaml", [], 128, [["model.attn=naive"]]),
        ("mae_vitb16_bf16", "configs/imagenet/mae_vitb16.yaml", [], 256, [["method.mask_ratio=0.0"]]),
        # the recipe's batch with the photometric stage and the online probe: its peak memory and TFLOP/s,
        # and the stage compiled (fused) against eager
        ("simclr_rn50_b512_photometric", "configs/imagenet/simclr_rn50.yaml", ["train.res_start=0"], 512,
         [["data.photometric=compiled"]], {"photometric": True}),
        # the step's options (--cases 'simclr_rn50_opt_*'), one case each against the recipe's defaults, so that a
        # time limit keeps the cases that finished: LARS's per-parameter loop (the only path of timm < 1.0.31),
        # cuDNN's autotuner, the whole forward compiled, CUDA graphs, the fused bf16 NT-Xent. The defaults' graphs
        # compile once (inductor's cache serves the later cases); each option's own graphs compile anew.
        *[(f"simclr_rn50_opt_{name}", "configs/imagenet/simclr_rn50.yaml", ["train.res_start=0"], 256, [[option]])
          for name, option in (("foreach", "optim.foreach=off"), ("cudnn", "train.cudnn_benchmark=true"),
                               ("scope", "train.compile_scope=method"),
                               ("graphs", "train.compile_mode=reduce-overhead"),
                               ("loss_bf16", "method.loss_dtype=input"))],
    ],
    # The same code path on a CPU in seconds (a test runs it).
    "smoke": [
        ("simclr_demo", "configs/demo/simclr.yaml", ["aug.global_size=16"], 8, []),
        ("mae_demo", "configs/demo/mae.yaml", [], 8, [["method.mask_ratio=0.0"]]),
        ("dino_demo", "configs/demo/dino.yaml", ["aug.num_local=2"], 8, [["model.attn=naive"]]),
    ],
}


def run_suite(name: str, device: torch.device, quick: bool = False, emit=print, cases: list[str] | None = None,
              peak_tflops: float | None = None) -> dict:
    """Every case of ``SUITES[name]``; one JSON line per case via ``emit`` as it finishes (a timeout keeps
    what was measured). A failing case is reported with its error and does not hide the others."""
    import traceback
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if name == "smoke":
        steps, warmup, rounds = 1, 1, 1
    else:  # warm-up 3: compile, cuDNN autotune and the allocator settle within the first steps
        steps, warmup, rounds = (8, 3, 2) if quick else (30, 5, 3)
    import fnmatch

    results = {}
    known = [c[0] for c in SUITES[name]]
    for c in cases or []:  # a name, or a pattern (simclr_rn50_opt_*)
        if not fnmatch.filter(known, c):
            raise ValueError(f"--cases: no case {c!r} in suite {name!r} (have {', '.join(known)})")
    if cases:
        cases = [k for k in known if any(fnmatch.fnmatchcase(k, c) for c in cases)]
    for case, cfg, ov, batch, compares, *opts in SUITES[name]:
        if cases and case not in cases:
            continue
        path = cfg if Path(cfg).is_file() else str(root / cfg)
        try:
            results[case] = run(path, ov, compares, steps, warmup, rounds, batch, device, peak_tflops=peak_tflops,
                                **(opts[0] if opts else {}))
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
    ap.add_argument("--photometric", action="store_true", help="feed uint8 crops and labels through the recipe's "
                    "photometric stage each step, with the online probe (peak memory as in training)")
    ap.add_argument("--num-classes", type=int, default=1000, help="--photometric: the probe's classes (default 1000)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for fraction_of_peak "
                    "(default: a dense bf16 table by GPU name; none on the CPU)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (no tflops, fraction_of_peak)")
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
                            cases=[c for c in args.cases.split(",") if c], peak_tflops=args.peak_tflops)
        except ValueError as e:
            print(f"fastssl-bench step: {e}", file=sys.stderr)
            return 2
        return 1 if any("error" in r for r in res.values()) else 0
    if not args.config:
        print("fastssl-bench step: give --config C (or --suite gpu|smoke)", file=sys.stderr)
        return 2
    try:
        res = run(args.config, rest, args.compare, args.steps, args.warmup, args.rounds, args.batch, torch.device(dev),
                  photometric=args.photometric, num_classes=args.num_classes, peak_tflops=args.peak_tflops,
                  flops=not args.no_flops)
    except ConfigError as e:
        print(f"fastssl-bench step: config error: {e}", file=sys.stderr)
        return 2
    from fastssl.benchmarking import write_json

    text = write_json(res, args.out, indent=2)
    if args.json:
        print(text)
    else:
        for v in res["variants"]:
            tf = f"  {v['tflops']:7.2f} TFLOP/s" if v.get("tflops") is not None else ""
            frac = f" ({100 * v['fraction_of_peak']:.1f}% of peak)" if v.get("fraction_of_peak") is not None else ""
            print(f"{v['name']:<32} {v['method']:>12} {v['backbone']:>18} batch {v['batch']:>4}  "
                  f"{v['steps_per_s']:8.3f} steps/s  {v['images_per_s']:9.1f} img/s  x{v['images_per_s_vs_base']:.2f}"
                  f"{tf}{frac}")
        if res["peak_mem_gb"] is not None:
            print(f"peak memory {res['peak_mem_gb']:.2f} GB ({res['mem_source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
