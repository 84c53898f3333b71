"""Know a run's cost before paying it: time a few warm steps per resolution phase and project the whole run.

``fastssl-timed --estimate`` (and every ``fastssl-timed`` run, before it trains) builds the
recipe's real loader and training core on the present device, then, for each resolution of the
progressive schedule (``train.res_start`` -> ``aug.global_size``):

- the first step at that size (it compiles, and its loader starts an epoch);
- after ``warm`` more, ``timed`` end-to-end steps through the live loader (data and step together,
  as training runs);
- ``timed`` steps on one fixed batch (the model alone: the limit the step sets);
- ``timed`` batches from the loader with no step (the data alone).

The phase's projected time is its steps x the end-to-end step time, plus per epoch the loader's
epoch start, plus once the first step's extra when the step is compiled (the run compiles again). What limits a phase is whichever of
data or model is slower. Evaluations are projected from a timed feature extraction (images/s of
the eval loader through the backbone) and a kNN on a bank sampled to the run's size ratio.
Device time is read with a synchronize at the end of each timed stretch, never per step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One resolution of the progressive schedule. Times in seconds."""

    size: int
    first_epoch: int
    epochs: int
    steps: int                 # optimizer steps the run takes at this size
    step_s: float = 0.0        # end to end, through the live loader
    model_step_s: float = 0.0  # one fixed batch: the step alone
    data_step_s: float = 0.0   # the loader alone (accum_steps batches)
    first_step_s: float = 0.0  # the phase's first step: epoch start + compilation
    epoch_start_s: float = 0.0  # set_epoch to the first batch, the loader warm
    projected_s: float = 0.0

    @property
    def limit(self) -> str:
        return "data" if self.data_step_s > self.model_step_s else "model"


@dataclass
class Estimate:
    device: str
    phases: list[Phase] = field(default_factory=list)
    prepare_s: float = 0.0
    eval_each_s: float = 0.0      # one in-training kNN evaluation (every eval.knn_stride-th train image + val)
    evals_in_training: int = 0    # every eval.every_epochs epochs
    eval_stride: int = 1          # eval.knn_stride
    init_eval_s: float = 0.0      # the random init's kNN (the whole split: the final figure's baseline)
    final_eval_s: float = 0.0     # the whole split
    linear_eval_s: float = 0.0    # the papers' linear protocol afterwards (frozen backbone, 90 epochs)
    linear_epochs: int = 0
    measured_s: float = 0.0       # what the estimate itself took

    @property
    def train_s(self) -> float:
        return sum(p.projected_s for p in self.phases)

    @property
    def model_alone_s(self) -> float:
        """Every step of the run on a fixed batch (the model's own time): what a free data path would leave.
        ``train_s`` minus this is what the data path costs the run, latency and shared device alike."""
        return sum(p.steps * p.model_step_s for p in self.phases)

    @property
    def total_s(self) -> float:
        """Prepare, training with its evaluations and the final kNN; the linear protocol is reported apart."""
        return self.prepare_s + self.train_s + self.eval_in_training_s + self.final_eval_s

    @property
    def eval_in_training_s(self) -> float:
        """The evaluations between the first step and the last: at init and every eval.every_epochs."""
        return self.init_eval_s + self.eval_each_s * self.evals_in_training

    def to_dict(self) -> dict:
        d = asdict(self)
        for p, ph in zip(d["phases"], self.phases):
            p["limit"] = ph.limit
        d.update(train_s=self.train_s, model_alone_s=self.model_alone_s, total_s=self.total_s,
                 eval_in_training_s=self.eval_in_training_s,
                 eval_fraction=self.eval_in_training_s / max(self.train_s, 1e-9))
        return d

    def lines(self) -> list[str]:
        """The projection as lines a user reads: each phase, what limits it, evaluations, the total."""
        out = [f"projected wall time on {self.device}:"]
        if self.prepare_s:
            out.append(f"  prepare             {_hms(self.prepare_s)}")
        for p in self.phases:
            out.append(f"  train {p.size:>4} px      {_hms(p.projected_s)}  ({p.epochs} epochs, {p.steps} steps at "
                       f"{p.step_s * 1e3:.0f} ms; model {p.model_step_s * 1e3:.0f} ms, data {p.data_step_s * 1e3:.0f} ms:"
                       f" {p.limit}-bound)")
        if self.phases:
            out.append(f"  (model alone        {_hms(self.model_alone_s)}: the same steps on a fixed batch; the data "
                       f"path costs the rest, {_hms(max(self.train_s - self.model_alone_s, 0.0))})")
        if self.eval_in_training_s:
            share = self.eval_in_training_s / max(self.train_s, 1e-9)
            bank = f", 1 in {self.eval_stride} train images" if self.eval_stride > 1 else ""
            out.append(f"  evaluations         {_hms(self.eval_in_training_s)}  (init {_hms(self.init_eval_s)} + "
                       f"{self.evals_in_training} x {_hms(self.eval_each_s)}{bank}; {share:.1%} of training)")
        if self.final_eval_s:
            out.append(f"  final evaluation    {_hms(self.final_eval_s)}")
        out.append(f"  total               {_hms(self.total_s)}")
        if self.linear_eval_s:
            out.append(f"  then, linear eval   {_hms(self.linear_eval_s)}  (the papers' protocol: {self.linear_epochs} "
                       f"epochs of the frozen backbone over the train split; not in the total)")
        return out


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def phases_of(cfg) -> list[Phase]:
    """The progressive schedule as phases of equal size (``fastssl.schedules.progressive_size``)."""
    from fastssl.schedules import progressive_size

    out: list[Phase] = []
    for epoch in range(cfg.train.epochs):
        size = progressive_size(epoch, cfg.train.epochs, cfg.train.res_start, cfg.aug.global_size,
                                cfg.train.res_end_epoch, cfg.train.res_step)
        if out and out[-1].size == size:
            out[-1].epochs += 1
        else:
            out.append(Phase(size=size, first_epoch=epoch, epochs=1, steps=0))
    return out


