"""The training step with the live loader against the same step on a fixed batch, in ONE process.

    python benchmarks/diagnostics/loader_step_ab.py peer|demo [OUT.json] [--rounds N] [--steps K] [key=value ...]

``peer``: the settings of ``fastssl-bench peer``'s fastssl arm (SimCLR, ResNet-18, 96 px, batch 128,
2 workers, ``/tmp/pb224/train.beton`` or ``--beton``); ``demo``: ``configs/demo/simclr.yaml`` on
``data/demo/train.beton``. One :class:`~fastssl.engine.TrainCore` runs blocks of K steps taking their
batch from the loader (``live``) or reusing one batch (``fixed``), alternating ABBA over N rounds, so
machine drift hits both alike; the loader's threads exist in both (idle in ``fixed`` once its queue is
full). Reports images/s of each, their ratio, the live data wait, and the share of CPU time the whole
machine idled in each (``/proc/stat``). Environment variables (``NUMBA_THREADING_LAYER``,
``OMP_WAIT_POLICY``, ...) act as usual and are recorded.

Separate fresh processes of the same step spread by up to 15% on cpu2 (BENCHMARKS.md, sessions 8-9),
more than the effect sought; within one process the two sources are compared on the same allocator,
the same weight-gradient choices and the same moment.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _idle() -> tuple[int, int]:
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return v[3] + v[4], sum(v)  # idle + iowait, all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setting", choices=["peer", "demo"])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=0, help="steps per block (default: peer 3, demo 40)")
    ap.add_argument("--beton", default="/tmp/pb224/train.beton", help="peer: the photos' .beton")
    a, overrides = ap.parse_known_args(argv)

    import torch

    from fastssl.config import derive, load_config
    from fastssl.engine import TrainCore, make_accelerator, train_step
    from fastssl.pipelines import Batch
    from fastssl.pipelines.loader import build_loader

    if a.setting == "peer":
        from fastssl.cli.bench_peer import fastssl_overrides

        spec = dict(method="simclr", steps=12, warmup=3, steps_per_epoch=7, source=a.beton, backend="ffcv",
                    workers=2, size=96, local_size=41, arch="resnet18", batch=128, precision="fp32", compile="off",
                    device="cpu", seed=0)
        cfg = load_config(None, fastssl_overrides(spec) + overrides)
        k = a.steps or 3
    else:
        cfg = load_config("configs/demo/simclr.yaml", overrides)
        k = a.steps or 40
    dev = torch.device("cpu")
    batch = cfg.optim.batch_size
    loader = build_loader(cfg.data, cfg.aug.resolved_views(), "train", batch, dev, seed=cfg.train.seed,
                          workers=cfg.data.workers, backend=cfg.data.backend, train=True, drop_last=True,
                          dtype=torch.float32)
    threads = max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)  # as the trainer (one process): ffcv's import set 1
    cfg.train.out_dir = "/tmp/fastssl-ab-runs"
    acc = make_accelerator(cfg, dev)
    d = derive(cfg, num_samples=loader.num_samples)
    core = TrainCore(cfg, d, acc)
    core.model.train()

    def batches():
        ep = 0
        while True:
            loader.set_epoch(ep)
            yield from loader
            ep += 1

    live = batches()
    first = next(live)
    fixed = Batch(views=[v.clone() for v in first.views], labels=None, indices=first.indices)
    step = 0

    def run(src: str, n: int) -> list[tuple[float, float]]:
        nonlocal step
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            b = next(live) if src == "live" else fixed
            tw = time.perf_counter() - t0
            train_step(core, [b], step % d.total_steps)
            step += 1
            out.append((time.perf_counter() - t0, tw))
        return out

    run("fixed", k)  # warm-up: weight-gradient choices, allocator, the loader's queue
    run("live", k)
    res: dict = {"fixed": [], "live": []}
    idle = {"fixed": [0, 0], "live": [0, 0]}
    for r in range(a.rounds):
        for src in (("fixed", "live") if r % 2 == 0 else ("live", "fixed")):
            i0, t0 = _idle()
            res[src] += run(src, k)
            i1, t1 = _idle()
            idle[src][0] += i1 - i0
            idle[src][1] += t1 - t0
    ips = {s: batch * len(v) / sum(t for t, _ in v) for s, v in res.items()}
    out = {
        "diagnostic": "loader_step_ab", "setting": a.setting, "overrides": overrides, "rounds": a.rounds,
        "steps_per_block": k, "batch": batch, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "env": {v: os.environ.get(v) for v in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "images_per_second": {s: round(v, 2) for s, v in ips.items()},
        "live_over_fixed": round(ips["live"] / ips["fixed"], 4),
        "live_data_wait_fraction": round(sum(w for _, w in res["live"]) / sum(t for t, _ in res["live"]), 4),
        "machine_idle_fraction": {s: round(v[0] / max(v[1], 1), 4) for s, v in idle.items()},
    }
    from fastssl.benchmarking import write_json

    print(write_json(out, a.out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
