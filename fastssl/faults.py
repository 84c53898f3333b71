"""Losing nothing: pre-emption signals, checkpoint history with fallback, resume=auto, one writer per run.

- :class:`Preemption` turns SIGTERM / SIGUSR1 (SLURM's ``--signal=USR1@120``, torchelastic's
  stop, ``kill``) into a flag the training loop polls after each optimizer step; the loop then
  writes a checkpoint and exits with :data:`PREEMPTED_EXIT_CODE`. Under SLURM, a SIGUSR1 also
  requeues the job (``scontrol requeue``), as Lightning does; with ``train.resume=auto`` the
  requeued job continues by itself.
- :class:`CheckpointHistory` writes ``checkpoints/ckpt-<step>.pt`` atomically, points
  ``last.pt`` at it (a hard link: no second copy), and keeps the newest ``train.keep_checkpoints``.
  :meth:`CheckpointHistory.load_latest` falls back from an unreadable ``last.pt`` to the newest
  readable file, warning with its name.
- :func:`config_differences` says which keys of a checkpoint's config differ from this run's,
  for ``train.resume=auto``.
- :class:`RunLock` stops a second run from writing into the same run directory.
- :class:`DiskFull`, :class:`OutOfMemory`, :class:`LoaderWorkerFailed`: the faults a run stops on
  with one line (what, where, the last good checkpoint, the fix) and a documented exit code
  (:data:`EXIT_CODES`); :class:`Watchdog` ends a process whose ranks stop making progress (6).

Exit codes of ``fastssl-train`` (0 finished):

====  =====================================================================================
2     bad input (config, data, unreadable checkpoint, run directory locked)
3     non-finite loss (lower the lr; the last good checkpoint is named)
4     a full disk (checkpoint, metrics.jsonl, export): free space, then ``train.resume=auto``
5     out of GPU memory: change the named setting, then ``train.resume=true``
6     a rank made no progress within ``train.collective_timeout``: ``train.resume=auto`` (requeue)
7     a data-loader worker died or hung (``data.worker_timeout``): ``train.resume=auto`` (requeue)
75    pre-empted (SIGTERM/SIGUSR1) after writing a checkpoint: ``train.resume=auto`` (requeue)
====  =====================================================================================

6, 7 and 75 are worth a retry as they are (a lost node, a killed process); 4 and 5 need a change first.
These are each process's own status: ``srun`` (one task per process) passes them on, while
``torchrun`` exits 1 when a worker fails and lists each worker's status in its error summary.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from fastssl import checkpoint as ckpt_io

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "try again later" -- the run stopped cleanly and can resume.
PREEMPTED_EXIT_CODE = 75
DISK_FULL_EXIT_CODE = 4     # the same status fastssl-prepare gives for a full disk
OUT_OF_MEMORY_EXIT_CODE = 5
RANK_HUNG_EXIT_CODE = 6
LOADER_WORKER_EXIT_CODE = 7
EXIT_CODES = {"bad input": 2, "non-finite loss": 3, "disk full": DISK_FULL_EXIT_CODE,
              "out of memory": OUT_OF_MEMORY_EXIT_CODE, "rank hung": RANK_HUNG_EXIT_CODE,
              "loader worker": LOADER_WORKER_EXIT_CODE, "pre-empted": PREEMPTED_EXIT_CODE}
SPACE_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

# Keys that may differ between a run and its resumption (they change how it runs, not what it computes).
RESUME_FREE_KEYS = ("train.resume", "train.progress", "train.log_every", "train.max_steps", "train.keep_checkpoints",
                    "train.ckpt_every_epochs", "train.ckpt_every_steps", "data.workers", "data.train", "data.val",
                    "eval.every_epochs", "eval.final", "eval.val_subset", "train.out_dir", "train.log_with",
                    "train.strategy",  # ddp and fsdp write and read the same checkpoint format
                    "train.collective_timeout", "train.first_step_timeout", "data.worker_timeout")


def warn(msg: str) -> None:
    log.warning(msg)


class Preemption:
    """Signal handlers that record a stop request; ``requested`` is polled by the loop (no work in the handler)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            warn(f"{self.signal_name} received: finishing this step, then writing a checkpoint and exiting "
                 f"with code {PREEMPTED_EXIT_CODE}")

    def install(self) -> "Preemption":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. a notebook's worker)
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requeue(self, rank: int = 0) -> None:
        """Under SLURM, after a SIGUSR1: put the job back in the queue (needs ``#SBATCH --requeue``); global rank 0 only."""
        job = os.environ.get("SLURM_JOB_ID")
        if rank != 0 or self.signal_name != "SIGUSR1" or not job or not shutil.which("scontrol"):
            return
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if r.returncode == 0:
            warn(f"requeued SLURM job {job}")
        else:
            warn(f"scontrol requeue {job} failed: {r.stderr.strip()}")


