# Diagnostic (issue 12, sessions 9 and 11): oneDNN's weight gradient against each rewrite (fastssl/models/cpu_conv.py:
# the GEMM, the forward conv in channels_last and NCHW memory) on each
# conv shape of a ResNet-18 SimCLR step at 96 px, batch 128, 2 threads: 7 interleaved repeats after a warm call.
# Usage: python benchmarks/diagnostics/cpu_wgrad_shapes.py [OUT.json]
import json, statistics, sys, time

import torch
import torch.nn.functional as F

from fastssl.models.cpu_conv import ALTERNATIVES, _onednn_backward, _wgrad, choose

torch.set_num_threads(2)
B, CL = 128, torch.channels_last
SHAPES = [(3, 64, 96, 7, 2, 3), (64, 64, 24, 3, 1, 1), (64, 128, 24, 3, 2, 1), (64, 128, 24, 1, 2, 0),
          (128, 128, 12, 3, 1, 1), (128, 256, 12, 3, 2, 1), (128, 256, 12, 1, 2, 0), (256, 256, 6, 3, 1, 1),
          (256, 512, 6, 3, 2, 1), (256, 512, 6, 1, 2, 0), (512, 512, 3, 3, 1, 1)]
rows = []
for cin, cout, hw, k, s, p in SHAPES:
    x = torch.randn(B, cin, hw, hw).contiguous(memory_format=CL)
    w = torch.randn(cout, cin, k, k)
    g = torch.randn(F.conv2d(x, w, None, s, p).shape).contiguous(memory_format=CL)
    fns = {"onednn": lambda: _onednn_backward(g, x, w, (s, s), (p, p), False, True)}
    fns.update({how: (lambda how=how: _wgrad(how, g, x, w, (s, s), (p, p))) for how in ALTERNATIVES})
    for f in fns.values():
        f()
    t = {n: [] for n in fns}
    for _ in range(7):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            t[n].append(time.perf_counter() - t0)
    row = {"cin": cin, "cout": cout, "side": hw, "k": k, "stride": s,
           **{f"{n}_ms_median": round(1000 * statistics.median(v), 1) for n, v in t.items()},
           **{f"{n}_ms_best": round(1000 * min(v), 1) for n, v in t.items()},
           "choice_margin_0.15": choose({n: min(v) for n, v in t.items()})}
    rows.append(row)
    print(row, flush=True)
out = {"benchmark": "cpu_wgrad_shapes", "batch": B, "threads": torch.get_num_threads(), "torch": torch.__version__,
       "rows": rows}
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(out, indent=1))
