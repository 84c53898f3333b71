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
import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastssl import checkpoint as ckpt_io
from fastssl.faults import (PREEMPTED_EXIT_CODE, CheckpointHistory, Preempted, Preemption, RunFault, RunLock,
                            RunLocked, config_differences, environmental_fault, is_out_of_memory,
                            last_good_checkpoint)
from fastssl.config import Config, ConfigError, all_keys, derive, load_config, save_config, to_dict
from fastssl.loop import (Checkpointer, Evaluator, LogWindow, MicroBatches, NonFiniteLoss, RunState,  # noqa: F401
                          StopSignal, out_of_memory, start_watchdog)
from fastssl.metrics_log import MetricsLog
from fastssl.rundir import cpu_threads, environment, pick_device, run_dir_for  # noqa: F401 (public here too)
from fastssl.schedules import progressive_size

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the run


def train(cfg: Config, trust_checkpoint: bool = False) -> dict:
    """Run (or resume) one pretraining run; returns the summary dict (also written to summary.json).

    ``trust_checkpoint``: resume from a checkpoint that needs pickle (written before fastssl stored
    plain tensors; SECURITY.md). Raises :class:`fastssl.faults.Preempted` after a SIGTERM/SIGUSR1,
    once its checkpoint is written.
    """
    from accelerate.utils import set_seed

    from fastssl.engine import make_accelerator, use_bf16

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a .beton or image folder (e.g. data.train=data/demo/train.beton); "
                          "`fastssl-prepare synthetic data/demo` writes the built-in dataset")
    device = pick_device(cfg)
    bf16 = use_bf16(cfg, device)
    acc = make_accelerator(cfg, device)
    device = acc.device
    rank, world = acc.process_index, acc.num_processes
    threads = cpu_threads(world) if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    set_seed(cfg.train.seed + rank)
    out = run_dir_for(cfg)
    history = CheckpointHistory(out / "checkpoints", cfg.train.keep_checkpoints)
    resume = cfg.train.resume != "false" and history.exists()
    if cfg.train.resume == "true" and not resume and acc.is_main_process:
        logger.warning(f"train.resume=true but {out / 'checkpoints'} holds no checkpoint: starting a new run")
    state = None
    if resume:  # read (and checked) before any work: a config mismatch fails at once
        state, from_path = history.load_latest(trust=trust_checkpoint)
        if cfg.train.resume == "auto":
            diffs = config_differences(state.get("config", {}), to_dict(cfg))
            if diffs:
                raise ConfigError(f"train.resume=auto: {from_path} was written with another config ("
                                  f"{'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}); use another "
                                  f"train.name, or train.resume=true to continue it anyway")
    lock = RunLock(out)
    if acc.is_main_process:
        lock.acquire()  # a second run with this train.name fails here, before it writes anything
    dog = start_watchdog(cfg, out, rank, acc.num_processes)  # several processes: a rank that hangs ends the job
    try:
        return _train(cfg, acc, device, bf16, threads, out, history, state, lock, dog)
    finally:
        dog.stop()
        lock.release()


