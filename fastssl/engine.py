"""The training core: one object that owns what an optimizer step needs, and the step itself.

``TrainCore`` holds the method (compiled in place, wrapped by accelerate), the optimizer,
the precomputed schedules, the online probe and the device-side log accumulators;
:func:`train_step` is one optimizer step. The trainer (``fastssl/train.py``), ``fastssl-bench
step`` and the GPU benchmarks all run this same step, so a benchmark measures what training runs.

One optimizer step: ``accum_steps`` micro-batches (views already normalised on the device) ->
``method(views, step)`` under autocast -> backward -> clip -> ``before_optimizer_step`` ->
optimizer step at the step's lr/wd -> ``method.after_step(step)`` (EMA, centres, queues: once
per optimizer step) -> online probe on detached features. No host sync: losses, log terms and
probe hits accumulate on the device; :meth:`TrainCore.snapshot_logs` copies them out (no wait) when the
trainer logs, and a non-finite loss is flagged on the device with the first bad step.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterable

import torch

from fastssl import fault_injection
from fastssl.config import Config, Derived
from fastssl.schedules import cosine

logger = logging.getLogger(__name__)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """``train.precision``: bf16 autocast on CUDA by default (section 3.8.2), fp32 on the CPU unless asked."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def use_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")


@dataclass
class LogSnapshot:
    """A log read in flight (:meth:`TrainCore.snapshot_logs`): host (K + 5,) fp64 =
    [loss sum, K term sums, probe hits, probe count, first non-finite step, first step fed non-finite
    views], ready after ``event``; ``bad_input`` is the last one once resolved."""

    keys: list
    n: int
    host: torch.Tensor
    event: object
    probe: bool
    bad_input: int = -1


