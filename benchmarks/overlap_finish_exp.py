# Issue 12 item 4: the trainer with the photometric stage overlapped with the step (default on the CPU) vs inside next().
# Fresh process per arm, interleaved rounds. Usage: python benchmarks/overlap_finish_exp.py [steps] [key=value ...]
import json, os, subprocess, sys, time
variants = {"overlap": "None", "inline": "False"}
code = """
import sys
from fastssl.pipelines.loader import LoaderBase
LoaderBase.overlap_finish = {flag}
import fastssl.train as T
sys.exit(T.main(['--config','configs/demo/simclr.yaml','train.name=ovl-{name}','train.resume=false','train.progress=false',
 'train.max_steps={steps}','eval.final=false','eval.every_epochs=0','train.out_dir=/tmp/exp_runs'{extra}]))
"""
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
extra = "".join(f",{a!r}" for a in sys.argv[2:])
res = {k: [] for k in variants}
for rnd in range(3):
    order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
    for name in order:
        p = subprocess.run(["nice", "-n", "-5", sys.executable, "-c", code.format(flag=variants[name], name=name, steps=steps, extra=extra)],
                           cwd="/work/main", capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        rows = [json.loads(l) for l in open(f"/tmp/exp_runs/ovl-{name}/metrics.jsonl") if '"train"' in l][3:]
        s = json.load(open(f"/tmp/exp_runs/ovl-{name}/summary.json"))
        ips = sum(r["images_per_second"] for r in rows) / len(rows)
        dw = sum(r["data_wait"] for r in rows) / len(rows)
        res[name].append({"img_s": round(ips, 1), "data_wait": round(dw, 3), "wall_seconds": round(s["wall_seconds"], 1)})
        print(rnd, name, res[name][-1], flush=True)
import statistics
med = {k: statistics.median(r["img_s"] for r in v) for k, v in res.items()}
print(json.dumps({"rounds": res, "median_img_s": med, "ratio_overlap_vs_inline": med["overlap"] / med["inline"]}))