def _train(cfg, acc, device, bf16, threads, out, history, state, lock, dog) -> dict:
    from fastssl.engine import TrainCore
    from fastssl.pipelines.prefetch import DataWaitMeter
    from fastssl.progress import progress

    rank, world = acc.process_index, acc.num_processes
    make_loader = LoaderFactory(cfg, device, bf16, threads)
    views = cfg.aug.resolved_views()
    # The derived sizes (micro-batch, steps) need the dataset's size: a 2-sample loader reads it.
    derived = derive(cfg, make_loader("train", 2, True, cfg.train.seed, rank, world, views).num_samples, world)
    loader = make_loader("train", derived.micro_batch, True, cfg.train.seed, rank, world, views)
    core = TrainCore(cfg, derived, acc, loader.num_classes)
    run = RunState.from_checkpoint(state)
    if state is not None:
        core.load_state_dict(state)
        ckpt_io.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])  # each rank its own
    start_run_dir(cfg, acc, out, history, derived, core, bf16, device, fresh=state is None)
    metrics = MetricsLog(out / "metrics.jsonl", acc.is_main_process, cfg=cfg, acc=acc)
    if state is not None:  # steps logged after that checkpoint (a crash, a full disk) are logged again, once
        metrics.drop_after(run.step)
    # A bar on a terminal; otherwise a line per log_every steps (train.progress=false: none). Rank 0 only.
    bar = progress(derived.run_steps, "train", "step", enabled=cfg.train.progress and acc.is_main_process,
                   initial=run.step, every=cfg.train.log_every)
    meter = DataWaitMeter(device)
    window = LogWindow(core, metrics, bar, derived.global_batch, cfg, device.type == "cuda", meter)
    saver = Checkpointer(history, core, acc, window, derived.total_steps, to_dict(cfg), watchdog=dog)
    evaluator = Evaluator(cfg, core, make_loader, device, loader.num_classes, out, acc.is_main_process)
    evaluator.watchdog = dog
    dog.on_fire = functools.partial(record_fault, metrics, run, rank)
    if evaluator.enabled and evaluator.participates and cfg.eval.final and run.knn_init is None:
        run.knn_init = evaluator.run(full=True)  # the baseline of the final figure: the same bank
        run.eval_here = evaluator.seconds
        if run.knn_init is not None:
            metrics.write(kind="eval", step=0, epoch=0, wall=0.0, init=True, **eval_values(run.knn_init))
    stop = StopSignal(Preemption().install(), world, device)

    # ---- the loop: fetch, step, log now and then; no host sync in between
    core.model.train()
    compiling = core.compiled  # the first step compiles (lazily): announced and timed (host time, no sync)
    epoch0, batch0 = run.epoch, run.batch_in_epoch
    bi, size = batch0, cfg.aug.global_size
    step0 = run.step
    dog.set_phase("train")
    for run.epoch in range(epoch0, cfg.train.epochs):
        if run.step >= derived.run_steps:  # resumed a finished run
            break
        prev_size, size = size, progressive_size(run.epoch, cfg.train.epochs, cfg.train.res_start,
                                                 cfg.aug.global_size, cfg.train.res_end_epoch, cfg.train.res_step)
        if size != prev_size:
            dog.next_step_compiles()  # a new resolution recompiles: its first step gets train.first_step_timeout
        loader.set_epoch(run.epoch, global_size=size if cfg.train.res_start else None)
        bi = batch0 if run.epoch == epoch0 else 0
        batches = epoch_batches(loader, bi * cfg.optim.accum_steps, cfg.optim.accum_steps, meter)
        while bi < derived.steps_per_epoch and run.step < derived.run_steps:
            t0 = time.perf_counter()
            consumed, oom = guarded_step(core, batches, run.step, cfg.model.backbone, bar,
                                         announce=compiling and cfg.train.progress)
            if oom is not None:
                raise out_of_memory(oom, cfg, core, saver, run, run.epoch, bi, derived.steps_per_epoch, size,
                                    run.step == step0, out)
            compiling = False
            if consumed == 0:
                break
            run.step += 1
            dog.beat(run.step)
            bi += 1
            window.add_step(time.perf_counter() - t0)
            logged = run.step % cfg.train.log_every == 0 or run.step == derived.run_steps \
                or bi == derived.steps_per_epoch
            if logged:
                window.log_point(run, float(core.lr_sched[run.step - 1]), size)
            if cfg.train.ckpt_every_steps and run.step % cfg.train.ckpt_every_steps == 0:
                saver.save(run, run.epoch, bi)
            if stop.requested(logged):
                saver.save_at(run, run.epoch, bi, derived.steps_per_epoch)
                raise preempted(stop.preemption, metrics, run, saver.last, rank)
        finished = run.step >= derived.run_steps
        end_of_epoch = bi >= derived.steps_per_epoch
        epochs_done = run.epoch + 1 if end_of_epoch else run.epoch
        if evaluator.due(epochs_done, end_of_epoch, finished):
            window.flush()  # the window's train record before the evaluation's
            result = evaluator.run(cfg.eval.val_subset)
            run.eval_here = evaluator.seconds
            if result is not None:
                metrics.write(kind="eval", step=run.step, epoch=epochs_done, wall=run.wall(), **eval_values(result))
        if end_of_epoch and cfg.train.ckpt_every_epochs and epochs_done % cfg.train.ckpt_every_epochs == 0:
            saver.save(run, epochs_done, 0)
        if finished:
            break  # leave run.epoch at the epoch the run stopped in (the final checkpoint records it)
    window.flush()  # the last log point's record, before the bar closes
    wall = run.wall()
    if bar is not None:
        bar.close()
    saver.save_at(run, run.epoch, bi, derived.steps_per_epoch)
    in_training_eval_s = run.eval_seconds()  # the whole run's, as wall
    final = (evaluator.run(step=run.step) if evaluator.enabled and evaluator.participates and cfg.eval.final
             else None) or {}
    summary = write_summary(cfg, acc, out, derived, window, evaluator, metrics, run, final, wall,
                            in_training_eval_s, bf16, device, threads)
    metrics.close()
    stop.preemption.uninstall()
    acc.end_training()
    return summary


