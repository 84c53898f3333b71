"""Every GPU check and benchmark of the loss kernels in one call; prints JSON lines as results finish.

    python scripts/gpu_bench_loss.py                      # on a CUDA machine (scripts/gpu_check.sh runs it)
    python scripts/gpu_bench_loss.py --device cpu --small # CPU smoke run (Triton through the interpreter)

Correctness on the GPU is not checked here: the kernel tests' ``cuda`` cases do it (pytest -m cuda
tests/test_kernels_*.py, the first step of scripts/gpu_check.sh), with their tolerances.

Benchmarks (``fastssl.cli.bench_loss.run``, side by side per shape), goal cases first:
   nt_xent fwd+bwd at N=8192/view, D=128, bf16 >= 2x the eager reference; N=65536/view runs
   where the eager reference runs out of memory; barlow_twins / vicreg at N=2048, D=8192 >= 3x
   the D x D reference.
Prints one JSON line per result as it finishes (a timeout keeps what was measured); ``--budget S``
starts no benchmark after S seconds. Exit status 1 when an implementation errors (goals are reported,
not asserted: they are measurements). Also reports registers, spills and shared memory per compiled kernel.
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
    # The goal benchmarks first, then the kernels' compile statistics, then the extras. The kernels'
    # correctness on the GPU is tests/test_kernels_*.py's `cuda` cases (gpu_check.sh runs them first).
    rows, goals = benchmarks(a.device, a.small, a.repeats, emit, deadline, part="goals")
    if a.device == "cuda" and env["triton"]:
        try:  # Triton's cache layout differs between versions
            emit({"kernels_compiled": compiled_kernel_stats()})
        except Exception as e:  # noqa: BLE001
            emit({"kernels_compiled_error": f"{type(e).__name__}: {e}"})
    benchmarks(a.device, a.small, a.repeats, emit, deadline, part="extras")
    emit({"goals": goals, "t": round(time.monotonic() - T0, 1)})
    ok = all(r.get("status") in ("ok", "oom", "skipped") for row in rows for r in row["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
