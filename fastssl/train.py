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
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fastssl import checkpoint as ckpt_io
from fastssl.faults import (PREEMPTED_EXIT_CODE, CheckpointHistory, Preempted, Preemption, RunLock, RunLocked,
                            config_differences)
from fastssl.config import Config, ConfigError, Derived, all_keys, derive, load_config, save_config, to_dict
from fastssl.metrics_log import MetricsLog
from fastssl.rundir import cpu_threads, environment, pick_device, run_dir_for  # noqa: F401 (public here too)
from fastssl.schedules import progressive_size


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- set-up helpers










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
        print(f"[fastssl] train.resume=true but {out / 'checkpoints'} holds no checkpoint: starting a new run",
              file=sys.stderr)
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
    try:
        return _train(cfg, acc, device, bf16, threads, out, history, state, lock)
    finally:
        lock.release()


def _train(cfg, acc, device, bf16, threads, out, history, state, lock) -> dict:
    from fastssl.engine import TrainCore, train_step
    from fastssl.pipelines.loader import build_loader

    cuda = device.type == "cuda"
    rank, world = acc.process_index, acc.num_processes
    ckpt_path = history.last
    resume = state is not None

    # ---- data: each process a disjoint shard; micro-batch = global batch / (world * accum)
    views = cfg.aug.resolved_views()
    # Views in the step's precision: bf16 halves the bytes the loader writes; fp32 runs need fp32 input.
    view_dtype = torch.bfloat16 if bf16 else torch.float32

    def loader_for(split, batch, train, seed, r, w, sv):
        loader = build_loader(cfg.data, sv, split, batch, device, seed=seed, rank=r, world_size=w,
                              backend=cfg.data.backend, workers=cfg.data.workers, train=train,
                              drop_last=train, dtype=view_dtype)
        # A loader library may change the process's thread count (ffcv's import sets 1): the steps
        # run with the count chosen above, which env.json and every metrics line record.
        torch.set_num_threads(threads)
        return loader

    probe_loader = loader_for("train", 2, True, cfg.train.seed, rank, world, views)
    d: Derived = derive(cfg, probe_loader.num_samples, world)
    del probe_loader
    loader = loader_for("train", d.micro_batch, True, cfg.train.seed, rank, world, views)
    num_classes = loader.num_classes

    # ---- model, optimizer, schedules, probe: the training core that the benchmarks time too
    core = TrainCore(cfg, d, acc, num_classes)

    # ---- run directory and state
    step, epoch0, batch0, wall0, knn_init = 0, 0, 0, 0.0, None
    if resume:
        core.load_state_dict(state)
        step, epoch0, batch0 = state["step"], state["epoch"], state["batch_in_epoch"]
        wall0, knn_init = state.get("wall_seconds", 0.0), state.get("knn_init")
        ckpt_io.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])  # each rank its own
    if acc.is_main_process:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "env.json").write_text(json.dumps({**environment(device), "world_size": world,
                                                  "derived": asdict(d), "precision": "bf16" if bf16 else "fp32",
                                                  "compiled": core.compiled, "host_alloc": core.host_alloc}, indent=2))
        if not resume:
            # A new run in a used directory: an earlier run's metrics and checkpoints must not mix
            # with this one's (a fallback past an unreadable last.pt would pick the other run's).
            (out / "metrics.jsonl").unlink(missing_ok=True)
            history.clear()
    log = MetricsLog(out / "metrics.jsonl", acc.is_main_process, cfg=cfg, acc=acc)

    eval_cache: list = []

    def eval_loaders():
        # Built once per run and rewound per evaluation: a new ffcv loader JIT-compiles its decoder
        # at its first batch (about 5 s of CPU on 2 cores, against 0.25 s for a pass over the demo's
        # 2,000 images), so fresh loaders per evaluation had made each kNN evaluation 10x dearer.
        # set_epoch(0) stops any pass left running and restarts the fixed (unshuffled) order.
        if not eval_cache:
            eval_cache.extend(loader_for(split, 256, False, 0, 0, 1, views[:1]) for split in ("train", "val"))
        for ld in eval_cache:
            ld.set_epoch(0)
        return tuple(eval_cache)

    # Rank 0 evaluates; under FSDP every rank takes part (the weights are gathered), and gets None.
    evaluates = acc.is_main_process or core.sharded

    def evaluate(max_val: int = 0) -> dict | None:
        method = core.eval_method()
        from fastssl.evaluation.online import evaluate_knn

        return None if method is None else evaluate_knn(method, *eval_loaders(), cfg, device, num_classes, max_val)

    can_eval = bool((cfg.eval.final or cfg.eval.every_epochs) and cfg.data.val and num_classes)
    if can_eval and knn_init is None and evaluates and cfg.eval.final:
        knn_init = evaluate()
        if knn_init is not None:
            log.write(kind="eval", step=0, epoch=0, wall=0.0, init=True, **{k: v for k, v in knn_init.items() if k != "protocol"})

    def check_finite(bad: int | None = None) -> None:
        bad = core.first_bad_step() if bad is None else bad
        if bad >= 0:
            msg = (f"non-finite loss at step {bad} (method {cfg.method.name}, lr {core.lr_sched[bad]:.3g}); "
                   f"stopping. The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none (no checkpoint yet)'}. "
                   f"Try a lower optim.lr, optim.clip_grad=3.0 or train.precision=fp32.")
            log.write(kind="error", step=bad, message=msg)
            raise NonFiniteLoss(msg)

    # A log point's record waits for its values until the next log point (or a save, an evaluation,
    # the end): reading them at once would make the host wait for the GPU at every log point.
    pending: list = []  # [(record without the values, LogSnapshot)]

    def flush_log() -> None:
        while pending:
            rec, snap = pending.pop(0)
            vals, bad = core.resolve_logs(snap)
            check_finite(bad)
            rec = {**rec, **vals}
            log.write(**rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}",
                                img_s=f"{rec['images_per_second']:.0f}", wait=f"{rec['data_wait']:.0%}", refresh=False)
                bar.update(rec["step"] - bar.n)
            totals_update(totals, rec)

    def save(epoch: int, batch_in_epoch: int, wall: float) -> None:
        flush_log()
        check_finite()  # never overwrite the last good checkpoint with a diverged model
        rngs = _gather_rng(acc)  # every rank's own RNG state, in rank order
        states = core.state_dict()  # every rank: FSDP gathers the shards (to rank 0)
        if acc.is_main_process:
            history.save({
                **states,
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": d.total_steps,
                "wall_seconds": wall, "knn_init": knn_init, "rng": rngs, "config": to_dict(cfg)}, step)
        acc.wait_for_everyone()

    preempt = Preemption().install()

    def stop_requested(at_log_point: bool) -> bool:
        # One process: the handler's flag, read every step (no sync). Several: ranks may get the
        # signal at different steps, so they agree at log points (one small all-reduce and sync there).
        if world == 1:
            return preempt.requested
        if not at_log_point:
            return False
        import torch.distributed as dist

        flag = torch.tensor([int(preempt.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ---- the loop: fetch, step, log now and then; no host sync in between
    core.model.train()
    wait_s, busy_s, n_steps_logged = 0.0, 0.0, 0
    totals: dict = {}
    bi = batch0
    t_run = time.perf_counter()
    from fastssl.progress import first_step, progress

    # A bar on a terminal; otherwise a line per log_every steps (train.progress=false: none). Rank 0 only.
    bar = progress(d.run_steps, "train", "step", enabled=cfg.train.progress and acc.is_main_process, initial=step,
                   every=cfg.train.log_every)
    compiling = core.compiled  # the first step compiles (lazily): announced and timed (host time, no sync)
    micro = cfg.optim.accum_steps
    done = step >= d.run_steps
    epoch = epoch0
    size = cfg.aug.global_size
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

            def fetch():
                nonlocal wait_s
                for _ in range(micro):
                    tw = time.perf_counter()
                    try:
                        b = next(it)
                    except StopIteration:
                        return
                    wait_s += time.perf_counter() - tw
                    yield b

            with first_step(cfg.model.backbone, bar, enabled=compiling and cfg.train.progress):
                consumed = train_step(core, fetch(), step)
            compiling = False
            if consumed == 0:
                break
            step += 1
            bi += 1
            busy_s += time.perf_counter() - t0
            n_steps_logged += 1

            logged = step % cfg.train.log_every == 0 or step == d.run_steps or bi == d.steps_per_epoch
            if logged:
                # No wait here: this point's values are copied out behind the step and written at the
                # next log point, after the previous point's (whose step the GPU has finished by then).
                snap = core.snapshot_logs()
                flush_log()
                rec = {"kind": "train", "step": step, "epoch": epoch, "wall": wall0 + time.perf_counter() - t_run,
                       "lr": float(core.lr_sched[step - 1]),
                       "images_per_second": n_steps_logged * d.global_batch / max(busy_s, 1e-9),
                       "data_wait": wait_s / max(busy_s, 1e-9), "size": size,
                       "torch_threads": torch.get_num_threads()}
                if cuda:
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                pending.append((rec, snap))
                wait_s, busy_s, n_steps_logged = 0.0, 0.0, 0
            if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                save(epoch, bi, wall0 + time.perf_counter() - t_run)
            if stop_requested(logged):
                end = bi >= d.steps_per_epoch
                save(epoch + 1 if end else epoch, 0 if end else bi, wall0 + time.perf_counter() - t_run)
                log.write(kind="preempted", step=step, signal=preempt.signal_name or "peer rank",
                          checkpoint=str(ckpt_path))
                log.close()
                preempt.uninstall()
                preempt.requeue(rank)
                raise Preempted(f"stopped at step {step} on {preempt.signal_name or 'a signal to another rank'}; "
                                f"checkpoint {ckpt_path}; resume with train.resume=auto (or --resume)")
        done = step >= d.run_steps
        end_of_epoch = bi >= d.steps_per_epoch
        ep_done = epoch + 1 if end_of_epoch else epoch
        if can_eval and cfg.eval.every_epochs and end_of_epoch and ep_done % cfg.eval.every_epochs == 0 \
                and evaluates and not done:
            flush_log()  # the window's train record before the evaluation's
            last_eval = evaluate(cfg.eval.val_subset)
            if last_eval is not None:
                log.write(kind="eval", step=step, epoch=ep_done, wall=wall0 + time.perf_counter() - t_run,
                          **{k: v for k, v in last_eval.items() if k != "protocol"})
        if end_of_epoch and cfg.train.ckpt_every_epochs and ep_done % cfg.train.ckpt_every_epochs == 0:
            save(ep_done, 0, wall0 + time.perf_counter() - t_run)
        if done:
            break  # leave `epoch` at the epoch the run stopped in (the final checkpoint records it)
    flush_log()  # the last log point's record, before the bar closes
    wall = wall0 + time.perf_counter() - t_run
    if bar is not None:
        bar.close()
    end_of_epoch = bi >= d.steps_per_epoch
    save(epoch + 1 if end_of_epoch else epoch, 0 if end_of_epoch else bi, wall)

    summary: dict = {}
    final = (evaluate() if can_eval and cfg.eval.final and evaluates else None) or {}
    if acc.is_main_process:
        if final:
            log.write(kind="eval", step=step, epoch=epoch + 1, wall=wall, **{k: v for k, v in final.items() if k != "protocol"})
        summary = make_summary(cfg, d, totals, final, knn_init, wall, step, bf16, device)
        summary["torch_threads"] = threads
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    preempt.uninstall()
    acc.end_training()
    return summary


def _gather_rng(acc) -> list:
    """Every process's RNG state, in rank order (on every rank)."""
    mine = ckpt_io.rng_state()
    if acc.num_processes == 1:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * acc.num_processes
    dist.all_gather_object(states, mine)
    return states


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
    if summary:
        print_summary(summary, run_dir_for(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
