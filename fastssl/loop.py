"""The small objects the training loop is made of, one job each (dinov2's ``do_train`` manner).

- :class:`RunState`: where the run is (step, epoch, batch in epoch, wall time), saved in checkpoints.
- :class:`LogWindow`: step timing, asynchronous log snapshots, the progress bar and the summary's running means.
- :class:`Checkpointer`: saving the run (after the log is flushed and the loss checked finite) and resuming it.
- :class:`Evaluator`: kNN/RankMe on the eval split, on its schedule, with loaders built once per run.
- :class:`StopSignal`: a pre-emption request (SIGTERM/SIGUSR1), agreed on by every rank.
- :class:`MicroBatches`: the next ``accum_steps`` batches of an epoch, with the host time spent waiting for them.

None of them syncs the host with the device per step: the trainer reads device values only at log
points, one window behind (:class:`LogWindow`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the first bad step, the lr and what to try."""


@dataclass
class RunState:
    """Where the run is. ``wall0`` / ``eval0``: the wall time and the in-training evaluations' time of
    earlier (resumed) segments, up to the checkpoint this one resumed from; ``t0`` this segment's start;
    ``eval_here`` this segment's evaluations so far. A resumed run's summary then counts the whole run."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    wall0: float = 0.0
    eval0: float = 0.0
    knn_init: dict | None = None
    t0: float = field(default_factory=time.perf_counter)
    eval_here: float = 0.0

    def wall(self) -> float:
        return self.wall0 + time.perf_counter() - self.t0

    def eval_seconds(self) -> float:
        return self.eval0 + self.eval_here

    @property
    def resumed(self) -> bool:
        return self.wall0 > 0

    def to_checkpoint(self, epoch: int, batch_in_epoch: int) -> dict:
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "wall_seconds": self.wall(), "eval_seconds": self.eval_seconds(), "knn_init": self.knn_init}

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> "RunState":
        if state is None:
            return cls()
        return cls(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                   wall0=state.get("wall_seconds", 0.0), eval0=state.get("eval_seconds", 0.0),
                   knn_init=state.get("knn_init"))


class MicroBatches:
    """The next ``n`` batches of the epoch's iterator, each fetch timed by ``meter``
    (:class:`fastssl.pipelines.prefetch.DataWaitMeter`: host time in ``next()`` and the step stream's idle time)."""

    def __init__(self, iterator, n: int, meter):
        self.iterator, self.n, self.meter = iterator, n, meter

    def take(self):
        for _ in range(self.n):
            try:
                batch = self.meter.fetch(self.iterator)
            except StopIteration:
                return
            yield batch

    def skip(self, n_batches: int) -> None:
        """Resume mid-epoch: the same batches in the same order, already trained on."""
        for _ in range(n_batches):
            next(self.iterator)


class LogWindow:
    """One log window: steps timed on the host, a device snapshot at each log point, written one point later.

    Reading a log point's values at once would make the host wait for the GPU at every log point;
    instead the record waits in ``pending`` until the next log point (or a save, an evaluation,
    the end), when the GPU has long finished that step.
    """

    SUMMARY_KEYS = ("images_per_second", "data_wait", "data_wait_host", "loss", "linear_top1_online")

    def __init__(self, core, metrics, bar, global_batch: int, cfg, cuda: bool, meter):
        self.core, self.metrics, self.bar, self.meter = core, metrics, bar, meter
        self.global_batch, self.cfg, self.cuda = global_batch, cfg, cuda
        self.busy_s, self.steps = 0.0, 0
        self.pending: list = []  # [(record without the values, LogSnapshot, DataWaitWindow, busy seconds)]
        self.totals: dict[str, list] = {}
        self.last_good_checkpoint: Path | None = None

    def add_step(self, busy_s: float) -> None:
        self.busy_s += busy_s
        self.steps += 1

    def log_point(self, state: RunState, lr: float, size: int) -> None:
        """Snapshot the device values now (no wait); write the previous point's record."""
        snap = self.core.snapshot_logs()
        wait = self.meter.window()  # closes the window's fetch events: no sync
        self.flush()
        busy = max(self.busy_s, 1e-9)
        rec = {"kind": "train", "step": state.step, "epoch": state.epoch, "wall": state.wall(), "lr": lr,
               "images_per_second": self.steps * self.global_batch / busy,
               "size": size, "torch_threads": torch.get_num_threads()}
        if self.cuda:
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.pending.append((rec, snap, wait, busy))
        self.busy_s, self.steps = 0.0, 0

    def flush(self) -> None:
        """Write every pending record (waits only for their copies); a non-finite loss raises."""
        while self.pending:
            rec, snap, wait, busy = self.pending.pop(0)
            vals, bad = self.core.resolve_logs(snap)
            self.check_finite(bad, snap.bad_input)
            # The GPU is past this window's last fetch (its snapshot resolved): reading its events waits for nothing.
            # data_wait: the step stream idle for want of a batch (comparable across back-ends); data_wait_host:
            # host time inside next(). On the CPU they are the same.
            w = wait.resolve()
            rec = {**rec, **vals, "data_wait": w["data_wait_device"] / busy, "data_wait_host": w["data_wait_host"] / busy}
            self.metrics.write(**rec)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}",
                                     img_s=f"{rec['images_per_second']:.0f}", wait=f"{rec['data_wait']:.0%}",
                                     refresh=False)
                self.bar.update(rec["step"] - self.bar.n)
            for k in self.SUMMARY_KEYS:
                if k in rec:
                    self.totals.setdefault(k, []).append(rec[k])

    def check_finite(self, bad: int | None = None, bad_input: int | None = None) -> None:
        bad = self.core.first_bad_step() if bad is None else bad
        if bad < 0:
            return
        bad_input = self.core.first_bad_input_step() if bad_input is None else bad_input
        last = self.last_good_checkpoint
        last = last if last is not None and last.exists() else "none (no checkpoint yet)"
        head = f"non-finite loss at step {bad} (method {self.cfg.method.name}, lr {self.core.lr_sched[bad]:.3g}); stopping. "
        if 0 <= bad_input <= bad:  # the views were bad before the loss was: the data path, not the model
            msg = (head + f"The views fed to step {bad_input} were already not finite: the data path made them "
                   f"(data.backend={self.cfg.data.backend}, data.photometric={self.cfg.data.photometric}), not a "
                   f"diverged model; another back-end or data.photometric=torch narrows it down. "
                   f"The last good checkpoint is {last}.")
        else:
            msg = (head + f"Its input views were finite, so the model diverged. The last good checkpoint is {last}. "
                   f"Try a lower optim.lr, optim.clip_grad=3.0 or train.precision=fp32.")
        self.metrics.write(kind="error", step=bad, message=msg, input_finite=not 0 <= bad_input <= bad)
        raise NonFiniteLoss(msg)

    def mean(self, key: str) -> float | None:
        """Mean over the logged windows, without the first (it holds warm-up and compilation)."""
        v = self.totals.get(key, [])
        v = v[1:] if len(v) > 2 else v
        return float(np.mean(v)) if v else None


