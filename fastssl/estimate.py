"""Know a run's cost before paying it: time a few warm steps per resolution phase and project the whole run.

``fastssl-timed --estimate`` (and every ``fastssl-timed`` run, before it trains) builds the
recipe's real loader and training core on the present device, then, for each resolution of the
progressive schedule (``train.res_start`` -> ``aug.global_size``):

- the first step at that size (it compiles, and its loader starts an epoch);
- after ``warm`` more, ``timed`` end-to-end steps through the live loader (data and step together,
  as training runs);
- ``timed`` steps on one fixed batch (the model alone: the limit the step sets);
- the epoch restarted (its start timed), then ``timed`` batches from the loader with no step (the data
  alone). The restart empties the loader's queues: batches it decoded ahead while the model was timed
  would otherwise read back at no cost, and every phase would look model-bound.

The phase's projected time is its steps x the end-to-end step time, plus per epoch the loader's
epoch start, plus once the first step's extra when the step is compiled (the run compiles again). What limits a phase is whichever of
data or model is slower. Evaluations are projected the same way: seconds per image of the backbone's
forward on one fixed batch (the model alone) and of the eval loader read with no forward from a
fresh epoch (the data alone); the slower one is the extraction's rate, plus a kNN timed on full
blocks of the run's plan. The papers' linear protocol reads the train split through random resized
crops, shuffled: its data rate is timed on that loader, not on the centre-crop one.
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
    eval_model_s: float = 0.0     # per image: the backbone's forward on one fixed batch (the model alone)
    eval_data_s: float = 0.0      # per image: the eval loader (centre crops, in order) with no forward
    linear_data_s: float = 0.0    # per image: the linear protocol's loader (random resized crops, shuffled)
    measured_s: float = 0.0       # what the estimate itself took

    @property
    def eval_limit(self) -> str:
        """What bounds the evaluations' feature extraction: ``data`` or ``model``."""
        return "data" if self.eval_data_s > self.eval_model_s else "model"

    @property
    def linear_limit(self) -> str:
        """What bounds the linear protocol's passes over the train split: ``data`` or ``model``."""
        return "data" if self.linear_data_s > self.eval_model_s else "model"

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
        if self.eval_model_s:
            d["eval_limit"] = self.eval_limit
        if self.linear_eval_s:
            d["linear_limit"] = self.linear_limit
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
        if self.eval_model_s and (self.eval_in_training_s or self.final_eval_s):
            out.append(f"  (features: model {_ips(self.eval_model_s)}, data {_ips(self.eval_data_s)}"
                       f" (centre crops): {self.eval_limit}-bound)")
        out.append(f"  total               {_hms(self.total_s)}")
        if self.linear_eval_s:
            out.append(f"  then, linear eval   {_hms(self.linear_eval_s)}  (the papers' protocol: {self.linear_epochs} "
                       f"epochs of the frozen backbone over the train split; model {_ips(self.eval_model_s)}, data "
                       f"{_ips(self.linear_data_s)} (random resized crops): {self.linear_limit}-bound; not in the total)")
        return out