def guarded_step(core, batches: MicroBatches, step: int, backbone: str, bar, announce: bool) -> tuple[int, str | None]:
    """One optimizer step: ``(micro-batches consumed, None)``, or ``(0, message)`` when the device ran out of
    memory. The caller handles that after this frame (its traceback and the step's activations) is gone.
    ``announce``: the first step compiles, and says so (host time, no sync)."""
    from fastssl.engine import train_step
    from fastssl.progress import first_step

    try:
        with first_step(backbone, bar, enabled=announce):
            return train_step(core, batches.take(), step), None
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):  # cuDNN/cuBLAS report theirs as RuntimeError text
            raise
        return 0, str(e)


def epoch_batches(loader, skip: int, accum: int, meter) -> MicroBatches:
    """The epoch's batches (after ``set_epoch``), ``skip`` of them already trained on (a resumed run): the same
    batches in the same order, skipped without decoding where the back-end can (webdataset)."""
    if skip and hasattr(loader, "skip_batches"):
        loader.skip_batches(skip)
        skip = 0
    batches = MicroBatches(iter(loader), accum, meter)
    batches.skip(skip)
    return batches


def record_fault(metrics, run: RunState, rank: int, line: str) -> None:
    """The watchdog's one line, also in ``metrics.jsonl`` (the step it fired at)."""
    metrics.write(kind="error", step=run.step, rank=rank, message=line)


def write_summary(cfg, acc, out: Path, derived, window, evaluator, metrics, run: RunState, final: dict, wall: float,
                  in_training_eval_s: float, bf16: bool, device, threads: int) -> dict:
    """The final evaluation's record and ``summary.json`` (rank 0; the others return {})."""
    if not acc.is_main_process:
        return {}
    if final:
        metrics.write(kind="eval", step=run.step, epoch=run.epoch + 1, wall=wall, **eval_values(final))
    summary = make_summary(cfg, derived, window, final, run.knn_init, wall, run.step, bf16, device)
    if run.resumed:
        _keep_earlier_window_figures(summary, out / "summary.json")
    train_s = wall - in_training_eval_s
    summary.update(torch_threads=threads, train_seconds=train_s, eval_seconds=in_training_eval_s,
                   eval_fraction=in_training_eval_s / max(train_s, 1e-9),
                   final_eval_seconds=evaluator.seconds - in_training_eval_s)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class LoaderFactory:
    """Builds the run's loaders: every one in the step's precision and with the run's thread count."""

    def __init__(self, cfg, device, bf16: bool, threads: int):
        self.cfg, self.device, self.threads = cfg, device, threads
        # bf16 halves the bytes the loader writes; fp32 runs need fp32 input.
        self.dtype = torch.bfloat16 if bf16 else torch.float32

    def __call__(self, split, batch, train, seed, rank, world, views):
        from fastssl.pipelines.loader import build_loader

        loader = build_loader(self.cfg.data, views, split, batch, self.device, seed=seed, rank=rank,
                              world_size=world, backend=self.cfg.data.backend, workers=self.cfg.data.workers,
                              train=train, drop_last=train, dtype=self.dtype)
        # A loader library may change the process's thread count (ffcv's import sets 1): the steps
        # run with the count chosen for the run, which env.json and every metrics line record.
        torch.set_num_threads(self.threads)
        if hasattr(loader, "worker_timeout"):  # torch back-end: a hung DataLoader worker ends the run (exit 7)
            loader.worker_timeout = self.cfg.data.worker_timeout
        return loader


def start_run_dir(cfg, acc, out: Path, history, derived, core, bf16: bool, device, fresh: bool) -> None:
    """The run directory's config and environment record; a new run clears an earlier run's metrics and
    checkpoints (a fallback past an unreadable last.pt would otherwise pick the other run's)."""
    if not acc.is_main_process:
        return
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "env.json").write_text(json.dumps({**environment(device), "world_size": acc.num_processes,
                                              "derived": asdict(derived), "precision": "bf16" if bf16 else "fp32",
                                              "compiled": core.compiled, "host_alloc": core.host_alloc}, indent=2))
    if fresh:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        history.clear()


def eval_values(result: dict) -> dict:
    """An evaluation's numbers for ``metrics.jsonl`` (its protocol goes to the summary once)."""
    return {k: v for k, v in result.items() if k != "protocol"}


