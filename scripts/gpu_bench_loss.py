"""Every GPU check and benchmark of the loss kernels in one call; prints JSON lines as results finish.

    python scripts/gpu_bench_loss.py                      # on a CUDA machine (scripts/gpu_check.sh runs it)
    python scripts/gpu_bench_loss.py --device cpu --small # CPU smoke run (Triton through the interpreter)

1. Checks: the Triton kernels against their references on the device, fp32 and bf16, shapes
   not multiples of the blocks: err(kernel) <= 2 * err(low-precision reference) + floor, errors
   measured against the fp64 reference, for outputs and gradients.
2. Benchmarks (``fastssl.cli.bench_loss.run``, side by side per shape), goal cases first:
   nt_xent fwd+bwd at N=8192/view, D=128, bf16 >= 2x the eager reference; N=65536/view runs
   where the eager reference runs out of memory; barlow_twins / vicreg at N=2048, D=8192 >= 3x
   the D x D reference.
Prints one JSON line per result as it finishes (a timeout keeps what was measured); ``--budget S``
starts no benchmark after S seconds. Exit status 1 when a check fails (goals are reported, not asserted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T0 = time.monotonic()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget", type=float, default=0, help="seconds: start no benchmark after this (0: no limit)")
    return p.parse_args(argv)


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def _check_rows(results, name, got, truth, low, floor):
    ok = True
    for k, (g, t, lo) in enumerate(zip(got, truth, low)):
        bound = 2 * _err(lo, t) + floor * max(1.0, t.double().abs().max().item())
        e = _err(g, t)
        ok &= e <= bound
        results.append({"check": name, "output": k, "err": e, "bound": bound, "ok": e <= bound})
    return ok


def checks(device: str, small: bool) -> tuple[list, bool]:
    import torch
    import torch.nn.functional as F

    from fastssl.kernels import contrastive as K
    from fastssl.kernels import covariance as C

    out, all_ok = [], True
    shapes = [(21, 24)] if small else [(333, 128), (257, 72)]
    for n, d in shapes:
        for dtype, floor in ((torch.float32, 1e-5), (torch.bfloat16, 1e-3)):
            for excl in (False, True):
                g = torch.Generator().manual_seed(n + d)
                i = torch.arange(n, device=device)
                pos, slf = torch.cat([i + n, i]), torch.cat([i, i + n])
                z = F.normalize(torch.randn(2 * n, d, generator=g, dtype=torch.float64), dim=1).to(device)
                w1, w2 = torch.rand(2 * n, generator=g).to(device), torch.rand(2 * n, generator=g).to(device)

                def run(fn, x, ww1, ww2):
                    a, c = x.clone().requires_grad_(), x.clone().requires_grad_()
                    loss, lse = fn(a, c, pos, slf, 10.0, excl)
                    ((loss * ww1).sum() + (lse * ww2).sum()).backward()
                    return [loss, lse, a.grad, c.grad]

                truth = run(K.contrastive_ce_ref, z, w1.double(), w2.double())
                low = run(K.contrastive_ce_ref, z.to(dtype), w1, w2)
                got = run(K.contrastive_ce, z.to(dtype), w1, w2)
                all_ok &= _check_rows(out, f"contrastive_ce n={n} d={d} {dtype} exclude_pos={excl}", got, truth, low,
                                      floor)
    cov_shapes = [(37, 100)] if small else [(37, 100), (300, 1000)]
    for n, d in cov_shapes:
        for dtype, floor in ((torch.float32, 1e-5), (torch.bfloat16, 1e-3)):
            g = torch.Generator().manual_seed(n * d)
            a = torch.randn(n, d, generator=g).to(device, dtype)
            b = (0.5 * a.float() + torch.randn(n, d, generator=g).to(device)).to(dtype)
            mu_a, mu_b = a.float().mean(0), b.float().mean(0)
            s_a, s_b = (torch.rand(d, generator=g) + 0.5).to(device), (torch.rand(d, generator=g) + 0.5).to(device)

            def run(fn, *xs):
                ins = [x.detach().clone().requires_grad_() for x in xs]
                v = fn(*ins)
                v.backward()
                return [v] + [x.grad for x in ins]

            def low_gram(a_, ma, sa, b_, mb, sb):  # the Gram path with its operands in the low dtype
                ap = ((a_.float() - ma) * sa).to(dtype)
                bp = ((b_.float() - mb) * sb).to(dtype)
                return ((ap @ ap.T).float() * (bp @ bp.T).float()).sum()

            args = (a, mu_a, s_a, b, mu_b, s_b)
            truth = run(C.cross_frob_ref, *(x.double() for x in args))
            low = run(low_gram, *args)
            got = run(C.cross_frob, *args)
            all_ok &= _check_rows(out, f"cross_frob n={n} d={d} {dtype}", got, truth, low, floor)
    return out, all_ok


def compiled_kernel_stats() -> list:
    """Registers, spills and shared memory of every compiled variant of our Triton kernels (sm_90 on H100)."""
    import triton

    from fastssl.kernels import contrastive as K
    from fastssl.kernels import covariance as C

    rows = []
    for mod in (K, C):
        for name in dir(mod):
            fn = getattr(mod, name)
            if not isinstance(fn, triton.runtime.JITFunction):
                continue
            caches = getattr(fn, "device_caches", None) or {}
            for dev, entry in caches.items():
                cache = entry[0] if isinstance(entry, (tuple, list)) else entry
                for key, k in cache.items():
                    md = getattr(k, "metadata", None)
                    rows.append({"kernel": f"{mod.__name__.split('.')[-1]}.{name}", "n_regs": getattr(k, "n_regs", None),
                                 "n_spills": getattr(k, "n_spills", None),
                                 "shared_bytes": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None),
                                 "num_stages": getattr(md, "num_stages", None), "target": str(getattr(md, "target", "")),
                                 "constants": str(key)[:300]})
    return rows


def benchmarks(device: str, small: bool, repeats: int | None, emit, deadline: float,
               part: str = "goals") -> tuple[list, dict]:
    """The goal cases first, then the extras; each result goes to ``emit`` as it finishes.

    N=65536/view: the eager reference is not run to its out-of-memory error (that allocation alone
    takes seconds and fragments the allocator); its need is the (2N)^2 fp32 logit matrix, compared with
    the device's memory.
    """
    import torch

    from fastssl.cli.bench_loss import impls_for, run

    if small:
        plan = [("nt_xent", 256, 32, "fp32", None), ("barlow_twins", 32, 512, "fp32", None)]
    else:
        plan = [("nt_xent", 8192, 128, "bf16", None),
                ("barlow_twins", 2048, 8192, "bf16", None), ("vicreg", 2048, 8192, "bf16", None),
                ("nt_xent", 65536, 128, "bf16", ["triton"])]
    if part == "extras":
        plan = [] if small else [("nt_xent", 8192, 128, "fp32", None), ("info_nce", 8192, 256, "bf16", None),
                                 ("barlow_twins", 2048, 8192, "fp32", None), ("vicreg", 2048, 8192, "fp32", None)]
    rows = []
    for loss, n, d, dtype, only in plan:
        if time.monotonic() > deadline:
            emit({"skipped": f"{loss} N={n} D={d} {dtype}", "reason": "--budget spent"})
            continue
        r = repeats or (2 if small else 5)
        row = run(loss, only or impls_for(loss), n, d, dtype, device, repeats=r, warmup=1)
        if only and "eager" not in only and device == "cuda":
            need = row.get("full_logit_matrix_fp32_bytes", 0)
            total = torch.cuda.get_device_properties(0).total_memory
            row["eager_estimate"] = {"needs_bytes_at_least": need, "device_bytes": total,
                                     "status": "oom" if need > total else "fits"}
        rows.append(row)
        emit({"benchmark": row, "t": round(time.monotonic() - T0, 1)})

    def find(loss, n, d, dtype):
        return next((x for x in rows if (x["loss"], x["batch"], x["dim"], x["dtype"]) == (loss, n, d, dtype)), None)

    def status(res, impl):
        return next((x.get("status") for x in res["results"] if x.get("impl") == impl), None) if res else None

    goals = {}
    if not small and part == "goals":
        r = find("nt_xent", 8192, 128, "bf16")
        s = r.get("speedup_vs_eager", {}).get("triton") if r else None
        goals["nt_xent_8192_bf16_triton_vs_eager>=2x"] = {"measured": s, "met": s is not None and s >= 2}
        r = find("nt_xent", 65536, 128, "bf16")
        eager = (r or {}).get("eager_estimate", {}).get("status")
        goals["nt_xent_65536_triton_runs_eager_ooms"] = {
            "triton": status(r, "triton"), "eager": f"{eager} (estimate: (2N)^2 fp32 logits vs device memory)",
            "met": status(r, "triton") == "ok" and eager == "oom"}
        for loss in ("barlow_twins", "vicreg"):
            r = find(loss, 2048, 8192, "bf16")
            s = r.get("speedup_vs_dxd", {}).get("triton") if r else None
            goals[f"{loss}_2048x8192_bf16_triton_vs_dxd>=3x"] = {"measured": s, "met": s is not None and s >= 3}
    return rows, goals


def main(argv=None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton creates the kernels
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; run with --device cpu --small for the smoke test"}))
        return 2
    env = {"torch": torch.__version__, "device": a.device, "small": a.small}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if a.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()

    def emit(rec):  # one JSON line per result, as it finishes: a timeout keeps what was measured
        print(json.dumps(rec), flush=True)

    emit({"env": env})
    deadline = time.monotonic() + (a.budget or 1e9)
    # The goal benchmarks first (compiling ~30 kernel variants for the checks took 60 s on an H200
    # and left no time for timings), then the checks, then the extra benchmarks.
    rows, goals = benchmarks(a.device, a.small, a.repeats, emit, deadline, part="goals")
    ok = True
    if env["triton"]:
        check_rows, ok = checks(a.device, a.small)
        emit({"checks_ok": ok, "checks": check_rows, "t": round(time.monotonic() - T0, 1)})
    if a.device == "cuda" and env["triton"]:
        try:  # after the checks compiled every variant; Triton's cache layout differs between versions
            emit({"kernels_compiled": compiled_kernel_stats()})
        except Exception as e:  # noqa: BLE001
            emit({"kernels_compiled_error": f"{type(e).__name__}: {e}"})
    benchmarks(a.device, a.small, a.repeats, emit, deadline, part="extras")
    emit({"goals": goals, "checks_ok": ok, "t": round(time.monotonic() - T0, 1)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