class Checkpointer:
    """Saves the run through :class:`fastssl.faults.CheckpointHistory` (atomic, the last ``keep``).

    A write that fails on rank 0 (a full disk: :class:`fastssl.faults.DiskFull`) stops every rank:
    the run does not go on without checkpoints, since the next pre-emption or crash would then lose
    everything since the last one, and the disk that refused the checkpoint also holds metrics.jsonl.
    The previous checkpoint stays whole (atomic write), and the error names it.
    """

    def __init__(self, history, core, acc, window: LogWindow, total_steps: int, config: dict, watchdog=None):
        self.history, self.core, self.acc, self.window = history, core, acc, window
        self.total_steps, self.config = total_steps, config
        self.watchdog = watchdog  # fastssl.faults.Watchdog: a save is no hang
        self.saved_step: int | None = None
        window.last_good_checkpoint = history.last

    @property
    def last(self) -> Path:
        return self.history.last

    def save(self, state: RunState, epoch: int, batch_in_epoch: int) -> None:
        """Every rank calls it (RNG states are gathered; FSDP gathers the shards); rank 0 writes."""
        self.window.flush()
        self.window.check_finite()  # never overwrite the last good checkpoint with a diverged model
        with excused(self.watchdog, "save"):
            rngs = gather_rng(self.acc)
            states = self.core.state_dict()
            failed = None
            if self.acc.is_main_process:
                try:
                    self.history.save({**states, **state.to_checkpoint(epoch, batch_in_epoch),
                                       "total_steps": self.total_steps, "rng": rngs, "config": self.config},
                                      state.step)
                except Exception as e:  # noqa: BLE001 - told to every rank below, then raised
                    failed = e
            self._agree(failed)
        self.saved_step = state.step

    def _agree(self, failed: BaseException | None) -> None:
        """In place of a barrier: every rank learns whether rank 0's write failed, and all stop if it did."""
        from fastssl.faults import DiskFull, last_good_checkpoint

        code = 0 if failed is None else 1 if isinstance(failed, DiskFull) else 2
        if self.acc.num_processes > 1:
            import torch.distributed as dist

            flag = torch.tensor([code], device=self.acc.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if failed is not None:
            raise failed
        if code == 1:
            raise DiskFull(self.history.folder, None, "rank 0's checkpoint",
                           last_good=last_good_checkpoint(self.history.folder.parent))
        if code:
            raise RuntimeError(f"rank 0 failed to write a checkpoint in {self.history.folder} (its own error says why)")

    def save_at(self, state: RunState, epoch: int, bi: int, steps_per_epoch: int) -> None:
        """Save at batch ``bi`` of ``epoch``; a finished epoch is saved as the start of the next one."""
        end = bi >= steps_per_epoch
        self.save(state, epoch + 1 if end else epoch, 0 if end else bi)


def excused(watchdog, phase: str):
    """``watchdog.excused(phase)``, or nothing when there is no watchdog."""
    import contextlib

    return watchdog.excused(phase) if watchdog is not None else contextlib.nullcontext()


def out_of_memory(text: str, cfg, core, saver: Checkpointer, run: RunState, epoch: int, bi: int,
                  steps_per_epoch: int, size: int | None, first: bool, run_dir: Path):
    """After ``torch.OutOfMemoryError`` (its message ``text``) in step ``run.step + 1``: free the failed step's
    memory and, where it is safe, save the state after the last completed step; returns the
    :class:`fastssl.faults.OutOfMemory` to raise. Call it outside the ``except`` block: the exception's
    traceback holds the failed step's activations until that block ends.

    A step that failed before ``opt.step()`` left weights and optimizer state at step ``run.step``
    (BatchNorm running statistics may hold the failed forward; the RNG states have moved on). One process
    saves them unless they are already on disk (the first step of a run or a resumed segment). Nothing is
    written when the step failed inside its update (``core.updating``: the optimizer's temporaries, a
    teacher's EMA), which leaves the state part-updated, nor with several processes: a peer may sit inside a
    collective of the failed step, and the gathers of a save would meet it there. The last good checkpoint
    on disk is named instead.
    """
    import gc

    from fastssl.faults import last_good_checkpoint, oom_message

    device = core.device
    core.opt.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    saved = False
    if not first and not core.updating and core.acc.num_processes == 1 and saver.saved_step != run.step:
        try:
            saver.save_at(run, epoch, bi, steps_per_epoch)
            saved = True
        except Exception as e:  # noqa: BLE001 - the out-of-memory line below is the error to report
            log.warning(f"could not write a checkpoint after running out of memory ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
    checkpoint = last_good_checkpoint(run_dir)  # the step-numbered name of what was just written, if it was
    return oom_message(cfg, run.step + 1, first, size, device, checkpoint, saved, text)


class _NoWatchdog:
    """One process (nothing to wait for) or ``train.collective_timeout=0``: the loop's calls do nothing."""

    on_fire = None

    def beat(self, step: int) -> None:
        pass

    def set_phase(self, phase: str) -> None:
        pass

    def next_step_compiles(self) -> None:
        pass

    def excused(self, phase: str):
        import contextlib

        return contextlib.nullcontext()

    def stop(self) -> None:
        pass


def start_watchdog(cfg, run_dir: Path, rank: int, world: int):
    """A started :class:`fastssl.faults.Watchdog` for a run of several processes, else a do-nothing stand-in."""
    if world < 2 or cfg.train.collective_timeout <= 0:
        return _NoWatchdog()
    from fastssl.faults import Watchdog

    return Watchdog(run_dir, rank, world, cfg.train.collective_timeout, cfg.train.first_step_timeout).start()


def gather_rng(acc) -> list:
    """Every process's RNG state, in rank order (on every rank)."""
    from fastssl import checkpoint as ckpt_io

    mine = ckpt_io.rng_state()
    if acc.num_processes == 1:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * acc.num_processes
    dist.all_gather_object(states, mine)
    return states


class Evaluator:
    """kNN top-1 and RankMe of the backbone (cookbook section 3.7) on ``eval.every_epochs`` and at the end.

    The two eval loaders are built once per run and rewound per evaluation: a new ffcv loader
    JIT-compiles its decoder at its first batch (seconds of CPU), so fresh loaders per evaluation
    made each kNN evaluation many times dearer. Rank 0 evaluates; under FSDP every rank takes part
    (the weights are gathered) and the others get None.
    """

    def __init__(self, cfg, core, make_loader, device, num_classes: int | None, run_dir: Path, is_main: bool):
        self.cfg, self.core, self.make_loader, self.device = cfg, core, make_loader, device
        self.num_classes, self.run_dir = num_classes, run_dir
        self.enabled = bool((cfg.eval.final or cfg.eval.every_epochs) and cfg.data.val and num_classes)
        self.participates = is_main or core.sharded
        self._loaders: list = []
        self.watchdog = None  # fastssl.faults.Watchdog: an evaluation is no hang (its peers wait in the next collective)
        self.seconds = 0.0  # all evaluations of this segment, host wall time

    def due(self, epochs_done: int, end_of_epoch: bool, finished: bool) -> bool:
        every = self.cfg.eval.every_epochs
        return (self.enabled and self.participates and bool(every) and end_of_epoch and not finished
                and epochs_done % every == 0)

    def loaders(self):
        if not self._loaders:
            views = self.cfg.aug.resolved_views()[:1]
            self._loaders = [self.make_loader(split, 256, False, 0, 0, 1, views) for split in ("train", "val")]
        for loader in self._loaders:
            loader.set_epoch(0)  # stops any pass left running; the fixed (unshuffled) order
        return self._loaders

    def run(self, max_val: int = 0, step: int | None = None, full: bool = False) -> dict | None:
        """One evaluation; ``step`` given (the final one) also caches the features for ``fastssl-eval``.
        The final one and ``full`` (the random init's, its baseline) read the whole train split."""
        with excused(self.watchdog, "eval"):
            return self._run(max_val, step, full)

    def _run(self, max_val: int = 0, step: int | None = None, full: bool = False) -> dict | None:
        from fastssl.evaluation.online import evaluate_knn

        method = self.core.eval_method()
        if method is None:
            return None
        t = time.perf_counter()
        kwargs = {"cache_dir": self.run_dir, "step": step} if step is not None else {}
        train_loader, val_loader = self.loaders()
        # The final evaluation (step given) is the run's figure and feeds fastssl-eval: the whole split.
        # In training: every eval.knn_stride-th train image, and eval.val_subset val images spread over
        # the split (a sorted folder's first N would be its first classes); the loader stops at N.
        k_train = 1 if full or step is not None else max(1, int(self.cfg.eval.knn_stride))
        k_val = max(1, val_loader.num_samples // max_val) if max_val else 1
        for loader, k in ((train_loader, k_train), (val_loader, k_val)):
            loader.set_stride(k if loader.can_stride else 1)
        out = evaluate_knn(method, train_loader, val_loader, self.cfg, self.device, self.num_classes, max_val, **kwargs)
        spent = time.perf_counter() - t
        self.seconds += spent
        out.setdefault("eval_seconds", spent)
        return out


class StopSignal:
    """A pre-emption request. One process: the handler's flag, read every step (no sync). Several: ranks
    may get the signal at different steps, so they agree at log points (one small all-reduce there)."""

    def __init__(self, preemption, world: int, device):
        self.preemption, self.world, self.device = preemption, world, device

    def requested(self, at_log_point: bool) -> bool:
        if self.world == 1:
            return self.preemption.requested
        if not at_log_point:
            return False
        import torch.distributed as dist

        flag = torch.tensor([int(self.preemption.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