def preempted(preemption, metrics, run: RunState, checkpoint: Path, rank: int) -> Preempted:
    """After the pre-emption checkpoint: log it, requeue if the scheduler asks, and the exception to raise."""
    metrics.write(kind="preempted", step=run.step, signal=preemption.signal_name or "peer rank",
                  checkpoint=str(checkpoint))
    metrics.close()
    preemption.uninstall()
    preemption.requeue(rank)
    return Preempted(f"stopped at step {run.step} on {preemption.signal_name or 'a signal to another rank'}; "
                     f"checkpoint {checkpoint}; resume with train.resume=auto (or --resume)")


# The figures a segment reads from its own training log windows.
WINDOW_FIGURES = ("images_per_second", "data_wait_fraction", "data_wait_host_fraction", "final_loss",
                  "linear_top1_online")


def _keep_earlier_window_figures(summary: dict, path: Path) -> None:
    """A resumed segment that logged no training window (the run had finished: only its final evaluation
    ran again) keeps the earlier segment's figures rather than writing None over them."""
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for key in WINDOW_FIGURES:
        if summary.get(key) is None and prev.get(key) is not None:
            summary[key] = prev[key]


def make_summary(cfg, derived, window: LogWindow, final, knn_init, wall, step, bf16, device) -> dict:
    last = window.totals.get("linear_top1_online", [])
    knn_protocol = (final or knn_init or {}).get("protocol")
    losses = window.totals.get("loss", [None])
    return {
        "method": cfg.method.name, "backbone": cfg.model.backbone, "backend": cfg.data.backend,
        "data": cfg.data.train, "epochs": cfg.train.epochs, "steps": step, "global_batch": derived.global_batch,
        "precision": "bf16" if bf16 else "fp32", "device": str(device),
        "knn_top1": final.get("knn_top1") if final else None,
        "knn_top1_init": knn_init.get("knn_top1") if knn_init else None,
        "linear_top1_online": float(np.mean(last[-3:])) if last else None,
        "rankme": final.get("rankme") if final else None,
        "rankme_init": knn_init.get("rankme") if knn_init else None,
        "images_per_second": window.mean("images_per_second"),
        "wall_seconds": wall,
        "data_wait_fraction": window.mean("data_wait"),
        "data_wait_host_fraction": window.mean("data_wait_host"),
        "final_loss": losses[-1],
        "protocol": {
            "knn": knn_protocol,
            "linear_top1_online": "linear head on detached backbone features of view 0 (augmented), "
                                  "trained alongside; accuracy on the last 3 logged training windows",
            "rankme": "RankMe (section 3.7.2) of backbone features of the eval split",
            "images_per_second": "training images (global batch) per second of step time, after the first log window",
            "data_wait_fraction": "share of step time the step's CUDA stream sat idle waiting for a batch (CUDA "
                                  "events; on the CPU, host time in the loader); data_wait_host_fraction: host time "
                                  "inside the loader's next()",
            "eval_seconds": "host wall time of the run's in-training kNN/RankMe evaluations (at init and "
                            "every eval.every_epochs; over every resumed segment, as wall_seconds); eval_fraction "
                            "is their share of train_seconds (the rest of wall_seconds); final_eval_seconds is the "
                            "evaluation after the last step",
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


# ----------------------------------------------------------------------------- from Python


@dataclass
class TrainResult:
    """What :func:`fit` (``fastssl.train(...)``) returns: the run directory and its ``summary.json``."""

    run_dir: Path
    summary: dict


def fit(data: str | os.PathLike, method: str | None = None, backbone: str | None = None,
        out: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
        val: str | os.PathLike | None = None, trust_checkpoint: bool = False, **overrides) -> TrainResult:
    """Train from Python as ``fastssl-train`` does; ``fastssl.train(...)`` is this function.

    ``data``: a ``.beton``, an image folder, or a folder holding ``train.beton`` (and ``val.beton``),
    as ``fastssl-prepare`` writes them. ``method``/``backbone``: registry names (``simclr``,
    ``resnet50``). ``out``: the run directory (default ``runs/<method>-<backbone>-<data>``).
    ``config``: a YAML file or packaged recipe (``demo/simclr``, ``simclr_rn50``) to start from.
    ``overrides``: config keys, nested (``optim={"lr": 0.1}``) or dotted (``**{"optim.lr": 0.1}``).

    >>> result = fastssl.train(data="data/demo", config="demo/simclr", out="runs/x", train={"epochs": 1})
    >>> result.summary["knn_top1"]
    """
    data = Path(data)
    if val is None and data.is_dir() and (data / "train.beton").is_file():
        val = data / "val.beton" if (data / "val.beton").is_file() else None
        data = data / "train.beton"
    pairs: list[tuple[str, object]] = [("data.train", data)]
    if val is not None:
        pairs.append(("data.val", val))
    if method is not None:
        pairs.insert(0, ("method.name", method))
    if backbone is not None:
        pairs.append(("model.backbone", backbone))
    if out is not None:
        out = Path(out)
        pairs += [("train.out_dir", out.parent), ("train.name", out.name)]
    for key, value in overrides.items():
        if isinstance(value, dict):
            pairs += [(f"{key}.{k}", v) for k, v in _flatten(value)]
        else:
            pairs.append((key, value))
    cfg = load_config(config, [f"{k}={_yaml_value(v)}" for k, v in pairs])
    summary = train(cfg, trust_checkpoint=trust_checkpoint)
    return TrainResult(run_dir_for(cfg), summary)


def _flatten(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _yaml_value(v) -> str:
    """A Python value as the override parser reads it (YAML scalars; lists and paths included)."""
    import yaml

    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()  # a scalar ends "\n..."


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
    ap.add_argument("--config", "-c", help="a YAML file, or a packaged recipe by name (simclr_rn50, demo/simclr; "
                                               "see --list-configs)")
    ap.add_argument("--list-configs", action="store_true", help="list the packaged recipes and exit")
    ap.add_argument("--resume", action="store_true", help="same as train.resume=true")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="resume from a checkpoint that needs pickle (older fastssl); runs code stored in it: "
                         "only for files you wrote yourself (SECURITY.md)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--help", "-h", action="store_true", help="show this help and every config key")
    args, rest = ap.parse_known_args(argv)
    from fastssl.logs import configure

    configure()  # the library's log lines: plain `fastssl: ...` on stderr (FASTSSL_QUIET=1: warnings only)
    if args.list_configs:
        from fastssl.recipes import describe, list_recipes, recipes_dir

        recipes = list_recipes()
        if not recipes:
            print("fastssl-train: this installation ships no recipes", file=sys.stderr)
            return 2
        w = max(len(n) for n in recipes)
        example = "demo/simclr" if "demo/simclr" in recipes else next(iter(recipes))
        print(f"packaged recipes ({recipes_dir()}); use one with --config NAME (e.g. --config {example}):")
        for name, path in recipes.items():
            print(f"  {name:<{w}}  {describe(path)}")
        return 0
    bad = [r for r in rest if r.startswith("-") and "=" not in r]
    try:
        if bad:
            raise ConfigError(f"unknown option {bad[0]!r}; options are --config, --list-configs, --resume, --trust-checkpoint, "
                              f"--print-config, --help; config keys are given as key.sub=value")
        cfg = load_config(args.config, [r for r in rest])
        if args.resume:
            cfg.train.resume = "true"
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
    import fastssl.pipelines as pipelines
    from fastssl.checkpoint import CheckpointError

    data_errors = tuple(e for e in (getattr(pipelines, "DataError", None),) if e is not None)

    # Every error a user can fix is one line naming the file or key and the fix (exit 2); a
    # pre-empted run exits with PREEMPTED_EXIT_CODE (75) after its checkpoint is written.
    try:
        summary = train(cfg, trust_checkpoint=args.trust_checkpoint)
    except ConfigError as e:
        print(f"fastssl-train: config error: {e}", file=sys.stderr)
        return 2
    except (*data_errors, FileNotFoundError, CheckpointError, RunLocked) as e:
        print(f"fastssl-train: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional back-end the user named (the message holds the install command)
        print(f"fastssl-train: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"fastssl-train: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"fastssl-train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except RunFault as e:  # a full disk (4), out of memory (5), a loader worker (7): one line, named in faults.py
        e.last_good = e.last_good or last_good_checkpoint(run_dir_for(cfg))
        print(f"fastssl-train: {e}", file=sys.stderr)
        return e.exit_code
    except (OSError, RuntimeError) as e:  # the same faults met where fastssl had no handler of its own
        fault = environmental_fault(e, run_dir_for(cfg))
        if fault is None:
            raise
        print(f"fastssl-train: {fault}", file=sys.stderr)
        return fault.exit_code
    if summary:
        print_summary(summary, run_dir_for(cfg))
    return 0


class _CallableModule(type(sys)):
    """``fastssl.train`` is this module (``python -m fastssl.train``, ``fastssl/train.py``) and, called, :func:`fit`:
    importing a submodule sets the package's attribute of that name, so a plain function would be shadowed."""

    def __call__(self, *args, **kwargs) -> TrainResult:
        return fit(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
