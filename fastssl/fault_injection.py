"""A switch that makes a run fail on purpose, for tests of what survives a fault.

Set ``FASTSSL_FAULT`` in the environment of a training process (or call :func:`configure`
in-process); unset, every hook is one test of the module-level :data:`PLAN` against None.

Grammar (faults separated by commas)::

    FASTSSL_FAULT = FAULT ("," FAULT)*
    FAULT         = KIND "@" ["rank" R ":"] SITE [":" N]

    enospc@save:N       the N-th checkpoint write of this process fails with ENOSPC half-way
    enospc@metrics:N    the N-th metrics.jsonl line fails with ENOSPC half-way
    enospc@export:N     the N-th fastssl-export weights file fails with ENOSPC half-way
    oom@step:N          optimizer step N (as metrics.jsonl counts, from 1) raises torch.OutOfMemoryError
                        after its first forward
    oom@update:N        ... inside its update instead, just before ``opt.step()``
    hang@step:N         the process stops itself (SIGSTOP) before optimizer step N
    die@worker:I        the torch back-end's DataLoader worker that loads sample I is killed (SIGKILL)
    hang@worker:I       ... sleeps forever instead

``N`` defaults to 1. ``rankR:`` restricts a fault to the process of global rank ``R`` (the
``RANK`` variable torchrun and srun-style launches set; 0 without one), e.g.
``hang@rank1:step:4``. Each fault fires once per process: a resumed run in a fresh process
without the variable goes on normally. A malformed value raises ``ValueError`` naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "FASTSSL_FAULT"
KINDS = {"enospc": ("save", "metrics", "export"), "oom": ("step", "update"), "hang": ("step", "worker"),
         "die": ("worker",)}
# Sites counted by calls (the N-th call fires); the others compare N with a step or sample index.
COUNTED = ("save", "metrics", "export")


@dataclass
class Fault:
    kind: str
    site: str
    n: int = 1
    rank: int | None = None
    calls: int = 0
    fired: bool = False


def parse(text: str | None) -> list[Fault] | None:
    """``FASTSSL_FAULT``'s value -> faults (None when empty)."""
    if not text or not text.strip():
        return None
    out = []
    for item in text.split(","):
        item = item.strip()
        kind, at, rest = item.partition("@")
        parts = rest.split(":") if at else []
        rank = None
        if parts and parts[0].startswith("rank") and parts[0][4:].isdigit():
            rank = int(parts.pop(0)[4:])
        site = parts.pop(0) if parts else ""
        n = parts.pop(0) if parts else "1"
        if kind not in KINDS or site not in KINDS[kind] or parts or not n.isdigit():
            shapes = ", ".join(f"{k}@{s}:N" for k, sites in KINDS.items() for s in sites)
            raise ValueError(f"{ENV}={text!r}: cannot read {item!r}; expected KIND@[rankR:]SITE[:N], one of {shapes}")
        out.append(Fault(kind, site, int(n), rank))
    return out


PLAN: list[Fault] | None = parse(os.environ.get(ENV))


def configure(text: str | None) -> None:
    """Replace the plan (tests in one process); None or "" turns every fault off."""
    global PLAN
    PLAN = parse(text)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def fire(kind: str, site: str, at: int | None = None) -> bool:
    """Whether fault ``kind@site`` fires now: the N-th call of a counted site, or ``at == N``.

    Callers test ``PLAN is not None`` first, so an unset switch costs nothing more.
    """
    if PLAN is None:
        return False
    for f in PLAN:
        if f.kind != kind or f.site != site or f.fired or (f.rank is not None and f.rank != _rank()):
            continue
        if site in COUNTED:
            f.calls += 1
            hit = f.calls == f.n
        else:
            hit = at == f.n
        if hit:
            f.fired = True
            return True
    return False


def worker_fault(index: int) -> None:
    """In a DataLoader worker process, act out ``die@worker:I`` / ``hang@worker:I`` for sample ``index``."""
    if PLAN is None:
        return
    import torch.utils.data

    if torch.utils.data.get_worker_info() is None:  # the main process: a fault meant for a worker never fires here
        return
    if fire("die", "worker", at=index):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    if fire("hang", "worker", at=index):
        import time

        while True:  # asleep, still terminable (the loader's shutdown ends it)
            time.sleep(3600)


def enospc(what: str = "") -> OSError:
    """The error a full disk raises, as the injected faults raise it."""
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + (f" (injected: {what})" if what else ""))


class FillsUp:
    """A file wrapper whose writes fail with ENOSPC once ``limit`` bytes went through (the rest is dropped)."""

    def __init__(self, f, limit: int = 4096, what: str = ""):
        self.f, self.limit, self.what, self.written = f, limit, what, 0

    def write(self, data) -> int:
        room = self.limit - self.written
        if len(data) > room:
            if room > 0:
                self.f.write(bytes(data[:room]) if not isinstance(data, str) else data[:room])
                self.f.flush()
            self.written = self.limit
            raise enospc(self.what)
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)
