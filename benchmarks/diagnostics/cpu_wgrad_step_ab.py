"""The CPU training step with each set of weight-gradient choices (``fastssl/models/cpu_conv.py``), in ONE process.

    python benchmarks/diagnostics/cpu_wgrad_step_ab.py [OUT.json] [--rounds N] [--steps K] [key=value ...]

The ``fastssl-bench peer`` fastssl arm's model and batch (SimCLR, ResNet-18, 96 px, batch 128, SGD,
fp32; random views). The first step times every candidate on every convolution shape, as
``train.cpu_conv_wgrad=auto`` does (into a throw-away cache directory). From those same timings,
three sets of choices are made: oneDNN's everywhere; the fastest of oneDNN's and the GEMM
(the candidates before the forward-convolution rewrite); the fastest of all (``gemm``, ``conv``,
``conv_nchw``, what ``auto`` chooses from). The step then
runs blocks of K steps under each set, in rotating order over N rounds, so machine drift hits all
alike. Reports images/s and CPU ms per image of each set, their ratios, and the per-shape choices
and timings.

What it shows: whether ``train.cpu_conv_wgrad=auto`` pays on this CPU, free of the 5-15%
spread between fresh processes. On cpu2 (2026-11-27, ``--rounds 6``:
``benchmarks/results/cpu_wgrad_step_ab_s11.json``) all four candidates ran the step 1.045x
faster than oneDNN-or-GEMM and 1.106x faster than oneDNN alone (BENCHMARKS.md, "Step on the CPU").
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per block (one untimed step after each switch)")
    a, overrides = ap.parse_known_args(argv)
    os.environ["FASTSSL_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastssl-wgrad-ab-")  # time every shape here

    import torch

    from fastssl.cli.bench_peer import fastssl_overrides
    from fastssl.cli.bench_step import Variant
    from fastssl.models import cpu_conv

    spec = dict(method="simclr", steps=12, warmup=3, steps_per_epoch=7, source="unused.beton", backend="ffcv",
                workers=2, size=96, local_size=41, arch="resnet18", batch=128, precision="fp32", compile="off",
                device="cpu", seed=0)
    v = Variant("wgrad", None, fastssl_overrides(spec) + overrides, spec["batch"], torch.device("cpu"))
    batch = v.batch
    for _ in range(2):  # the first step times every shape (all candidates)
        v.step()
        float(v.last_loss)
    disk = cpu_conv._read_disk()
    ms = {k: disk[cpu_conv._disk_key(k)]["ms"] for k in cpu_conv._choice}

    def pick(cands):
        return {k: cpu_conv.choose({c: t[c] for c in ("onednn",) + cands}) for k, t in ms.items()}

    sets = {"onednn": {k: "onednn" for k in ms}, "onednn+gemm": pick(("gemm",)), "all": pick(cpu_conv.ALTERNATIVES)}
    res = {s: [0.0, 0.0, 0] for s in sets}
    names = list(sets)
    for r in range(a.rounds):
        for s in names[r % len(names):] + names[:r % len(names)]:
            cpu_conv._choice.update(sets[s])
            v.step()  # untimed: the first step after a switch
            float(v.last_loss)
            c0, t0 = _cpu(), time.perf_counter()
            for _ in range(a.steps):
                v.step()
                float(v.last_loss)
            res[s][0] += time.perf_counter() - t0
            res[s][1] += _cpu() - c0
            res[s][2] += a.steps
    ips = {s: batch * n / w for s, (w, c, n) in res.items()}

    def shape(k):
        (n, cin, h, _), (cout, _, kh, _), (st, _), _ = k
        return f"{cin}->{cout} {h}x{h} k{kh} s{st}"

    out = {
        "diagnostic": "cpu_wgrad_step_ab", "overrides": overrides, "rounds": a.rounds, "steps_per_block": a.steps,
        "batch": batch, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": cpu_conv._machine(),
        "images_per_second": {s: round(x, 2) for s, x in ips.items()},
        "cpu_ms_per_image": {s: round(1000 * c / (batch * n), 1) for s, (w, c, n) in res.items()},
        "all_over_onednn_gemm": round(ips["all"] / ips["onednn+gemm"], 4),
        "all_over_onednn": round(ips["all"] / ips["onednn"], 4),
        "shapes": [{"shape": shape(k), "ms": ms[k], **{f"choice_{s}": sets[s][k] for s in sets}} for k in ms],
    }
    from fastssl.benchmarking import write_json

    print(write_json(out, a.out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
