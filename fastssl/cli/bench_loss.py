"""``fastssl-bench loss``: forward+backward time and peak memory of each loss implementation, side by side.

    fastssl-bench loss --loss nt_xent --batch 8192 --dim 128 --dtype bf16 --impl all --json

Implementations (``--impl all`` runs every one that applies, in one run):

* ``eager``  contrastive losses: the textbook full (2N x 2N) logit matrix (``contrastive_ce_ref``);
* ``dxd``    covariance losses: the official D x D cross-covariance (``path="dxd"``);
* ``torch``  our torch path (chunked rows with recomputation / the Gram identity);
* ``triton`` our fused kernels (CUDA only here: on CPU the interpreter is far too slow to time).

Time: median over ``--repeats`` timed fwd+bwd calls after ``--warmup`` untimed ones
(``torch.cuda.synchronize`` around each on CUDA). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the call (inputs excluded);
on CPU each implementation runs in a fresh child process and reports the growth of its peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the warm-up and timed calls, measured
from after the inputs were created. An implementation that runs out of memory reports ``"oom"``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONTRASTIVE = ("nt_xent", "info_nce")
COVARIANCE = ("vicreg", "barlow_twins")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def impls_for(loss: str) -> list[str]:
    return ["eager", "torch", "triton"] if loss in CONTRASTIVE else ["dxd", "torch", "triton"]


def loss_fn(loss: str, impl: str):
    """f(z1, z2) -> scalar for one implementation of one loss."""
    from fastssl import losses

    if impl == "eager":  # the full-matrix reference on the same layout as losses.nt_xent / info_nce
        from fastssl.kernels.contrastive import contrastive_ce_ref
        import torch.nn.functional as F

        def eager(z1, z2):
            n = z1.shape[0]
            i = torch.arange(n, device=z1.device)
            if loss == "nt_xent":
                z = F.normalize(torch.cat([z1, z2]).float(), dim=1).to(z1.dtype)
                rows, _ = contrastive_ce_ref(z, z, torch.cat([i + n, i]), torch.cat([i, i + n]), 10.0)
            else:
                q, k = F.normalize(z1.float(), dim=1).to(z1.dtype), F.normalize(z2.float(), dim=1).to(z1.dtype)
                rows, _ = contrastive_ce_ref(q, k, i, torch.full_like(i, -1), 10.0)
            return rows.mean()

        return eager
    fn = getattr(losses, loss)
    if loss in CONTRASTIVE:
        return lambda z1, z2: fn(z1, z2, 0.1, impl=impl, gather=False)
    if impl == "dxd":
        return lambda z1, z2: fn(z1, z2, impl="torch", path="dxd", gather=False)
    return lambda z1, z2: fn(z1, z2, impl=impl, path="gram", gather=False)


def measure(loss: str, impl: str, n: int, d: int, dtype: str, device: str, repeats: int = 5,
            warmup: int = 1) -> dict:
    """Time and peak memory of fwd+bwd in this process (CPU memory: valid only in a fresh process)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    z1 = torch.randn(n, d, generator=g).to(dev, DTYPES[dtype]).requires_grad_()
    z2 = (0.5 * z1.detach().float() + torch.randn(n, d, generator=g).to(dev)).to(DTYPES[dtype]).requires_grad_()
    fn = loss_fn(loss, impl)
    import fastssl.kernels.contrastive  # noqa: F401  (imports outside the measurement)
    import fastssl.kernels.covariance  # noqa: F401
    small = torch.randn(4, d, device=dev, dtype=DTYPES[dtype], requires_grad=True)
    fn(small, small.detach() + 1).backward()                          # first-call library set-up, not measured
    out = {"loss": loss, "impl": impl, "batch": n, "dim": d, "dtype": dtype, "device": device}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    try:
        from fastssl.benchmarking import Timer

        for it in range(warmup + repeats):
            z1.grad = z2.grad = None
            if cuda:
                torch.cuda.synchronize()
            with Timer(dev) as t:  # CUDA events on a GPU
                v = fn(z1, z2)
                v.backward()
            if it >= warmup:
                times.append(t.seconds())
            value = float(v.detach())
    except torch.OutOfMemoryError:
        out.update(status="oom")
        return out
    out.update(status="ok", value=value, median_ms=1e3 * statistics.median(times),
               times_ms=[round(1e3 * t, 3) for t in times], repeats=repeats, warmup=warmup)
    if cuda:
        out.update(peak_mem_bytes=torch.cuda.max_memory_allocated() - base,
                   mem_method="torch.cuda.max_memory_allocated minus allocation before the call")
    else:
        out.update(peak_mem_bytes=1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0),
                   mem_method="peak RSS growth (ru_maxrss) in a fresh process, after inputs were created")
    return out


