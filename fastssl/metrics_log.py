"""The run's metric stream: ``metrics.jsonl`` (the source of truth), written by the main process.

Every record is one JSON line with a ``kind`` (train, eval, error, preempted), flushed as
written, so a killed run keeps every line it logged.

Experiment trackers (``train.log_with=tensorboard,wandb,mlflow``, through accelerate's tracker
API) mirror the stream: at the start the config goes to each tracker as hyper-parameters (one
flat ``section.key`` dict), then every ``train`` and ``eval`` record's numbers are logged at the
record's step as ``train/<name>`` and ``eval/<name>`` (the random-init evaluation is
``eval/...`` at step 0). The JSON line is always written first; a tracker that fails in the
middle of a run is reported once and dropped, and the run goes on.

A full disk stops the run: the half-written line is cut off (the file ends with whole lines)
and :class:`fastssl.faults.DiskFull` names the file; the checkpoint that would follow could not
be written there either.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT = "fastssl"  # W&B project / MLflow experiment (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME override it)


def flat_config(cfg) -> dict:
    """The config as one flat ``{"optim.lr": 0.3, "aug.views.0.size": 224, ...}`` of str/int/float/bool.

    Lists are indexed (``aug.views.0.size``); None becomes ``"none"`` (TensorBoard's hparams and
    MLflow's params take scalars only).
    """
    from fastssl.config import to_dict

    out: dict = {}

    def walk(v, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}" if key else str(k))
        elif isinstance(v, (list, tuple)):
            if not v:
                out[key] = "[]"
            for i, x in enumerate(v):
                walk(x, f"{key}.{i}")
        elif v is None:
            out[key] = "none"
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)

    walk(to_dict(cfg), "")
    return out


def tracker_values(rec: dict) -> dict:
    """The numbers of a ``train``/``eval`` record, keyed ``<kind>/<name>`` (``step`` is the x axis, not a value)."""
    kind = rec.get("kind", "train")
    return {f"{kind}/{k}": v for k, v in rec.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class MetricsLog:
    """Append-only ``metrics.jsonl`` (main process only); lines are flushed as written.

    ``cfg`` and ``acc`` (the run's config and ``accelerate.Accelerator``, built by
    :func:`fastssl.engine.make_accelerator` with ``log_with``) start the trackers that
    ``train.log_with`` names and mirror the stream to them.
    """

    def __init__(self, path: Path, enabled: bool, cfg=None, acc=None):
        self.enabled = enabled
        self.cfg, self.acc = cfg, acc
        self.path = Path(path)
        self.f = open(path, "a") if enabled else None
        self.tracking = False
        self._lock = threading.Lock()  # the hang watchdog's thread may write its error line
        if enabled and cfg is not None and acc is not None:
            self._start_trackers(Path(path).parent)

    # ------------------------------------------------------------------ trackers

    def _start_trackers(self, run_dir: Path) -> None:
        from fastssl.config import trackers

        wanted = trackers(self.cfg)
        if not wanted:
            return
        have = [str(getattr(t, "value", t)) for t in (getattr(self.acc, "log_with", None) or [])]
        missing = [t for t in wanted if t not in have]
        if missing:  # accelerate drops a tracker whose package is missing, silently: say so
            raise ImportError(f"train.log_with={self.cfg.train.log_with}: accelerate found no {', '.join(missing)} "
                              f"(pip install {' '.join(missing)}), or the Accelerator was built without log_with")
        name = run_dir.name
        init_kwargs = {"wandb": {"name": name, "dir": str(run_dir)}, "mlflow": {"run_name": name}}
        project = os.environ.get("WANDB_PROJECT") or PROJECT
        self.acc.init_trackers(project, config=flat_config(self.cfg), init_kwargs=init_kwargs)
        self.tracking = True

    def _mirror(self, rec: dict) -> None:
        if not self.tracking or rec.get("kind") not in ("train", "eval") or "step" not in rec:
            return
        values = tracker_values(rec)
        if not values:
            return
        try:
            self.acc.log(values, step=int(rec["step"]))
        except Exception as e:  # noqa: BLE001 - a tracker (a network, a full disk) never stops the run
            log.warning(f"experiment tracker failed ({type(e).__name__}: {e}); stopped mirroring to trackers, "
                        f"{self.f.name if self.f else 'metrics.jsonl'} goes on")
            self.tracking = False

    def _finish_trackers(self) -> None:
        """End the trackers' runs now (also on an error or pre-emption); ``acc.end_training`` then finds none."""
        if self.acc is None or not getattr(self.acc, "trackers", None):
            return
        for t in list(self.acc.trackers):
            try:
                t.finish()
            except Exception as e:  # noqa: BLE001
                log.warning(f"closing tracker {getattr(t, 'name', t)} failed: {e}")
        self.acc.trackers.clear()
        self.tracking = False

    # ------------------------------------------------------------------ the stream

    def write(self, **rec) -> None:
        if self.f:
            line = json.dumps(rec) + "\n"
            with self._lock:
                self._append(line)
            self._mirror(rec)
            if rec.get("kind") == "error":  # the run stops with an exception: end the trackers' runs now
                self._finish_trackers()

    def drop_after(self, step: int) -> int:
        """Resuming from the checkpoint of ``step``: remove the ``train``/``eval`` records of later steps, which the
        resumed run logs again, and any half-written line a killed process left; keep every other record (an
        error or a pre-emption says why the run stopped). Returns how many lines went."""
        if not self.f:
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if rec.get("kind") in ("train", "eval") and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
                continue
            keep.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in keep))
            self.f.close()
            os.replace(tmp, self.path)
            self.f = open(self.path, "a")
            log.info(f"{self.path}: removed {dropped} record(s) after step {step}, the step this run resumes from")
        return dropped

    def _append(self, line: str) -> None:
        from fastssl import fault_injection

        start = self.f.tell()
        try:
            if fault_injection.PLAN is not None and fault_injection.fire("enospc", "metrics"):
                self.f.write(line[: len(line) // 2])
                self.f.flush()
                raise fault_injection.enospc("metrics.jsonl")
            self.f.write(line)
            self.f.flush()
        except OSError as e:
            from fastssl.faults import DiskFull, is_disk_full

            if not is_disk_full(e):
                raise
            self._cut(start)
            raise DiskFull(self.path, len(line.encode()), "metrics.jsonl") from None

    def _cut(self, size: int) -> None:
        """Drop a half-written line: what the buffer still holds, and what reached the file past ``size``."""
        f, self.f = self.f, None
        try:
            f.close()   # its flush may fail again on the full disk; the buffer goes with the object
        except OSError:
            pass
        try:
            os.truncate(self.path, size)
        except OSError:
            pass
        try:
            self.f = open(self.path, "a")
        except OSError:
            self.f = None

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None
        if self.enabled:
            self._finish_trackers()