class TrainCore:
    """Method + optimizer + schedules + probe on one device, prepared by ``acc`` (an ``accelerate.Accelerator``).

    ``d`` is the run's :class:`~fastssl.config.Derived` (steps, scaled lr); ``num_classes`` enables the
    online probe (``eval.online_probe``) when the data is labelled.
    """

    def __init__(self, cfg: Config, d: Derived, acc, num_classes: int | None = None, log=None):
        from fastssl.hostmem import apply_host_alloc
        from fastssl.methods import create_method
        from fastssl.optim import build_optimizer

        self.cfg, self.d, self.acc = cfg, d, acc
        self.device = acc.device
        self.bf16 = use_bf16(cfg, self.device)
        self.compiled = use_compile(cfg, self.device)
        if self.device.type == "cuda":  # a process-wide flag: the trainer's setting is the run's (and a variant's)
            torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
        # train.strategy=fsdp (fastssl/fsdp.py): sharded over the processes; one process has nothing to shard.
        self.sharded = cfg.train.strategy == "fsdp" and acc.num_processes > 1
        # Before the first step allocates its activations (fastssl/hostmem.py): on the CPU, a step that
        # page-faults its freed activations back in each time spends ~1/6 of its time in the kernel.
        self.host_alloc = apply_host_alloc(cfg.train.host_alloc, self.device)
        method = create_method(cfg, d.total_steps).to(self.device)
        for transform in MODEL_TRANSFORMS:  # in this order; each returns the (possibly new) module
            method = transform(self, method, log)
        opt = build_optimizer(method, cfg.optim, d.lr)
        # Schedules are pure functions of the step, precomputed (numpy arrays indexed by step).
        self.lr_sched = cosine(d.lr, d.lr * cfg.optim.min_lr_ratio, d.total_steps, d.warmup_steps)
        wd_end = cfg.optim.weight_decay_end if cfg.optim.weight_decay_end >= 0 else cfg.optim.weight_decay
        self.wd_sched = cosine(cfg.optim.weight_decay, wd_end, d.total_steps)
        self.probe = None
        if cfg.eval.online_probe and num_classes:
            from fastssl.evaluation import OnlineLinearProbe

            self.probe = OnlineLinearProbe(method.feat_dim, num_classes, lr=cfg.eval.probe_lr).to(self.device)
        if self.sharded:
            self.model, self.opt = method, acc.prepare(opt)  # FSDP in place of DDP: no wrapper
        else:
            ddp_skip_queues(method)
            self.model, self.opt = acc.prepare(method, opt)
        self.method = acc.unwrap_model(self.model)
        from fastssl.optim import update_path

        # A single-tensor LARS is about ten kernel launches per parameter each step (an old timm): say which.
        path = update_path(self.opt)
        logger.info("optimizer %s: %s update", cfg.optim.name, path)
        if self.device.type == "cuda" and cfg.optim.name == "lars" and path == "single-tensor" and acc.is_main_process:
            import timm

            logger.warning(f"timm {timm.__version__}'s LARS loops over the parameters (about ten kernel launches each, "
                           f"every step); timm >= 1.0.31 updates them in a few multi-tensor kernels: "
                           f"pip install 'timm>=1.0.31'")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.before_opt = getattr(self.method, "before_optimizer_step", None)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        # First step whose input views were not finite: tells a data-path fault from a diverged model.
        self.first_bad_input = torch.full((), -1, dtype=torch.long, device=self.device)
        self.updating = False  # inside the update of train_step (see there)
        self.reset_logs()

    # ------------------------------------------------------------------ logs (device side)

    def reset_logs(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.log_sums: dict[str, torch.Tensor] = {}
        self.probe_correct = torch.zeros((), device=self.device)
        self.probe_seen = torch.zeros((), device=self.device)  # labelled rows: a device count (unlabelled ones are -1)
        self.n_micro = 0

    def snapshot_logs(self) -> "LogSnapshot":
        """Start reading the means since the last read, without waiting for the device; then reset.

        The values (and the first non-finite step) are copied to pinned host memory behind the
        step's work on the stream; :meth:`resolve_logs` reads them. The trainer resolves a
        snapshot at the next log point, so the host stays one window ahead of the GPU instead of
        waiting for it (cookbook-scale runs log every step in benchmarks: a sync per step would
        serialise the next batch's decode behind the step). Several ranks: one all-reduce,
        enqueued like the step's collectives; each rank's loss is the mean over its own anchors, and
        the mean over ranks is the loss of the global batch, what one process with that batch logs.
        """
        n = max(self.n_micro, 1)
        keys = sorted(self.log_sums)
        # One vector: [loss, log terms..., probe hits, probe count] -> one all-reduce.
        vec = torch.stack([self.loss_sum.float()] + [self.log_sums[k].float() for k in keys]
                          + [self.probe_correct.float(), self.probe_seen.float()])
        world = self.acc.num_processes
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(vec)
            vec[: 1 + len(keys)] /= world
        vec = torch.cat([vec.double(), self.first_bad.double().view(1),
                         self.first_bad_input.double().view(1)])  # (K + 5,); steps exact in fp64
        event = None
        if vec.is_cuda:
            host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = vec
        snap = LogSnapshot(keys, n, host, event, self.probe is not None)
        self.reset_logs()
        return snap

    @staticmethod
    def resolve_logs(snap: "LogSnapshot") -> tuple[dict, int]:
        """``(means, first non-finite step or -1)`` of a snapshot; waits for its copy (only)."""
        if snap.event is not None:
            snap.event.synchronize()
        vals = snap.host.tolist()
        keys, n = snap.keys, snap.n
        out = {"loss": vals[0] / n}
        out.update({k: v / n for k, v in zip(keys, vals[1:1 + len(keys)])})
        if snap.probe and vals[-3]:
            out["linear_top1_online"] = 100.0 * vals[-4] / vals[-3]
        snap.bad_input = int(vals[-1])
        return out, int(vals[-2])

    def first_bad_step(self) -> int:
        """The first step whose loss was not finite, or -1 (a host sync)."""
        return int(self.first_bad)

    def first_bad_input_step(self) -> int:
        """The first step fed non-finite views, or -1 (a host sync)."""
        return int(self.first_bad_input)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Method, optimizer and probe states, in the one-process format (FSDP: gathered, a collective; full on
        rank 0, whose dict is the one written)."""
        if self.sharded:
            from fastssl.fsdp import full_state

            method, opt = full_state(self.method, self.opt.optimizer)
        else:
            method, opt = self.method.state_dict(), self.opt.state_dict()
        return {"method": method, "optimizer": opt,
                "probe": self.probe.state_dict() if self.probe is not None else None}

    def load_state_dict(self, state: dict) -> None:
        from fastssl.compile import clean_state_dict

        if self.sharded:  # each process keeps its shards of the full state (any strategy wrote it)
            from fastssl.fsdp import load_full_state

            load_full_state(self.method, self.opt.optimizer, state["method"], state["optimizer"])
        else:
            self.method.load_state_dict(clean_state_dict(state["method"]))  # old checkpoints: `_orig_mod.` keys
            self.opt.load_state_dict(state["optimizer"])
        if self.probe is not None and state.get("probe"):
            self.probe.load_state_dict(state["probe"])

    def eval_method(self):
        """The method to evaluate: itself, or under FSDP a whole copy on rank 0 (None elsewhere).

        Under FSDP every process calls it (the weights are gathered); rank 0 alone then evaluates.
        """
        if not self.sharded:
            return self.method
        from fastssl.fsdp import full_model_state
        from fastssl.methods import create_method

        sd = full_model_state(self.method)
        if not self.acc.is_main_process:
            return None
        whole = create_method(self.cfg, self.d.total_steps)
        whole.load_state_dict(sd)
        return whole.to(self.device).train(self.method.training)


# ---------------------------------------------------------------------- model transforms
# TrainCore applies these in order to the freshly built method, before the optimizer sees its
# parameters. Each takes (core, method, log) and returns the module to use from then on; each is
# the trainer's business only (a user's own modules never pass through them).


def to_channels_last(core: TrainCore, method, log=None):
    """NHWC weights: cuDNN's and oneDNN's fast convolutions (on the CPU too: about 1.5x for resnet_tiny at 32 px,
    2 cores). Not under FSDP, which shards contiguous parameters."""
    if core.cfg.train.channels_last and not core.sharded:
        return method.to(memory_format=torch.channels_last)
    return method


def cpu_weight_gradients(core: TrainCore, method, log=None):
    """On an eager fp32 CPU run, the fastest weight gradient per convolution shape (fastssl/models/cpu_conv.py).

    oneDNN's weight gradients run at half its forward's speed on AVX2 CPUs: the fastest of it, one GEMM and
    one forward conv, per shape, timed once per machine. Same parameters, state dict and results. Eager
    only: the per-shape timing would break a compiled graph (compile gains nothing on a CPU)."""
    if core.device.type == "cpu" and not core.bf16 and not core.compiled:
        from fastssl.models.cpu_conv import use_fast_wgrad

        use_fast_wgrad(method, core.cfg.train.cpu_conv_wgrad)
    return method


def compile_backbone(core: TrainCore, method, log=None):
    """``torch.compile`` in place (state-dict keys keep no ``_orig_mod.``; a compile error falls back to eager).
    Under FSDP each ViT block compiles its own forward (FSDP's gathers run between the graphs).

    ``train.compile_scope=method``: the method's whole forward is one graph (backbone, projector
    and loss: their small kernels fuse and launch from one graph), for methods whose forward does
    not read ``step`` (``step_free_forward``): a graph specialised on the step's value would
    recompile every step. Other methods compile the backbone, with one warning.
    """
    if not core.compiled:
        return method
    from fastssl.compile import compile_module
    from fastssl.fsdp import block_modules

    if core.cfg.train.compile_scope == "method" and not core.sharded:
        if getattr(method, "step_free_forward", False):
            compile_module(method, log=log, mode=core.cfg.train.compile_mode, name="method")
            return method
        (log or logger.warning)(f"train.compile_scope=method: {core.cfg.method.name}'s forward reads the step "
                                f"(schedules), so only its backbone is compiled")
    parts = list(block_modules(method.backbone)) if core.sharded else [method.backbone]
    for part in parts or [method.backbone]:
        compile_module(part, log=log, mode=core.cfg.train.compile_mode)
    return method


def shard(core: TrainCore, method, log=None):
    """FSDP over the processes (``train.strategy=fsdp``), before the optimizer: it makes new parameters."""
    if core.cfg.train.strategy == "fsdp" and not core.sharded and core.acc.is_main_process:
        logger.warning("train.strategy=fsdp with one process: nothing to shard, the model runs whole")
    if not core.sharded:
        return method
    from fastssl.fsdp import shard_method

    return shard_method(method, core.device, core.bf16)


MODEL_TRANSFORMS = (to_channels_last, cpu_weight_gradients, compile_backbone, shard)


def ddp_skip_queues(method: torch.nn.Module) -> list[str]:
    """Keep DDP from broadcasting the method's feature queues from rank 0 at every forward; returns their names.

    DDP's ``broadcast_buffers`` copies every buffer from rank 0 before each forward, which keeps
    BatchNorm's running statistics equal across ranks. A queue (:class:`fastssl.methods._common.FeatureQueue`:
    NNCLR's support set is 98,304 x 256 fp32, 100 MB) is already equal on every rank, since ``commit``
    enqueues the rows gathered from all of them, so broadcasting it moves 100 MB per micro-batch for
    nothing. Call before the model is wrapped.
    """
    from torch.nn.parallel import DistributedDataParallel

    from fastssl.methods._common import FeatureQueue

    names = [f"{prefix}.{name}" if prefix else name for prefix, mod in method.named_modules()
             if isinstance(mod, FeatureQueue) for name, _ in mod.named_buffers(recurse=False)]
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, names)
    return names


def train_step(core: TrainCore, micro_batches: Iterable, step: int) -> int:
    """One optimizer step over ``micro_batches`` (an iterable of ``Batch``, ``optim.accum_steps`` long).

    Returns the number of micro-batches consumed (fewer than asked when the iterable ran out).
    """
    cfg, model, opt, acc = core.cfg, core.model, core.opt, core.acc
    for g in opt.param_groups:
        g["lr"] = float(core.lr_sched[step]) * g.get("lr_scale", 1.0)
        if g.get("apply_wd", False):  # groups without decay (biases, norms) keep 0
            g["weight_decay"] = float(core.wd_sched[step])
    micro = cfg.optim.accum_steps
    done = 0
    if fault_injection.PLAN is not None and fault_injection.fire("hang", "step", at=step + 1):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)  # a rank that stops answering (FASTSSL_FAULT=hang@rankR:step:N)
    for mi, batch in enumerate(micro_batches):
        # One fp32 sum per view (a read of the batch, no host sync): NaN and inf propagate through it.
        vin = torch.stack([v.sum(dtype=torch.float32) for v in batch.views]).sum()
        core.first_bad_input = torch.where((core.first_bad_input < 0) & ~torch.isfinite(vin), step,
                                           core.first_bad_input)
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = contextlib.nullcontext() if mi == micro - 1 else acc.no_sync(model)
        with sync, acc.autocast():
            outd = model(batch.views, step)
            loss = outd["loss"] / micro
        if fault_injection.PLAN is not None and mi == 0 and fault_injection.fire("oom", "step", at=step + 1):
            raise torch.OutOfMemoryError("CUDA out of memory (injected: FASTSSL_FAULT=oom@step). Tried to allocate "
                                         "2.00 GiB")
        acc.backward(loss)
        ld = outd["loss"].detach()
        core.loss_sum += ld
        core.first_bad = torch.where((core.first_bad < 0) & ~torch.isfinite(ld), step, core.first_bad)
        for k, v in outd.items():
            if k not in ("loss", "features") and torch.is_tensor(v) and v.ndim == 0:
                core.log_sums[k] = core.log_sums.get(k, 0) + v.detach().float()
        if core.probe is not None and batch.labels is not None:
            _, correct, labelled = core.probe.step(outd["features"].float(), batch.labels)
            core.probe_correct += correct
            core.probe_seen += labelled
        core.n_micro += 1
        done += 1
    if done == 0:
        return 0
    if cfg.optim.clip_grad > 0:
        if cfg.optim.clip_mode == "per_param":  # DINO's utils.clip_gradients: each parameter's own norm
            from fastssl.grad_clip import clip_gradients

            acc.unscale_gradients()  # a no-op in bf16; needed under an fp16 GradScaler
            clip_gradients(core.params, cfg.optim.clip_grad, "per_param")
        else:
            acc.clip_grad_norm_(core.params, cfg.optim.clip_grad)
    if core.before_opt is not None:
        core.before_opt(step)  # e.g. DINO/SwAV: zero the frozen last layer's / prototypes' grads
    # From here the weights, the optimizer's state and the teachers change: a failure before the end
    # leaves them part-updated, which an out-of-memory handler must not save as step ``step - 1``.
    core.updating = True
    if fault_injection.PLAN is not None and fault_injection.fire("oom", "update", at=step + 1):
        raise torch.OutOfMemoryError("CUDA out of memory (injected: FASTSSL_FAULT=oom@update). Tried to allocate "
                                     "2.00 GiB")
    opt.step()
    opt.zero_grad(set_to_none=True)
    core.method.after_step(step)
    core.updating = False
    return done


def make_accelerator(cfg: Config, device: torch.device):
    """An ``accelerate.Accelerator`` for this config (bf16 mixed precision per :func:`use_bf16`).

    ``train.log_with`` names its experiment trackers; its project directory is the run directory,
    TensorBoard writes under ``<run dir>/tensorboard/`` (:class:`fastssl.metrics_log.MetricsLog`
    starts them and mirrors ``metrics.jsonl`` to them).
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    from fastssl.config import trackers
    from fastssl.rundir import run_dir_for

    # A second run in one process (tests, notebooks, sweeps) may change precision: accelerate keeps
    # its first choice unless its state is reset (the distributed part, PartialState, is kept).
    AcceleratorState._reset_state()
    out = run_dir_for(cfg)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))
    # DDP's gradients live in its all-reduce buckets (no copy per step), so a channels_last parameter's
    # gradient takes the parameter's strides: autograd accumulates into the bucket view in place. Without
    # it, autograd's contiguous gradients meet buckets laid out NHWC and DDP warns on every run that the
    # strides do not match ("may impair performance") and copies them.
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    handlers = [ddp]
    if cfg.train.collective_timeout > 0:
        # The process group's own timeout, fixed at init, is the backstop behind fastssl.faults.Watchdog (which
        # names the rank and knows which waits are excused): long enough for the longest excused wait, a first
        # step that compiles on a slower rank; gloo then raises, NCCL aborts the process (its default
        # TORCH_NCCL_ASYNC_ERROR_HANDLING=3 since torch 2.2). Without it: torch's 10 min (NCCL) or 30 min (gloo).
        t = max(cfg.train.first_step_timeout, cfg.train.collective_timeout) + cfg.train.collective_timeout
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=t)))
    return Accelerator(mixed_precision="bf16" if use_bf16(cfg, device) else "no", cpu=device.type != "cuda",
                       log_with=trackers(cfg) or None, project_config=project, kwargs_handlers=handlers)

