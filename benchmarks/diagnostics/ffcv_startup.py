"""What a fresh process pays before its first ffcv batch: import, loader build, first batch (compiles).

    python benchmarks/diagnostics/ffcv_startup.py [OUT.json] [--beton data/demo/train.beton]
        [--config configs/demo/simclr.yaml]

Run it in a fresh process each time (that is the point). Besides the three wall times it lists the
numba compilations over 0.3 s (numba's ``numba:compile`` events, inclusive of what they compile
inside), so a change to the decoder or to ffcv's import shows where the seconds went. The first run
after the decode kernel's source changes compiles it (``pipelines/ffcv_decode.py``) and writes numba's
disk cache; later runs load it.

What it shows: the seconds a new training or evaluation process waits before ffcv's first batch.
On cpu2 (2026-11-27, the demo's loader, numba's cache warm: ``benchmarks/results/ffcv_startup_cpu2.json``)
import ffcv 0.18 s, build the loader 0.21 s, first batch 2.37 s (BENCHMARKS.md, "Loader").
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--config", default="configs/demo/simclr.yaml")
    ap.add_argument("--beton", default="data/demo/train.beton")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch
    from numba.core import event as ev

    from fastssl.config import load_config
    rec = ev.RecordingListener()
    ev.register("numba:compile", rec)
    t0 = time.perf_counter()
    from fastssl.pipelines.ffcv_compat import import_ffcv

    import_ffcv()
    t1 = time.perf_counter()
    from fastssl.pipelines.loader import build_loader

    cfg = load_config(a.config, [f"data.train={a.beton}"])
    loader = build_loader(cfg.data, cfg.aug.resolved_views(), "train", cfg.optim.batch_size, torch.device("cpu"),
                          seed=0, workers=a.workers, backend="ffcv", dtype=torch.float32)
    t2 = time.perf_counter()
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    t3 = time.perf_counter()
    next(it)
    t4 = time.perf_counter()
    stack, compiles = [], []
    for ts, e in rec.buffer:
        name = e.data["dispatcher"].py_func.__qualname__ if "dispatcher" in e.data else "?"
        if e.is_start:
            stack.append((name, ts))
        elif stack:
            n, s = stack.pop()
            if ts - s > 0.3:
                compiles.append({"function": n, "seconds": round(ts - s, 2), "depth": len(stack)})
    out = {"diagnostic": "ffcv_startup", "beton": a.beton, "config": a.config, "workers": a.workers,
           "seconds": {"torch_and_fastssl_imports": round(t0 - t_start, 2), "import_ffcv": round(t1 - t0, 2),
                       "build_loader": round(t2 - t1, 2), "first_batch": round(t3 - t2, 2),
                       "second_batch": round(t4 - t3, 3)},
           "numba_compiles_over_0.3s": compiles}
    from fastssl.benchmarking import write_json

    print(write_json(out, a.out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
