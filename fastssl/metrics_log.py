"""The run's metric stream: ``metrics.jsonl`` (the source of truth), written by the main process.

Every record is one JSON line with a ``kind`` (train, eval, error, preempted), flushed as
written, so a killed run keeps every line it logged.
"""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Append-only ``metrics.jsonl`` (main process only); lines are flushed as written.

    ``cfg`` and ``acc`` (the run's config and ``accelerate.Accelerator``) are there for
    experiment trackers that mirror the stream.
    """

    def __init__(self, path: Path, enabled: bool, cfg=None, acc=None):
        self.enabled = enabled
        self.cfg, self.acc = cfg, acc
        self.f = open(path, "a") if enabled else None

    def write(self, **rec) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None