def measure_isolated(loss, impl, n, d, dtype, device, repeats, warmup) -> dict:
    """CPU: run ``measure`` in a fresh child process so its peak RSS belongs to this implementation alone."""
    args = [sys.executable, "-m", "fastssl.cli.bench_loss", "--_child", "--loss", loss, "--impl", impl,
            "--batch", str(n), "--dim", str(d), "--dtype", dtype, "--device", device,
            "--repeats", str(repeats), "--warmup", str(warmup)]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        killed = p.returncode < 0 or "MemoryError" in p.stderr or "alloc" in p.stderr.lower()
        return {"loss": loss, "impl": impl, "batch": n, "dim": d, "dtype": dtype, "device": device,
                "status": "oom" if killed else "error", "error": p.stderr.strip().splitlines()[-1:] or [str(p.returncode)]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(loss: str, impls: list[str], n: int, d: int, dtype: str, device: str, repeats: int, warmup: int) -> dict:
    """Every requested implementation in one run, plus the ratios of the baseline's time to each."""
    rows = []
    for impl in impls:
        if impl == "triton" and device != "cuda":
            rows.append({"impl": impl, "status": "skipped", "reason": "Triton is timed on CUDA only"})
            continue
        if device == "cpu":
            rows.append(measure_isolated(loss, impl, n, d, dtype, device, repeats, warmup))
        else:
            rows.append(measure(loss, impl, n, d, dtype, device, repeats, warmup))
            torch.cuda.empty_cache()
    res = {"loss": loss, "batch": n, "dim": d, "dtype": dtype, "device": device, "results": rows}
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    base = next((r for r in rows if r.get("impl") in ("eager", "dxd") and r.get("status") == "ok"), None)
    if base:
        res["speedup_vs_" + base["impl"]] = {r["impl"]: round(base["median_ms"] / r["median_ms"], 3)
                                             for r in rows if r.get("status") == "ok"}
    if loss in CONTRASTIVE:
        m = 2 * n if loss == "nt_xent" else n
        res["full_logit_matrix_fp32_bytes"] = 4 * m * m                 # what one M x M fp32 buffer would take
    return res


# ----------------------------------------------------------------------------- suites (--suite gpu|smoke)


def eager_need(rows: list, row: dict) -> tuple[int, str]:
    """``(bytes, basis)``: what the eager path would need for ``row``'s case, which was not run eagerly.

    Eager's memory grows with the logit matrix, (2N)^2: its measured peak at the largest N of the same
    loss, width and dtype among ``rows`` is scaled. The eager path holds several (2N)^2 buffers at once
    (the bf16 product, its fp32 copy, the scaled and masked logits, the mask), so one fp32 matrix
    (``full_logit_matrix_fp32_bytes``) is only a lower bound, used where no eager peak was measured.
    """
    def eager_peak(x):
        return next((r.get("peak_mem_bytes") for r in x.get("results", [])
                     if r.get("impl") == "eager" and r.get("status") == "ok"), None)

    same = [x for x in rows if (x["loss"], x["dim"], x["dtype"]) == (row["loss"], row["dim"], row["dtype"])
            and eager_peak(x)]
    ref = max(same, key=lambda x: x["batch"], default=None)
    if ref is None:
        return row.get("full_logit_matrix_fp32_bytes", 0), "one fp32 logit matrix (a lower bound)"
    peak = eager_peak(ref)
    scale = (row["batch"] / ref["batch"]) ** 2
    return int(peak * scale), f"eager peak at N={ref['batch']} x {scale:g}"


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


def _suite_part(device: str, small: bool, repeats: int | None, emit, deadline: float,
               part: str = "goals", t0: float = 0.0) -> tuple[list, dict]:
    """The goal cases first, then the extras; each result goes to ``emit`` as it finishes.

    N=65536/view: the eager reference is not run to its out-of-memory error (that allocation alone
    takes seconds and fragments the allocator); its need is the (2N)^2 fp32 logit matrix, compared with
    the device's memory.
    """
    import torch

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
            need, basis = eager_need(rows, row)
            total = torch.cuda.get_device_properties(0).total_memory
            row["eager_estimate"] = {"needs_bytes": need, "basis": basis, "device_bytes": total,
                                     "status": "oom" if need > total else "fits"}
        rows.append(row)
        emit({"benchmark": row, "t": round(time.monotonic() - t0, 1)})

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
            "triton": status(r, "triton"),
            "eager": f"{eager} (estimate: {(r or {}).get('eager_estimate', {}).get('basis')} vs device memory)",
            "met": status(r, "triton") == "ok" and eager == "oom"}
        for loss in ("barlow_twins", "vicreg"):
            r = find(loss, 2048, 8192, "bf16")
            s = r.get("speedup_vs_dxd", {}).get("triton") if r else None
            goals[f"{loss}_2048x8192_bf16_triton_vs_dxd>=3x"] = {"measured": s, "met": s is not None and s >= 3}
    return rows, goals


