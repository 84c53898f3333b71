"""What every ``fastssl-bench`` measurement shares: one timer, one JSON writer.

:class:`Timer` times GPU work with CUDA events (recorded on the stream: the loop under the
timer runs without host syncs, and the one sync is at :meth:`Timer.seconds`), and CPU work
with ``time.perf_counter``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def write_json(res: dict, out: str | None, indent: int = 1) -> str:
    """The benchmark's JSON text, also written to ``out`` (folders made) when given."""
    text = json.dumps(res, indent=indent)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text


class Timer:
    """``with Timer(device) as t: work(); t.seconds()`` -- CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._start = self._end = None
        self._t0 = self._t1 = 0.0

    def __enter__(self) -> "Timer":
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device))  # the timed device's stream, not cuda:0's
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self.cuda:
            self._end.record(torch.cuda.current_stream(self.device))
        else:
            self._t1 = time.perf_counter()
        return False

    def seconds(self) -> float:
        """Elapsed seconds (on CUDA: waits for the end event, the only host sync)."""
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return self._t1 - self._t0
