"""Progress of long work (``fastssl-prepare``, feature extraction, evaluation, training, the first compile).

``progress(total, desc, unit, enabled)`` picks one of three reporters, all with the same small API
(``update(n)``, ``set_postfix(**kw)``, ``log(msg)``, ``close()``, ``n``; a context manager too):

- a tqdm bar (rate and ETA), when the stream (stdout by default) is a terminal;
- plain lines, when it is not (a pipe, a file, a job log): one line every ``every`` items (default: each
  tenth of ``total``) or when ``interval`` seconds have passed since the last line, each with the
  count, the rate over the items since the previous line, and the ETA at that rate; then one closing
  line with the total time. No ``\\r``, so a log keeps one readable line per report;
- nothing, when quiet (:func:`set_quiet`, the commands' ``--quiet``, or ``FASTSSL_QUIET=1`` in the
  environment, which also reaches processes that ``accelerate launch`` starts), when ``enabled`` is
  False, or on any process but the main one (rank 0).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Silence every progress reporter of this process (the commands' ``--quiet``)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet or os.environ.get("FASTSSL_QUIET", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def quiet(on: bool = True):
    """``with quiet():`` no progress inside (restores the previous setting)."""
    global _quiet
    saved = _quiet
    _quiet = _quiet or bool(on)
    try:
        yield
    finally:
        _quiet = saved


def is_main_process() -> bool:
    """Rank 0 of a distributed run (torch.distributed, or the launcher's RANK before it is initialised)."""
    from fastssl.distributed import rank

    try:
        if rank() != 0:
            return False
    except Exception:  # noqa: BLE001 - no usable torch.distributed: a single process
        pass
    return os.environ.get("RANK", "0").strip() in ("", "0")


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _fmt_rate(rate: float, unit: str) -> str:
    if rate <= 0 or not math.isfinite(rate):
        return f"? {unit}/s"
    return f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}"


class _Silent:
    """Counts, prints nothing."""

    def __init__(self, total=None, initial: int = 0):
        self.total, self.n, self.initial = total, initial, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        pass

    def log(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Lines(_Silent):
    """One plain line per ``every`` items or ``interval`` seconds, with the rate and the ETA."""

    def __init__(self, total, desc: str, unit: str, stream, initial: int = 0, every: int | None = None,
                 interval: float | None = 30.0):
        super().__init__(total, initial)
        self.desc, self.unit, self.stream = desc, unit, stream
        self.every = every if every else (max(1, math.ceil(total / 10)) if total else None)
        self.interval = interval
        self.t0 = self.t_last = time.perf_counter()
        self.n_last = initial
        self.postfix = ""
        self.closed = False

    def _print(self, text: str) -> None:
        print(f"{self.desc}: {text}" if self.desc else text, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        due = (self.every and self.n // self.every > self.n_last // self.every) \
            or (self.interval is not None and now - self.t_last >= self.interval)
        if not due or (self.total and self.n >= self.total):
            return  # the closing line reports the end
        rate = (self.n - self.n_last) / max(now - self.t_last, 1e-9)
        count = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n} {self.unit}"
        eta = f", ETA {tqdm.format_interval((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        self._print(f"{count}, {_fmt_rate(rate, self.unit)}{eta}{self.postfix}")
        self.t_last, self.n_last = now, self.n

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in kw.items())

    def log(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        secs = time.perf_counter() - self.t0
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        rate = _fmt_rate((self.n - self.initial) / max(secs, 1e-9), self.unit)
        self._print(f"{count} in {tqdm.format_interval(secs)} ({rate}){self.postfix}")


class _Bar(tqdm):
    """tqdm, with ``log`` printing above the bar."""

    def log(self, msg: str) -> None:
        tqdm.write(msg, file=self.fp)


def progress(total: int | None, desc: str = "", unit: str = "it", enabled: bool = True, *, initial: int = 0,
             every: int | None = None, interval: float | None = 30.0, leave: bool = True, file=None):
    """A progress reporter for ``total`` items (None: unknown): a tqdm bar, plain lines, or nothing (module doc).

    ``every``/``interval``: the plain-line cadence (items; seconds). ``file``: the stream (default
    stdout, looked up at the call). ``leave``: keep the finished bar on the terminal.
    """
    stream = file if file is not None else sys.stdout
    if not enabled or is_quiet() or not is_main_process():
        return _Silent(total, initial)
    if is_terminal(stream):
        return _Bar(total=total, initial=initial, desc=desc or None, unit=unit, file=stream, dynamic_ncols=True,
                    leave=leave)
    return _Lines(total, desc, unit, stream, initial=initial, every=every, interval=interval)


@contextlib.contextmanager
def first_step(name: str, reporter=None, enabled: bool = True):
    """Around the first call of a lazily compiled module: ``compiling NAME (first step)...`` before,
    the seconds it took after. Host time only (no device sync): the compile is host work, the
    step's kernels are queued. ``reporter``: a :func:`progress` reporter to print through (keeps a
    tqdm bar intact); printed on the main process only, and not when quiet."""
    say = None
    if enabled and not is_quiet() and is_main_process():
        say = reporter.log if reporter is not None and type(reporter) is not _Silent else \
            (lambda m: print(m, flush=True))
    if say:
        say(f"[fastssl] compiling {name} (first step)...")
    t0 = time.perf_counter()
    yield
    if say:
        say(f"[fastssl] first step (compiling {name} included) took {time.perf_counter() - t0:.1f} s")