class _Clock:
    """Host time of stretches of device work: synchronize before reading (only at a stretch's ends)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def estimate(cfg, timed: int = 3, eval_batches: int = 2, prepare_s: float = 0.0, warm: int = 2,
             n_train: int | None = None, n_val: int | None = None, linear_epochs: int = 0) -> Estimate:
    """Time the recipe on the present device and project the run (see the module docstring).

    ``timed``: steps per measurement, after ``warm`` untimed ones past each phase's first step (a
    loader's workers start with empty queues; the epoch's start is timed apart); ``prepare_s``: the
    projected cost of writing the data first.
    ``n_train``/``n_val``: the full run's image counts when ``cfg.data`` points at a sample of it
    (default: the sizes of ``cfg.data``). ``linear_epochs``: project the papers' linear protocol too
    (that many passes of the frozen backbone's forward over the train split, at the timed eval rate). The core and loader are throwaways: no run directory, no checkpoint.
    """
    from fastssl.config import derive
    from fastssl.engine import TrainCore, make_accelerator, train_step, use_bf16
    from fastssl.rundir import cpu_threads, pick_device
    from fastssl.train import LoaderFactory

    t_start = time.perf_counter()
    device = pick_device(cfg)
    bf16 = use_bf16(cfg, device)
    acc = make_accelerator(cfg, device)
    device = acc.device
    threads = cpu_threads(1) if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    make_loader = LoaderFactory(cfg, device, bf16, threads)
    views = cfg.aug.resolved_views()
    derived = derive(cfg, n_train or make_loader("train", 2, True, cfg.train.seed, 0, 1, views).num_samples, 1)
    loader = make_loader("train", derived.micro_batch, True, cfg.train.seed, 0, 1, views)
    core = TrainCore(cfg, derived, acc, loader.num_classes)
    core.model.train()
    clock = _Clock(device)
    accum = cfg.optim.accum_steps
    result = Estimate(device=_device_name(device), prepare_s=prepare_s)
    steps_left = derived.run_steps
    for phase in phases_of(cfg):
        phase.steps = min(phase.epochs * derived.steps_per_epoch, steps_left)
        steps_left -= phase.steps
        if phase.steps == 0:
            continue
        feed = _Feed(loader, phase, cfg, accum)
        t = clock.now()
        feed.restart()
        train_step(core, feed.take(), 0)
        phase.first_step_s = clock.now() - t
        for _ in range(warm):  # the loader's workers fill their queues: time the steady state
            train_step(core, feed.take(), 0)
        t = clock.now()
        for _ in range(timed):
            train_step(core, feed.take(), 0)
        phase.step_s = (clock.now() - t) / timed
        fixed = feed.take()
        t = clock.now()
        for _ in range(timed):
            train_step(core, fixed, 0)
        phase.model_step_s = (clock.now() - t) / timed
        t = clock.now()
        for _ in range(timed):
            feed.take()
        phase.data_step_s = (clock.now() - t) / timed
        # An epoch's start once the loader is warm (the first one above also compiled ffcv's decoder,
        # which numba caches on disk for every later process).
        t = clock.now()
        feed.restart()
        feed.take()
        phase.epoch_start_s = clock.now() - t
        epochs_run = -(-phase.steps // max(derived.steps_per_epoch, 1))
        # The first step's extra is compilation, paid again by the run; an eager CPU run's extra is the
        # per-shape weight-gradient timing, which the run reads from the machine's cache instead.
        compile_s = max(phase.first_step_s - phase.step_s, 0.0) if core.compiled else 0.0
        phase.projected_s = phase.steps * phase.step_s + epochs_run * phase.epoch_start_s + compile_s
        result.phases.append(phase)
    core.reset_logs()
    evaluates = bool((cfg.eval.final or cfg.eval.every_epochs) and cfg.data.val and loader.num_classes)
    if evaluates:
        every = cfg.eval.every_epochs
        result.evals_in_training = len([e for e in range(1, cfg.train.epochs) if every and e % every == 0])
        per_image, bank, labels, n_train, n_val = _time_eval(core, make_loader, views, clock, eval_batches, n_train,
                                                             n_val)
        k = result.eval_stride = max(1, int(cfg.eval.knn_stride))
        n_val_in = min(n_val, cfg.eval.val_subset) if cfg.eval.val_subset else n_val

        def one(n_bank: int, n_query: int) -> float:
            return per_image * (n_bank + n_query) + _time_knn(bank, labels, n_bank, n_query, cfg, clock)

        full = one(n_train, n_val)
        result.eval_each_s = one(-(-n_train // k), n_val_in) if result.evals_in_training else 0.0
        result.init_eval_s = result.final_eval_s = full if cfg.eval.final else 0.0
        if linear_epochs:
            result.linear_epochs = linear_epochs
            result.linear_eval_s = per_image * (n_train or loader.num_samples) * linear_epochs
    result.measured_s = time.perf_counter() - t_start
    acc.end_training()
    return result


class _Feed:
    """The loader's batches, ``accum`` at a time, restarting the phase's epoch when it runs out."""

    def __init__(self, loader, phase: Phase, cfg, accum: int):
        self.loader, self.phase, self.cfg, self.accum = loader, phase, cfg, accum
        self.it = None

    def restart(self) -> None:
        self.loader.set_epoch(self.phase.first_epoch, global_size=self.phase.size if self.cfg.train.res_start else None)
        self.it = iter(self.loader)

    def take(self) -> list:
        out = []
        while len(out) < self.accum:
            try:
                out.append(next(self.it))
            except StopIteration:
                self.restart()
        return out


def _time_eval(core, make_loader, views, clock: _Clock, batches: int, n_train: int | None = None,
               n_val: int | None = None):
    """The evaluation's feature extraction, timed over ``batches`` batches of the eval loader.

    Returns (seconds per image, the timed features (bank for ``_time_knn``), their labels, n_train, n_val):
    the split sizes default to the eval loaders'."""
    from fastssl.compile import eager

    train_loader = make_loader("train", 256, False, 0, 0, 1, views[:1])
    val_loader = make_loader("val", 256, False, 0, 0, 1, views[:1])
    n_train, n_val = n_train or train_loader.num_samples, n_val or val_loader.num_samples
    method = core.eval_method()
    was = method.training
    method.eval()
    feats, labels, seen = [], [], 0
    with torch.no_grad(), eager(method.backbone):
        it = iter(train_loader)
        first = next(it)  # the loader's start and the first (eager) batch: not the rate
        _embed(method, first)
        t = clock.now()
        for _ in range(batches):
            try:
                b = next(it)
            except StopIteration:
                break
            feats.append(_embed(method, b))
            labels.append(b.labels)
            seen += b.views[0].shape[0]
        if seen == 0:  # a set of one batch: time that one
            t = clock.now()
            feats.append(_embed(method, first))
            labels.append(first.labels)
            seen = first.views[0].shape[0]
        per_image = (clock.now() - t) / seen
    method.train(was)
    return per_image, torch.cat(feats), torch.cat(labels), n_train, n_val


def _time_knn(bank: torch.Tensor, labels: torch.Tensor, n_train: int, n_val: int, cfg, clock: _Clock) -> float:
    """The run's kNN (``n_val`` queries against ``n_train`` features), projected from its own blocks.

    ``knn_scores`` works in blocks of the plan its memory budget gives (``knn_plan``): the cost is
    the number of full blocks times one block's. Timing a small kNN and scaling it by its size
    counts its fixed costs (launches, the vote) thousands of times over, so this times two full
    blocks of the run's plan, on the timed features repeated to fill them, after a warm one.
    """
    from fastssl.evaluation import KNN_BUDGET_BYTES, knn_plan, knn_scores

    dev = bank.device
    if dev.type != "cuda" or bank.dtype not in (torch.bfloat16, torch.float16):
        bank = bank.float()  # the bank's dtype in the run (extract_features): bf16/fp16 only on CUDA
    dim, k = bank.shape[1], cfg.eval.knn_k
    budget = KNN_BUDGET_BYTES.get(dev.type, KNN_BUDGET_BYTES["cpu"])
    copy = 4 if bank.dtype != torch.float32 else 0
    plan = knn_plan(n_val, n_train, dim, k, budget, copy_bytes=copy)
    blocks = -(-n_val // plan.chunk_test) * -(-n_train // plan.chunk_train)
    rows_train, rows_test = min(n_train, 2 * plan.chunk_train), min(n_val, plan.chunk_test)
    timed_blocks = -(-rows_test // plan.chunk_test) * -(-rows_train // plan.chunk_train)
    reps = -(-rows_train // max(len(bank), 1))
    train = bank.repeat(reps, 1)[:rows_train]
    train_labels = labels.to(dev).repeat(reps)[:rows_train].clamp_min(0)
    test = bank.repeat(-(-rows_test // len(bank)), 1)[:rows_test]
    classes = int(train_labels.max()) + 1
    run = lambda tr: knn_scores(tr, train_labels[:len(tr)], test, classes, k,  # noqa: E731
                                cfg.eval.knn_temperature, budget_bytes=budget).sum().item()
    run(train[:plan.chunk_train])  # warm: the first launches and allocations are not the rate
    t = clock.now()
    run(train)
    return (clock.now() - t) / timed_blocks * blocks


def _embed(method, batch) -> torch.Tensor:
    x = batch.views[0]
    low = x.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(x.device.type, dtype=x.dtype if low else torch.bfloat16, enabled=low):
        return method.embed(x)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