class CheckpointHistory:
    """``checkpoints/ckpt-<step>.pt`` files, ``last.pt`` linked to the newest, the newest ``keep`` kept."""

    PATTERN = re.compile(r"ckpt-(\d+)\.pt$")

    def __init__(self, folder: str | os.PathLike, keep: int = 2):
        self.folder = Path(folder)
        self.keep = max(1, int(keep))
        self.last = self.folder / "last.pt"

    def history(self) -> list[Path]:
        """The step-numbered checkpoints, newest first."""
        files = [(int(m.group(1)), p) for p in self.folder.glob("ckpt-*.pt") if (m := self.PATTERN.search(p.name))]
        return [p for _, p in sorted(files, reverse=True)]

    def save(self, state: dict, step: int) -> Path:
        path = self.folder / f"ckpt-{step:09d}.pt"
        try:
            ckpt_io.save_atomic(state, path)
        except DiskFull as e:
            e.last_good = last_good_checkpoint(self.folder.parent) if self.folder.name == "checkpoints" else None
            raise
        tmp = self.last.with_name("last.pt.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)          # same file, no second copy
        except OSError:                 # a filesystem without hard links
            try:
                shutil.copyfile(path, tmp)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                if is_disk_full(e):     # the new checkpoint itself is whole: resume finds it in the history
                    raise DiskFull(tmp, path.stat().st_size, "last.pt copy", last_good=str(path)) from None
                raise
        os.replace(tmp, self.last)      # readers see the old or the new last.pt, never half of one
        for old in self.history()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """Remove every checkpoint of this folder (a new run starts in it)."""
        for p in self.history() + [self.last]:
            p.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        seen, out = set(), []
        for p in [self.last] + self.history():
            if p.is_file():
                key = (p.stat().st_ino, p.stat().st_dev)
                if key not in seen:  # last.pt is a link to the newest ckpt-*.pt: try that file once
                    seen.add(key)
                    out.append(p)
        return out

    def exists(self) -> bool:
        return bool(self.candidates())

    def load_latest(self, trust: bool = False) -> tuple[dict, Path]:
        """The newest readable checkpoint and its path; a warning names each unreadable one skipped.

        Raises :class:`fastssl.checkpoint.CheckpointError` (one line) when none is readable, and
        :class:`fastssl.checkpoint.UntrustedCheckpointError` at once for a file that needs pickle:
        falling back past it would silently drop the user's newest state.
        """
        bad = []
        for p in self.candidates():
            try:
                state = ckpt_io.load(p, trust=trust)
            except ckpt_io.UntrustedCheckpointError:
                raise
            except (ckpt_io.CheckpointError, OSError, RuntimeError, EOFError) as e:
                warn(f"checkpoint {p} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                     f"trying an older one")
                bad.append(p)
                continue
            if bad:
                warn(f"resuming from {p} (step {state.get('step')}) instead of the unreadable {bad[0]}")
            return state, p
        raise ckpt_io.CheckpointError(
            f"no readable checkpoint in {self.folder} ({', '.join(p.name for p in bad) or 'none there'}): "
            f"start a new run (train.resume=false) or restore the folder from a backup")


def config_differences(saved: dict, current: dict, free=RESUME_FREE_KEYS) -> list[str]:
    """``key: saved -> current`` for every config key that differs, except those free to change on resume."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flat(saved), flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in free and a.get(k) != b.get(k)]


class RunLocked(RuntimeError):
    """Another live run writes to this run directory."""


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint (exit with PREEMPTED_EXIT_CODE)."""


class RunLock:
    """``<run dir>/.lock`` with the owner's host and pid; a live owner on this host means another run writes here."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text().strip() if self.path.exists() else ""
                host, _, pid = owner.partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # a crashed run's stale lock
                    continue
                raise RunLocked(
                    f"another run ({owner or 'unknown owner'}) is writing to {self.path.parent}; give this run "
                    f"another train.name, or delete {self.path} if that run is gone")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- faults that stop a run


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in SPACE_ERRNOS


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or a library's out-of-memory RuntimeError (cuDNN, cuBLAS, NCCL allocations)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def last_good_checkpoint(run_dir: str | os.PathLike | None) -> str:
    """The newest checkpoint of a run directory that is a whole zip (a cheap check, no load), or a phrase."""
    if run_dir is None:
        return "unknown"
    import zipfile

    history = CheckpointHistory(Path(run_dir) / "checkpoints")
    for p in history.history() + [history.last]:  # the step-numbered name of the file last.pt links
        if p.is_file() and zipfile.is_zipfile(p):
            return str(p)
    return "none (no checkpoint yet)"


class RunFault(Exception):
    """A fault the run stops on with one line and :attr:`exit_code`; :attr:`last_good` is filled in by the trainer."""

    exit_code = 1

    def __init__(self, msg: str = "", last_good: str | None = None, fix: str = ""):
        super().__init__(msg)
        self.msg, self.last_good, self.fix = msg, last_good, fix

    def line(self) -> str:
        last = f"; last good checkpoint: {self.last_good}" if self.last_good and self.last_good not in self.msg else ""
        return f"{self.msg}{last}" + (f"; {self.fix}" if self.fix else "")

    def __str__(self) -> str:
        return self.line()


class DiskFull(RunFault, OSError):
    """No space left while writing ``path``; the partial file was removed (exit 4)."""

    exit_code = DISK_FULL_EXIT_CODE

    def __init__(self, path: str | os.PathLike, needed: int | None = None, what: str = "",
                 last_good: str | None = None, fix: str = "run the same command with train.resume=auto"):
        RunFault.__init__(self, "", last_good)
        self.fix = fix
        self.errno, self.strerror, self.filename = errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)
        self.path, self.needed, self.what = Path(path), needed, what
        self.free = None
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            self.free = shutil.disk_usage(folder).free
        except OSError:
            pass

    def line(self) -> str:
        need = f"about {fmt_bytes(self.needed)} needed" if self.needed else "more space needed"
        free = f", {fmt_bytes(self.free)} free" if self.free is not None else ""
        last = f"; last good checkpoint: {self.last_good}" if self.last_good else ""
        return (f"no space left on the disk of {self.path}{f' ({self.what})' if self.what else ''}: {need}{free}; "
                f"the partial file was removed{last}. Free space there (or write to a larger disk), then {self.fix} "
                f"(exit {DISK_FULL_EXIT_CODE})")


class OutOfMemory(RunFault):
    """The step ran out of GPU memory (exit 5); the message gives the peak and what to change."""

    exit_code = OUT_OF_MEMORY_EXIT_CODE


class LoaderWorkerFailed(RunFault):
    """A data-loader worker died or hung (exit 7)."""

    exit_code = LOADER_WORKER_EXIT_CODE


def oom_advice(cfg, size: int | None = None, first: bool = True) -> str:
    """What to change after an out-of-memory step, for this config (most effective first); progressive
    resolution only helps a run that fails at its first steps (it shrinks the early epochs, not the last)."""
    tips = []
    if cfg.optim.accum_steps == 1:
        tips.append("optim.accum_steps=2 (same global batch, half the activations; each loss then sees half as many "
                    "samples)")
    else:
        tips.append(f"optim.accum_steps={cfg.optim.accum_steps * 2}")
    tips.append(f"a smaller optim.batch_size (e.g. {max(1, cfg.optim.batch_size // 2)})")
    if first and size and size > 0 and not cfg.train.res_start:
        tips.append(f"train.res_start={max(32, (size // 2) // 32 * 32)} (progressive resolution: smaller early epochs)")
    local = getattr(cfg.aug, "num_local", 0) or 0
    if local:
        tips.append(f"fewer local crops (aug.num_local={max(0, local - 2)})")
    return ", ".join(tips)


def oom_message(cfg, step: int, first: bool, size: int | None, device, checkpoint: str, saved: bool,
                text: str = "") -> OutOfMemory:
    """The one line for an out-of-memory step ``step`` (1-based, as metrics.jsonl counts); ``text`` is torch's."""
    import torch

    m = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", text)
    parts = [f"asked for {m.group(1)} more"] if m else []
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        used = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        parts.append(f"peak {fmt_bytes(used)} allocated of {fmt_bytes(total)}")
    else:
        parts.append("peak not measured off CUDA")
    mem = f" ({'; '.join(parts)})"
    where = (f"at the first step of this run (step {step})" if first else
             f"at step {step}" + (f" (global views {size} px)" if size else ""))
    kept = (f"wrote {checkpoint} from the last completed step" if saved
            else f"last good checkpoint: {checkpoint}")
    return OutOfMemory(f"out of GPU memory {where}{mem}; {kept}. Try {oom_advice(cfg, size, first)}; then run again with "
                       f"train.resume=true (exit {OUT_OF_MEMORY_EXIT_CODE})", last_good=checkpoint)


def worker_failure(exc: BaseException, iterator, batches: list, items, timeout: float) -> LoaderWorkerFailed | None:
    """A DataLoader's "worker exited unexpectedly" / "killed by signal" / "timed out" error as one line naming the
    worker, its pid and the samples it held; None for any other error.

    ``iterator`` is the DataLoader's iterator (its private worker table is read where present, best effort),
    ``batches`` the batch sampler's lists of sample indices in order (task i is batch i), ``items`` the
    dataset's ``(path, label)`` pairs.
    """
    text = str(exc)
    died = "exited unexpectedly" in text or "is killed by signal" in text
    hung = "timed out after" in text
    if not (died or hung) or "DataLoader" not in text:
        return None
    if iterator is None and _watched is not None and _watched[0]() is not None:
        # Raised by torch's SIGCHLD handler wherever the main thread was (often inside the step, not next()):
        # the loader being read is the one whose worker died.
        iterator, batches, items, timeout = _watched[0](), *_watched[1:]
    pids = [int(x) for x in re.findall(r"\d+", (re.search(r"pid\(?s?\)? ([\d, ]+)", text) or [""])[0])]
    workers = list(getattr(iterator, "_workers", []) or [])
    if pids and not any(w.pid in pids for w in workers):  # another loader's worker: name the pid only
        iterator, workers = None, []
    tasks = dict(getattr(iterator, "_task_info", {}) or {})
    wid, task = None, None
    if died:
        gone = [i for i, w in enumerate(workers) if w.pid in pids] or [
            i for i, w in enumerate(workers) if not w.is_alive()]
        wid = gone[0] if gone else None
        if wid is not None:
            mine = sorted(i for i, info in tasks.items() if len(info) == 1 and info[0] == wid)
            task = mine[0] if mine else None
    else:
        task = getattr(iterator, "_rcvd_idx", None)
        info = tasks.get(task) if task is not None else None
        wid = info[0] if info else None
    pid = workers[wid].pid if wid is not None and wid < len(workers) else None
    who = (f"data-loader worker {wid} (pid {pid})" if wid is not None else
           f"a data-loader worker (pid {', '.join(map(str, pids))})" if pids else "a data-loader worker")
    why = ""
    m = re.search(r"killed by signal: ([^.]+)", text)
    if m:
        why = f", killed by signal ({m.group(1).strip()})"
    if died and wid is not None and wid < len(workers):
        code = workers[wid].exitcode
        if code is not None and code < 0:
            try:
                why = f", killed by {signal.Signals(-code).name}" + (
                    " (often the kernel's out-of-memory killer: fewer data.workers)" if -code == signal.SIGKILL else "")
            except ValueError:
                why = f", killed by signal {-code}"
        elif code is not None:
            why = f", exit status {code}"
    held = ""
    if task is not None and 0 <= task < len(batches):
        idx = list(batches[task])
        first = items[idx[0]][0] if idx and idx[0] < len(items) else "?"
        shown = ", ".join(map(str, idx[:4])) + (", ..." if len(idx) > 4 else "")
        held = (f" while loading batch {task} of the epoch ({len(idx)} samples: {shown}; the first {first}; "
                f"set data.workers=0 to see the sample's own error)")
    what = (f"{who} died{why}{held}" if died else
            f"{who} sent nothing for {timeout:g} s (data.worker_timeout){held}")
    return LoaderWorkerFailed(what, fix=f"rerun the same command with train.resume=auto (exit {LOADER_WORKER_EXIT_CODE})")


# ----------------------------------------------------------------------------- ranks that stop making progress


class Watchdog:
    """Ends the process when this rank makes no step progress within the timeout, naming the rank to blame.

    Why a thread and files, not only the process group's timeout: a collective blocked on a
    stopped peer gives, at best, an error naming no rank (gloo) or an abort from NCCL's own
    watchdog, and torch fixes that timeout once at init, while a first step that compiles needs a
    longer one than the steps after it. Here each rank's thread writes ``<run dir>/heartbeat/rank-R``
    (its step and phase, JSON) when its step or phase changes and at least every quarter timeout,
    so a rank whose process is stopped, swapped out or gone stops refreshing its file. The loop only
    stores the step number (:meth:`beat`); no I/O, no sync. When this rank's step has not advanced
    for ``timeout`` (``first_timeout`` until the first step of this process finishes), the thread
    reads the other ranks' files: a silent rank (file older than the timeout) is named with its last
    step; a peer in an excused phase (an evaluation rank 0 runs alone, a checkpoint write) excuses
    the wait; otherwise the ranks behind (or all, for a collective that hangs everywhere) are named.
    Then one line is logged, ``on_fire(line)`` called (the trainer writes it to metrics.jsonl) and
    the process exits with :data:`RANK_HUNG_EXIT_CODE` (``os._exit``: the main thread is blocked
    inside a collective and cannot be interrupted). The files live in the run directory, which
    resuming already needs to be shared between nodes; a rank whose file is missing is reported so.
    """

    EXCUSED = ("setup", "eval", "save")

    def __init__(self, run_dir: str | os.PathLike, rank: int, world: int, timeout: float, first_timeout: float,
                 on_fire=None, exit=os._exit, last_good=None):
        self.dir = Path(run_dir) / "heartbeat"
        self.run_dir = Path(run_dir)
        self.rank, self.world = rank, world
        self.timeout, self.first_timeout = float(timeout), float(max(first_timeout, timeout))
        self.on_fire, self.exit, self.last_good = on_fire, exit, last_good or (lambda: last_good_checkpoint(run_dir))
        self.step, self.phase = 0, "setup"
        self.step0: int | None = None
        self.poll = min(max(self.timeout / 10, 0.1), 5.0)
        self.refresh = self.timeout / 4   # liveness: a live rank's file is never older than this
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: str | None = None

    # ------------------------------------------------------------------ called by the loop

    def beat(self, step: int) -> None:
        """Steps completed so far (a plain store: the loop pays nothing more)."""
        self.step = step

    def set_phase(self, phase: str) -> None:
        if self.step0 is None and phase == "train":
            self.step0 = self.step
        self.phase = phase

    def next_step_compiles(self) -> None:
        """The next step compiles again (a new resolution): it gets ``first_timeout``, as the first one did."""
        self.step0 = self.step

    class _Phase:
        def __init__(self, dog, phase):
            self.dog, self.phase = dog, phase

        def __enter__(self):
            self.prev = self.dog.phase
            self.dog.set_phase(self.phase)

        def __exit__(self, *exc):
            self.dog.set_phase(self.prev)

    def excused(self, phase: str) -> "_Phase":
        """``with dog.excused("eval"):`` -- a stretch with no step progress that is not a hang."""
        return self._Phase(self, phase)

    def start(self) -> "Watchdog":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name="fastssl-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread; the file then says ``exited``, so that peers still waiting blame this rank at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.phase = "exited"
        self._write()

    # ------------------------------------------------------------------ the thread

    def _write(self) -> None:
        path = self.dir / f"rank-{self.rank:05d}"
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"rank": self.rank, "step": self.step, "phase": self.phase, "pid": os.getpid(),
                                       "host": socket.gethostname()}))
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk: the heartbeat is advisory, the checkpoint write reports the disk
            pass

    def _run(self) -> None:
        last = (self.step, self.phase)
        since = written = time.monotonic()
        while not self._stop.wait(self.poll):
            now = time.monotonic()
            state = (self.step, self.phase)
            changed = state != last
            if changed:
                last, since = state, now
            if changed or now - written >= self.refresh:
                self._write()
                written = now
            if self.phase != "train":
                since = now
                continue
            budget = self.first_timeout if self.step0 is None or self.step == self.step0 else self.timeout
            if now - since < budget:
                continue
            line = self.diagnose(now - since)
            if line is None:   # a live peer is busy (an evaluation on rank 0): wait on
                since = now - budget + self.refresh
                continue
            self.fire(line)
            return

    def heartbeats(self) -> dict[int, dict]:
        """``rank -> {step, phase, pid, host, age}`` of every rank's file (age in seconds, against this rank's own
        file, just rewritten, so that all ages come from one clock: the file system's)."""
        self._write()
        try:
            mine = (self.dir / f"rank-{self.rank:05d}").stat().st_mtime
        except OSError:
            mine = time.time()
        out = {}
        for r in range(self.world):
            p = self.dir / f"rank-{r:05d}"
            try:
                rec = json.loads(p.read_text())
                rec["age"] = max(0.0, mine - p.stat().st_mtime)
            except (OSError, ValueError):
                continue
            out[r] = rec
        return out

    def diagnose(self, waited: float) -> str | None:
        beats = self.heartbeats()
        me = self.rank
        others = {r: b for r, b in beats.items() if r != me}
        silent = sorted(r for r, b in others.items() if b["age"] > self.timeout or b.get("phase") == "exited")
        if not silent and any(b.get("phase") in self.EXCUSED for b in others.values()):
            return None
        missing = sorted(set(range(self.world)) - set(beats))
        where = f"rank {me} waited {waited:.0f} s after step {self.step} (train.collective_timeout={self.timeout:g})"
        if silent:
            r = silent[0]
            b = others[r]
            # "recorded": the thread writes at most once per poll, so a rank may have finished one step more
            how = ("exited (its own output says why" if b.get("phase") == "exited" else
                   f"stopped responding (no heartbeat for {b['age']:.0f} s")
            blame = (f"rank {r} {how}; its last recorded step {b.get('step')}, pid {b.get('pid')} on "
                     f"{b.get('host')})")
            if len(silent) > 1:
                blame += f" and {len(silent) - 1} more rank(s): {', '.join(map(str, silent[1:8]))}"
        elif others and min(b.get("step", 0) for b in beats.values()) < self.step:
            low = min(b.get("step", 0) for b in beats.values())
            behind = sorted(r for r, b in beats.items() if b.get("step", 0) == low)
            blame = f"rank(s) {', '.join(map(str, behind[:8]))} made no progress past step {low}"
        elif missing and others == {} and self.world > 1:
            blame = (f"no other rank's heartbeat in {self.dir} (ranks {', '.join(map(str, missing[:8]))}; a run "
                     f"directory not shared between nodes?); no step finished")
        else:
            blame = f"no rank finished a step (all {len(beats)} alive at step {self.step}: a collective hangs)"
        return (f"{blame}; {where}; last good checkpoint: {self.last_good()}; ending the job: run the same command "
                f"with train.resume=auto (SLURM: requeue) (exit {RANK_HUNG_EXIT_CODE})")

    def fire(self, line: str) -> None:
        self.fired = line
        log.error(line)
        if self.on_fire is not None:
            try:
                self.on_fire(line)
            except Exception:  # noqa: BLE001 - the exit below matters more than the record
                pass
        for h in logging.getLogger("fastssl").handlers + logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        self.exit(RANK_HUNG_EXIT_CODE)


