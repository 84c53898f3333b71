# Diagnostic (issue 12, session 9): where a CPU training step's threads spend the wall time, with the live ffcv
# loader or with one fixed random batch (mode "fixed": no loader built). ResNet-18 SimCLR, 96 px, batch 128, fp32,
# the peer benchmark's settings; 7 warm steps (one epoch), then one measured epoch of 7 steps. Per thread: CPU
# seconds and voluntary / involuntary context switches (/proc/self/task); the batch waits.
# Usage: python benchmarks/diagnostics/cpu_step_threads.py fixed|live BETON [OUT.json]
import json, os, sys, threading, time

import torch

from fastssl.cli.bench_peer import fastssl_overrides
from fastssl.config import derive, load_config
from fastssl.engine import TrainCore, make_accelerator, train_step
from fastssl.pipelines import Batch

mode, beton = sys.argv[1], sys.argv[2]
spec = dict(method="simclr", steps=12, warmup=3, steps_per_epoch=7, source=beton, backend="ffcv", workers=2, size=96,
            local_size=41, arch="resnet18", batch=128, precision="fp32", compile="off", device="cpu", seed=0)
cfg = load_config(None, fastssl_overrides(spec) + ["train.out_dir=/tmp/fastssl-diag-runs"])
dev = torch.device("cpu")
if mode == "live":
    from fastssl.pipelines.loader import build_loader

    loader = build_loader(cfg.data, cfg.aug.resolved_views(), "train", 128, dev, seed=0, workers=2, backend="ffcv",
                          dtype=torch.float32)
    epoch = lambda e: (loader.set_epoch(e), iter(loader))[1]  # noqa: E731
else:
    g = torch.Generator().manual_seed(0)
    fixed = Batch(views=[torch.randn(128, 3, 96, 96, generator=g).contiguous(memory_format=torch.channels_last)
                         for _ in range(2)], labels=None, indices=torch.arange(128))
    epoch = lambda e: iter([fixed] * 7)  # noqa: E731
torch.set_num_threads(2)
core = TrainCore(cfg, derive(cfg, num_samples=128 * 1000), make_accelerator(cfg, dev))


def per_thread() -> dict:
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            f = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
            st = dict(l.split(":\t") for l in open(f"/proc/self/task/{t}/status").read().splitlines() if ":\t" in l)
        except OSError:  # the thread ended
            continue
        out[int(t)] = ((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"), int(st["voluntary_ctxt_switches"]),
                       int(st["nonvoluntary_ctxt_switches"]))
    return out


it = epoch(0)
for i in range(7):
    train_step(core, [next(it)], i)
c0, p0, t0 = per_thread(), sum(os.times()[:2]), time.perf_counter()
it, waits = epoch(1), []
for i in range(7, 14):
    tw = time.perf_counter()
    b = next(it)
    waits.append(round(time.perf_counter() - tw, 4))
    train_step(core, [b], i)
wall, proc, c1 = time.perf_counter() - t0, sum(os.times()[:2]) - p0, per_thread()
main = threading.get_native_id()
names = {t.native_id: t.name for t in threading.enumerate()}
threads = []
for tid, (cpu, vol, invol) in c1.items():
    a = c0.get(tid, (0.0, 0, 0))
    threads.append({"tid": tid, "name": "main" if tid == main else names.get(tid, "native"),
                    "cpu_s": round(cpu - a[0], 2), "voluntary": vol - a[1], "involuntary": invol - a[2]})
threads.sort(key=lambda r: -r["cpu_s"])
out = {"mode": mode, "wall_s": round(wall, 2), "images": 7 * 128, "images_per_second": round(7 * 128 / wall, 2),
       "process_cpu_s": round(proc, 2), "busy_fraction_of_2_cores": round(proc / (2 * wall), 3),
       "batch_wait_s": waits, "threads": [r for r in threads if r["cpu_s"] >= 0.01]}
print(json.dumps(out))
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write(json.dumps(out, indent=1))
