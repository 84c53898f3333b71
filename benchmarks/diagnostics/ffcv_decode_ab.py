"""The ffcv decoder of an earlier commit against the current one, alternating epochs in ONE process.

    python benchmarks/diagnostics/ffcv_decode_ab.py COMMIT [OUT.json] [--recipe simclr|dino] [--rounds 6]
        [--beton /tmp/pb224/train.beton]

``COMMIT``'s ``pipelines/ffcv_backend.py`` is loaded as a separate module beside the installed one
(its imports resolve to the current package), both build a loader on the same ``.beton`` (views
at 224 px, locals at 96; 2 workers; no photometric stage), both compile and decode one batch, then
timed epochs of 12 batches of 64 alternate ABBA. Decode + crop images/s of each, median over rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commit")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--recipe", default="simclr")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--beton", default="/tmp/pb224/train.beton")
    a = ap.parse_args(argv)
    import numpy as np

    from fastssl.pipelines import ffcv_backend as current
    from fastssl.pipelines.recipes import preset

    root = Path(__file__).resolve().parents[2]
    src = subprocess.run(["git", "-C", str(root), "show", f"{a.commit}:pipelines/ffcv_backend.py"], capture_output=True,
                         text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "ffcv_backend_then.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("ffcv_backend_then", tmp)
    then = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(then)
    views = preset(a.recipe)
    for v in views:
        v.size = 96 if v.local else 224
    loaders = {name: mod.FFCVLoader(a.beton, views, 64, "cpu", seed=0, workers=2, train=True, finisher=None)
               for name, mod in (("then", then), ("now", current))}
    for ld in loaders.values():  # compile and warm
        ld.set_epoch(0)
        next(iter(ld))
    res: dict = {"then": [], "now": []}
    epoch = 1
    for r in range(a.rounds):
        for name in (("then", "now") if r % 2 == 0 else ("now", "then")):
            ld = loaders[name]
            ld.set_epoch(epoch)
            epoch += 1
            t0, n = time.perf_counter(), 0
            for b in ld:
                n += b.views[0].shape[0]
                if n >= 64 * 12:
                    break
            res[name].append(n / (time.perf_counter() - t0))
    med = {k: float(np.median(v)) for k, v in res.items()}
    out = {"diagnostic": "ffcv_decode_ab", "commit_then": a.commit, "recipe": a.recipe, "beton": a.beton,
           "median_images_per_second": {k: round(v, 1) for k, v in med.items()},
           "now_over_then": round(med["now"] / med["then"], 3),
           "rounds_images_per_second": {k: [round(x, 1) for x in v] for k, v in res.items()}}
    from fastssl.benchmarking import write_json

    print(write_json(out, a.out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