def _ips(per_image_s: float) -> str:
    return f"{1.0 / per_image_s:,.0f} img/s" if per_image_s > 0 else "- img/s"


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
    (that many passes of the frozen backbone's forward over the train split, each image at the slower of
    the forward and the protocol's own train-mode loader). ``eval_batches``: forwards timed on one fixed
    batch; the loaders are read for ``eval_batches + 2`` batches (workers that start together deliver
    their first batches at once). The core and loaders are throwaways: no run directory, no checkpoint.
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
        # An epoch's start once the loader is warm (the first one above also compiled ffcv's decoder,
        # which numba caches on disk for every later process), then the data alone from its emptied queues.
        phase.epoch_start_s, reads_s, _, reads = _time_reads(feed.restart, feed.take, timed, clock)
        phase.data_step_s = reads_s / max(reads, 1)
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
        ev = _time_eval(core, make_loader, views, clock, eval_batches, n_train, n_val,
                        linear_loader=_linear_loader(cfg, device, threads) if linear_epochs else None)
        bank, labels, n_train, n_val = ev.bank, ev.labels, ev.n_train, ev.n_val
        result.eval_model_s, result.eval_data_s, result.linear_data_s = ev.model_s, ev.data_s, ev.linear_data_s
        per_image = ev.per_image
        k = result.eval_stride = max(1, int(cfg.eval.knn_stride))
        n_val_in = min(n_val, cfg.eval.val_subset) if cfg.eval.val_subset else n_val

        def one(n_bank: int, n_query: int) -> float:
            return per_image * (n_bank + n_query) + _time_knn(bank, labels, n_bank, n_query, cfg, clock)

        full = one(n_train, n_val)
        result.eval_each_s = one(-(-n_train // k), n_val_in) if result.evals_in_training else 0.0
        result.init_eval_s = result.final_eval_s = full if cfg.eval.final else 0.0
        if linear_epochs:
            result.linear_epochs = linear_epochs
            result.linear_eval_s = ev.linear_per_image * n_train * linear_epochs
    result.measured_s = time.perf_counter() - t_start
    acc.end_training()
    return result


# Batches from an epoch's end inside which a timed read is not the loader's rate: there the loader has
# already decoded what it works ahead, and hands it over at no cost.
_END_WINDOW = 6


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


def _len(loader) -> int | None:
    """Batches per epoch; None for a loader that cannot say (a stream)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _time_reads(restart, take, reads: int, clock: _Clock, size=lambda got: 1) -> tuple[float, float, int, int]:
    """The data path alone, free of the batches a loader decoded ahead while something else was timed.

    ``restart()`` starts an epoch (its queues empty), ``take()`` reads the next item (``None`` at the
    epoch's end), ``size(item)``: what it counts (images; default 1, a step's batches). The first take is
    the epoch's start; then ``reads`` more are timed with no work between them, so each costs what the
    loader takes to make it. Returns (start s, seconds of the timed reads, size of the first, size read
    after it: 0 when the epoch held a single item).
    """
    t = clock.now()
    restart()
    got = take()
    start_s = clock.now() - t
    first = size(got) if got is not None else 0
    n = 0
    t = clock.now()
    for _ in range(reads if got is not None else 0):
        got = take()
        if got is None:
            break
        n += size(got)
    return start_s, clock.now() - t, first, n


class _Epoch:
    """One loader's epoch 0 from its start, a batch at a time: ``take()`` is ``None`` at its end."""

    def __init__(self, loader):
        self.loader, self.it = loader, None

    def restart(self) -> None:
        self.loader.set_epoch(0)
        self.it = iter(self.loader)

    def take(self):
        return next(self.it, None)


def _images(batch) -> int:
    return int(batch.views[0].shape[0])


def _data_per_image(loader, reads: int, clock: _Clock) -> tuple[float, object]:
    """Seconds per image of ``loader`` read alone (:func:`_time_reads`), and its largest batch read.

    An epoch longer than the window: ``reads`` batches inside it, from a fresh start. A shorter one is
    read whole, twice (the first compiles the decoder), the second timed with its start: near its end
    the window would count batches the loader finished while handing over the one before (it works a
    batch ahead), and a short epoch is what each evaluation of such a split pays, start and all.
    """
    ep = _Epoch(loader)
    held = []

    def take():
        b = ep.take()
        if b is not None and (not held or _images(b) > _images(held[0])):
            held[:] = [b]
        return b

    size = _len(loader)
    if size is None or size > reads + _END_WINDOW:
        _, reads_s, first, n = _time_reads(ep.restart, take, reads, clock, _images)
        if n:
            return reads_s / n, held[0]
    for _ in range(2):
        start_s, reads_s, first, n = _time_reads(ep.restart, take, size or 0, clock, _images)
    if not first:
        raise ValueError(f"the evaluation's loader of {getattr(loader, 'path', 'the split')} yields no batch")
    return (start_s + reads_s) / (first + n), held[0]


@dataclass
class _EvalTiming:
    model_s: float          # per image: the forward on one fixed batch
    data_s: float           # per image: the eval loader alone
    linear_data_s: float    # per image: the linear protocol's loader alone (0: not timed)
    bank: torch.Tensor      # the timed features, for _time_knn
    labels: torch.Tensor
    n_train: int
    n_val: int

    @property
    def per_image(self) -> float:
        """The extraction's rate: the loader and the forward overlap, the slower one sets it."""
        return max(self.model_s, self.data_s)

    @property
    def linear_per_image(self) -> float:
        return max(self.model_s, self.linear_data_s or self.data_s)


def _time_eval(core, make_loader, views, clock: _Clock, batches: int, n_train: int | None = None,
               n_val: int | None = None, linear_loader=None) -> _EvalTiming:
    """The evaluation's feature extraction: the model alone and the data alone, per image.

    The data: the eval loader read from a fresh epoch with no forward (:func:`_time_reads`, ``batches + 2``
    batches after the first). The model: ``batches`` forwards of one batch it read, after an untimed
    (eager, cold) one. Timing forwards on the loader's next batches instead reads back the ones it
    decoded during the cold forward, at the model's rate however slow the decode. ``linear_loader``: the
    linear protocol's train-mode loader, its data timed the same way. The split sizes default to the
    eval loaders'.
    """
    from fastssl.compile import eager

    train_loader = make_loader("train", 256, False, 0, 0, 1, views[:1])
    val_loader = make_loader("val", 256, False, 0, 0, 1, views[:1])
    n_train, n_val = n_train or train_loader.num_samples, n_val or val_loader.num_samples
    method = core.eval_method()
    was = method.training
    method.eval()
    reads = max(1, batches) + 2
    # The data first, on the fresh loader; then the forwards on its largest batch, the loader left as it is.
    data_s, batch = _data_per_image(train_loader, reads, clock)
    linear_s = _data_per_image(linear_loader, reads, clock)[0] if linear_loader is not None else 0.0
    with torch.no_grad(), eager(method.backbone):
        labels = batch.labels if batch.labels is not None else torch.zeros(_images(batch), dtype=torch.long)
        feats = _embed(method, batch)  # the first (eager, cold) forward: not the rate
        t = clock.now()
        for _ in range(max(1, batches)):
            feats = _embed(method, batch)
        model_s = (clock.now() - t) / (max(1, batches) * _images(batch))
    method.train(was)
    return _EvalTiming(model_s, data_s, linear_s, feats, labels, n_train, n_val)


def _linear_loader(cfg, device: torch.device, threads: int):
    """The loader the papers' linear protocol reads (:func:`fastssl.evaluation.linear.protocol_loader`)."""
    from fastssl.evaluation.linear import SIMCLR_LINEAR, protocol_loader

    loader = protocol_loader(cfg, "train", SIMCLR_LINEAR["batch_size"], device)
    torch.set_num_threads(threads)  # a loader library may change it (ffcv's import sets 1)
    return loader


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