def run_suite(device: str, small: bool, repeats: int | None = None, budget: float = 0, emit=None) -> dict:
    """The GPU figures (``small``: a CPU smoke of the same path): goal cases, then the kernels' compile
    statistics, then the extras; one JSON line per result via ``emit`` as it finishes. Correctness is the
    kernel tests' (``pytest -m cuda tests/test_kernels_*.py``), not repeated here."""
    emit = emit or (lambda rec: print(json.dumps(rec), flush=True))
    t0 = time.monotonic()
    deadline = t0 + (budget or 1e9)
    env = {"torch": torch.__version__, "device": device, "small": small}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    emit({"env": env})
    rows, goals = _suite_part(device, small, repeats, emit, deadline, part="goals", t0=t0)
    if device == "cuda" and env["triton"]:
        try:  # Triton's cache layout differs between versions
            emit({"kernels_compiled": compiled_kernel_stats()})
        except Exception as e:  # noqa: BLE001
            emit({"kernels_compiled_error": f"{type(e).__name__}: {e}"})
    rows += _suite_part(device, small, repeats, emit, deadline, part="extras", t0=t0)[0]
    emit({"goals": goals, "t": round(time.monotonic() - t0, 1)})
    return {"env": env, "rows": rows, "goals": goals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastssl-bench loss", description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=CONTRASTIVE + COVARIANCE)
    p.add_argument("--batch", type=int, default=4096, help="N per view")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--impl", default="all", choices=["all", "eager", "dxd", "torch", "triton"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--suite", choices=["gpu", "smoke"], help="the GPU figures and goals (smoke: a tiny CPU run of the "
                   "same path), one JSON line per result")
    p.add_argument("--budget", type=float, default=0, help="--suite: start no benchmark after this many seconds")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible; use --device cpu")
    if a.suite:
        if a.suite == "smoke":
            import os

            os.environ.setdefault("TRITON_INTERPRET", "1")
            device = "cpu"
        res = run_suite(device, a.suite == "smoke", a.repeats if a.repeats != 5 else None, a.budget)
        ok = all(r.get("status") in ("ok", "oom", "skipped") for row in res["rows"] for r in row["results"])
        return 0 if ok else 1
    if not a.loss:
        p.error("--loss is required (or --suite gpu|smoke)")
    if a._child:
        print(json.dumps(measure(a.loss, a.impl, a.batch, a.dim, a.dtype, device, a.repeats, a.warmup)))
        return 0
    valid = impls_for(a.loss)
    if a.impl != "all" and a.impl not in valid:
        p.error(f"--impl {a.impl} does not apply to {a.loss}; choose from {valid} or all")
    impls = valid if a.impl == "all" else [a.impl]
    res = run(a.loss, impls, a.batch, a.dim, a.dtype, device, a.repeats, a.warmup)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res["results"]:
            if r.get("status") == "ok":
                print(f"{a.loss:>13} {r['impl']:>7}  N={a.batch} D={a.dim} {a.dtype}: {r['median_ms']:9.2f} ms  "
                      f"peak {r['peak_mem_bytes'] / 2**20:9.1f} MiB")
            else:
                print(f"{a.loss:>13} {r['impl']:>7}  {r.get('status')}: {r.get('reason') or r.get('error', '')}")
        for k, v in res.items():
            if k.startswith("speedup"):
                print(k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
