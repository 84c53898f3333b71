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
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from fastssl import checkpoint as ckpt_io

# EX_TEMPFAIL from sysexits.h: "try again later" -- the run stopped cleanly and can resume.
PREEMPTED_EXIT_CODE = 75

# Keys that may differ between a run and its resumption (they change how it runs, not what it computes).
RESUME_FREE_KEYS = ("train.resume", "train.progress", "train.log_every", "train.max_steps", "train.keep_checkpoints",
                    "train.ckpt_every_epochs", "train.ckpt_every_steps", "data.workers", "data.train", "data.val",
                    "eval.every_epochs", "eval.final", "eval.val_subset", "train.out_dir", "train.log_with",
                    "train.strategy")  # ddp and fsdp write and read the same checkpoint format


def warn(msg: str) -> None:
    print(f"[fastssl] {msg}", file=sys.stderr, flush=True)


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
        ckpt_io.save_atomic(state, path)
        tmp = self.last.with_name("last.pt.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)          # same file, no second copy
        except OSError:                 # a filesystem without hard links
            shutil.copyfile(path, tmp)
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