def environmental_fault(e: BaseException, run_dir) -> RunFault | None:
    """A full disk, out-of-memory or dead loader worker that reached ``main()`` unhandled, as its one-line fault."""
    last = last_good_checkpoint(run_dir)
    if is_disk_full(e):
        return DiskFull(getattr(e, "filename", None) or run_dir, None, "", last_good=last)
    if is_out_of_memory(e):
        return OutOfMemory(f"out of GPU memory outside a training step ({str(e).splitlines()[0][:160]}); last good "
                           f"checkpoint: {last}. Lower the evaluation's batch, or optim.batch_size; then run again with "
                           f"train.resume=true (exit {OUT_OF_MEMORY_EXIT_CODE})")
    if isinstance(e, RuntimeError):
        fault = worker_failure(e, None, [], [], 0.0)
        if fault is not None:
            fault.last_good = last
        return fault
    return None


_watched = None  # (weakref to the DataLoader iterator read last, its batches, items, timeout)


def watched_batches(dataloader, batches: list, items, timeout: float):
    """Iterate a torch DataLoader; a worker that died or timed out raises :class:`LoaderWorkerFailed` (see
    :func:`worker_failure`) in place of torch's multi-line RuntimeError."""
    global _watched
    import weakref

    it = iter(dataloader)
    try:
        _watched = (weakref.ref(it), batches, items, timeout)
    except TypeError:  # an iterator without weak references: the message names the pid only
        pass
    while True:
        try:
            got = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            fault = worker_failure(e, it, batches, items, timeout)
            if fault is None:
                raise
            raise fault from None
        yield got
