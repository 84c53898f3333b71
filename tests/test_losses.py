"""fastssl.losses against the papers' formulas and official code, both implementations, fp32 and bf16.

Chain per loss: a direct transcription (SimCLR's algorithm as loops; MoCo v2's, MoCo v3's, VICReg's
and Barlow Twins' official code) in fp64 -> ``impl="torch"`` and ``impl="triton"`` (interpreter),
values and gradients. Plus analytic cases, dispatch defaults, bad input and torch.compile.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from fastssl import losses

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not losses._has_triton(), reason="needs triton"))]


# ------------------------------------------------------------------------------------------------
# transcriptions of the papers (fp64)
# ------------------------------------------------------------------------------------------------
def ntxent_paper(z1, z2, t, decoupled=False):
    """SimCLR Algorithm 1, literally: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), mean over 2N."""
    z = [v for pair in zip(z1, z2) for v in pair]                  # z_{2k-1}, z_{2k} interleaved
    n2 = len(z)

    def sim(u, v):
        return (u @ v) / (u.norm() * v.norm())

    def l(i, j):
        denom = sum(torch.exp(sim(z[i], z[k]) / t) for k in range(n2) if k != i and not (decoupled and k == j))
        return -torch.log(torch.exp(sim(z[i], z[j]) / t) / denom)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


def mocov3_official(q, k, t, queue=None):
    """MoCo v3's contrastive_loss (without the 2t factor), in-batch keys + optional queue negatives."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = k if queue is None else torch.cat([k, F.normalize(queue, dim=1)])
    logits = q @ keys.T / t
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def off_diagonal(x):
    n, m = x.shape
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_official(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """facebookresearch/vicreg main_vicreg.py VICReg.forward (single process)."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum().div(d) + off_diagonal(cov_y).pow(2).sum().div(d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def barlow_official(z1, z2, lambd=0.0051):
    """facebookresearch/barlowtwins main.py BarlowTwins.forward (single process)."""
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False).to(z1.dtype).train()
    c = bn(z1).T @ bn(z2)
    c = c / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def _grads(fn, z1, z2, dtype, **kw):
    a = z1.detach().to(dtype).requires_grad_()
    b = z2.detach().to(dtype).requires_grad_()
    v = fn(a, b, **kw)
    v.backward()
    return v.detach().double(), a.grad.double(), b.grad.double()


def _close(got, want, low, floor):
    """flash-attention's rule per tensor: err(got) <= 2 * err(the official code in the same dtype) + floor,
    errors against the fp64 official value, floor relative to the largest entry (small gradients cannot
    pass as zeros)."""
    for name, g, w, lo in zip(["value", "grad z1", "grad z2"], got, want, low):
        err, err_low = (g - w).abs().max().item(), (lo - w).abs().max().item()
        bound = 2 * err_low + floor * w.abs().max().item()
        assert err <= bound, (name, err, err_low, bound)


def _pair(n, d, seed, corr=0.7):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = corr * z1 + torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1, z2


# rows: N, D, temperature, decoupled, dtype, floor
NTX = [
    (2, 8, 0.1, False, torch.float32, 1e-5),
    (5, 24, 0.07, True, torch.float32, 1e-5),
    (11, 17, 0.5, False, torch.float32, 1e-5),
    (7, 32, 0.2, False, torch.bfloat16, 1e-2),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,t,dec,dtype,floor", NTX)
def test_nt_xent_matches_simclr_algorithm(impl, n, d, t, dec, dtype, floor):
    z1, z2 = _pair(n, d, n * d)
    want = _grads(lambda a, b: ntxent_paper(a, b, t, dec), z1, z2, torch.float64)
    low = _grads(lambda a, b: ntxent_paper(a, b, t, dec), z1, z2, dtype)
    got = _grads(losses.nt_xent, z1, z2, dtype, temperature=t, decoupled=dec, impl=impl)
    _close(got, want, low, floor)
    terms = losses.nt_xent_terms(z1.to(dtype), z2.to(dtype), t, dec, impl=impl)
    torch.testing.assert_close(terms["alignment"] + terms["uniformity"], terms["loss"])


@pytest.mark.parametrize("impl", IMPLS)
def test_nt_xent_analytic_cases(impl):
    n = 6
    same = torch.ones(n, 4)                                         # all 2N rows equal: every logit 1/t
    assert math.isclose(float(losses.nt_xent(same, same, 0.3, impl=impl)), math.log(2 * n - 1), rel_tol=1e-5)
    assert math.isclose(float(losses.nt_xent(same, same, 0.3, decoupled=True, impl=impl)),
                        math.log(2 * n - 2), rel_tol=1e-5)
    eye = torch.eye(n) * 3.0                                        # pairs identical, pairs orthogonal
    t = 0.2
    want = -1 / t + math.log(math.exp(1 / t) + 2 * n - 2)
    assert math.isclose(float(losses.nt_xent(eye, eye, t, impl=impl)), want, rel_tol=1e-5)
    torch.testing.assert_close(losses.nt_xent_terms(eye, eye, t, impl=impl)["alignment"], torch.tensor(-1 / t))


# rows: N, D, queue size, temperature, dtype, floor
INCE = [
    (6, 16, 0, 0.2, torch.float32, 1e-5),
    (9, 24, 13, 0.1, torch.float32, 1e-5),
    (8, 32, 0, 0.2, torch.bfloat16, 1e-2),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,nq,t,dtype,floor", INCE)
def test_info_nce_matches_mocov3(impl, n, d, nq, t, dtype, floor):
    z1, z2 = _pair(n, d, 3 * n + d)
    queue = torch.randn(nq, d, dtype=torch.float64) if nq else None
    want = _grads(lambda a, b: mocov3_official(a, b, t, queue), z1, z2, torch.float64)
    low = _grads(lambda a, b: mocov3_official(a, b, t, None if queue is None else queue.to(dtype)), z1, z2, dtype)
    # batch_negatives=True: with a queue, the in-batch keys stay negatives (the variant this transcription has)
    got = _grads(lambda a, b: losses.info_nce(a, b, t, queue=None if queue is None else queue.to(dtype),
                                              batch_negatives=True, impl=impl), z1, z2, dtype)
    _close(got, want, low, floor)


# rows: N, D, path, dtype, floor
COV = [
    (2, 8, "auto", torch.float32, 1e-5),
    (16, 40, "gram", torch.float32, 1e-5),
    (40, 16, "auto", torch.float32, 1e-5),                   # N > D: the D x D path
    (33, 130, "gram", torch.float32, 1e-5),
    (33, 130, "dxd", torch.float32, 1e-5),
    (20, 64, "auto", torch.bfloat16, 1e-2),
    (24, 2048, "auto", torch.float32, 1e-5),
    (300, 100, "gram", torch.float32, 1e-5),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,path,dtype,floor", COV)
def test_vicreg_matches_official(impl, n, d, path, dtype, floor):
    z1, z2 = _pair(n, d, n + 7 * d)
    z1 = z1 * 0.3                                                   # some dims under std 1: the hinge is active
    want = _grads(vicreg_official, z1, z2, torch.float64)
    low = _grads(vicreg_official, z1, z2, dtype)
    got = _grads(losses.vicreg, z1, z2, dtype, impl=impl, path=path)
    _close(got, want, low, floor)
    t = losses.vicreg_terms(z1.float(), z2.float(), impl=impl, path=path)
    torch.testing.assert_close(25 * t["invariance"] + 25 * t["variance"] + t["covariance"], t["loss"])
    assert float(t["variance"]) > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,path,dtype,floor", COV)
def test_barlow_twins_matches_official(impl, n, d, path, dtype, floor):
    z1, z2 = _pair(n, d, 2 * n + d)
    want = _grads(barlow_official, z1, z2, torch.float64)
    low = _grads(barlow_official, z1, z2, dtype)
    got = _grads(losses.barlow_twins, z1, z2, dtype, impl=impl, path=path)
    _close(got, want, low, floor)
    t = losses.barlow_twins_terms(z1.float(), z2.float(), impl=impl, path=path)
    torch.testing.assert_close(t["on_diagonal"] + 0.0051 * t["off_diagonal"], t["loss"])


def test_perfectly_correlated_standardised_twins_have_zero_on_diagonal():
    z = torch.randn(32, 16, dtype=torch.float64)
    t = losses.barlow_twins_terms(z, 2 * z + 1, impl="torch")       # c_kk = var/(var+eps) ~ 1
    assert float(t["on_diagonal"]) < 1e-6


def test_defaults_and_dispatch(monkeypatch):
    assert not losses._gather(None)                                 # no process group: no gather
    assert losses._impl(None, torch.zeros(1)) == "torch"            # CPU -> torch
    # On CUDA the default follows the H200 timings: Triton for bf16/fp16 contrastive losses only.
    from types import SimpleNamespace
    monkeypatch.setattr(losses, "_has_triton", lambda: True)
    gpu = lambda dt, d=128: SimpleNamespace(is_cuda=True, dtype=dt, shape=(512, d))  # noqa: E731
    assert losses._impl(None, gpu(torch.bfloat16)) == "triton"
    assert losses._impl(None, gpu(torch.bfloat16, 256)) == "triton"
    assert losses._impl(None, gpu(torch.bfloat16, 2048)) == "torch"          # wider than measured
    assert losses._impl(None, gpu(torch.float32)) == "torch"
    assert losses._impl(None, gpu(torch.bfloat16), "covariance") == "torch"
    assert losses._impl("triton", gpu(torch.float32), "covariance") == "triton"   # asked for: honoured
    calls = []
    from fastssl.kernels import contrastive as K

    real = K.contrastive_ce_chunked
    monkeypatch.setattr(K, "contrastive_ce_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    losses.nt_xent(torch.randn(4, 8), torch.randn(4, 8))
    assert calls == [1]


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        losses.nt_xent(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        losses.vicreg(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="impl"):
        losses.barlow_twins(torch.randn(4, 8), torch.randn(4, 8), impl="cuda")
    with pytest.raises(ValueError, match="queue"):
        losses.info_nce(torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(3, 7))


@pytest.mark.skipif(not losses._has_triton(), reason="needs triton")
def test_torch_compile_fullgraph_traces_custom_ops():
    """The Triton ops are torch.library custom ops: dynamo traces through them, forward and backward."""
    torch._dynamo.reset()

    def f(a, b):
        return losses.nt_xent(a, b, 0.1, impl="triton") + losses.vicreg(a, b, impl="triton", path="gram")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    z1, z2 = _pair(10, 24, 0)
    a, b = z1.float().requires_grad_(), z2.float().requires_grad_()
    v = compiled(a, b)
    v.backward()
    a2, b2 = z1.float().requires_grad_(), z2.float().requires_grad_()
    w = f(a2, b2)
    w.backward()
    torch.testing.assert_close(v, w)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.slow
def test_torch_path_memory_at_16k_has_no_n_by_n_buffer():
    """N=16384 per view, D=128 on CPU: fwd+bwd peak RSS growth far below one 2N x 2N fp32 matrix (4 GiB)."""
    import subprocess
    import sys

    code = ("import resource, torch; from fastssl import losses; torch.manual_seed(0);"
            "z1 = torch.randn(16384, 128, requires_grad=True); z2 = torch.randn(16384, 128, requires_grad=True);"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "losses.nt_xent(z1, z2, impl='torch').backward();"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    assert peak_kib * 1024 < (4 << 30) / 4, peak_kib              # < 1 GiB; an N x N buffer alone is 4 GiB


def test_bench_loss_suite_cpu_smoke():
    """``fastssl-bench loss --suite smoke``: the GPU suite's path on the CPU; every implementation agrees."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "fastssl.cli.bench", "loss", "--suite", "smoke", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.strip()]   # one JSON line per result
    assert "env" in lines[0]
    benches = [x["benchmark"] for x in lines if "benchmark" in x]
    assert len(benches) == 2 and "goals" in lines[-1]
    for bench in benches:
        ok = [r for r in bench["results"] if r["status"] == "ok"]
        assert len(ok) == 2, bench                                  # the baseline and the torch path ran
        assert math.isclose(ok[0]["value"], ok[1]["value"], rel_tol=1e-4), bench
        assert all(r["peak_mem_bytes"] >= 0 and r["median_ms"] > 0 for r in ok)


# ------------------------------------------------------------------------------------------------
# info_nce with a queue: MoCo v2 (positive + queue only)
# ------------------------------------------------------------------------------------------------
def mocov2_official(q, k, t, queue):
    """facebookresearch/moco moco/builder.py MoCo.forward, the loss part (queue stored (C, K) there).

    q, k come out of the encoders L2-normalised (``nn.functional.normalize(q, dim=1)``); the queue
    holds normalised keys and is used without gradient (``self.queue.clone().detach()``).
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    queue_ck = F.normalize(queue, dim=1).T.detach()                 # (C, K) as in the official buffer
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)           # positive logits: Nx1
    l_neg = torch.einsum("nc,ck->nk", [q, queue_ck.clone().detach()])  # negative logits: NxK
    logits = torch.cat([l_pos, l_neg], dim=1)                       # logits: Nx(1+K)
    logits /= t                                                     # apply temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long)         # positive key indicators
    return F.cross_entropy(logits, labels)


# rows: N, D, queue size, temperature, dtype, floor
MOCOV2 = [
    (6, 16, 1, 0.2, torch.float32, 1e-5),
    (9, 24, 13, 0.07, torch.float32, 1e-5),
    (5, 20, 70, 0.2, torch.float32, 1e-5),                  # Q over one 64-column tile
    (8, 32, 37, 0.2, torch.bfloat16, 1e-2),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,nq,t,dtype,floor", MOCOV2)
def test_info_nce_with_queue_matches_mocov2(impl, n, d, nq, t, dtype, floor):
    z1, z2 = _pair(n, d, 5 * n + d)
    queue = torch.randn(nq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(nq))
    want = _grads(lambda a, b: mocov2_official(a, b, t, queue), z1, z2, torch.float64)
    low = _grads(lambda a, b: mocov2_official(a, b, t, queue.to(dtype)), z1, z2, dtype)
    got = _grads(lambda a, b: losses.info_nce(a, b, t, queue=queue.to(dtype), impl=impl), z1, z2, dtype)
    _close(got, want, low, floor)
    explicit = losses.info_nce(z1.to(dtype), z2.to(dtype), t, queue=queue.to(dtype), batch_negatives=False, impl=impl)
    torch.testing.assert_close(explicit.double(), got[0])
    terms = losses.info_nce_terms(z1.float(), z2.float(), t, queue=queue.float(), impl=impl)
    torch.testing.assert_close(terms["alignment"] + terms["uniformity"], terms["loss"])


@pytest.mark.parametrize("impl", IMPLS)
def test_info_nce_queue_gradient_reaches_the_queue_like_autograd(impl):
    """A queue that requires grad (not MoCo's use, but allowed) gets the softmax weights' gradient."""
    z1, z2 = _pair(5, 12, 3)
    queue = torch.randn(9, 12, dtype=torch.float64)
    grads = []
    for fn in (lambda a, b, c: mocov2_official_with_grad(a, b, 0.2, c),
               lambda a, b, c: losses.info_nce(a, b, 0.2, queue=c, impl=impl)):
        c = queue.float().clone().requires_grad_()
        fn(z1.float(), z2.float(), c).backward()
        grads.append(c.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def mocov2_official_with_grad(q, k, t, queue):
    """``mocov2_official`` without the queue's detach, to check the queue gradient path."""
    q, k, qu = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ qu.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


@pytest.mark.parametrize("impl", IMPLS)
def test_info_nce_queue_analytic_cases_and_independence_of_other_keys(impl):
    n, d, nq, t = 4, 8, 6, 0.3
    same = torch.ones(n, d)
    # every column equal: -log(1 / (1 + Q)) = log(1 + Q); the in-batch keys do not count
    assert math.isclose(float(losses.info_nce(same, same, t, queue=torch.ones(nq, d), impl=impl)),
                        math.log(1 + nq), rel_tol=1e-5)
    # the variant adds the N - 1 other keys: log(N + Q)
    assert math.isclose(float(losses.info_nce(same, same, t, queue=torch.ones(nq, d), batch_negatives=True,
                                              impl=impl)), math.log(n + nq), rel_tol=1e-5)
    # an empty queue leaves the positive alone: loss 0
    assert abs(float(losses.info_nce(same, same, t, queue=torch.zeros(0, d), impl=impl))) < 1e-6
    # row i's loss depends on k_i only: changing the other keys changes nothing
    q, k, queue = torch.randn(n, d), torch.randn(n, d), torch.randn(nq, d)
    k2 = k.clone()
    k2[1:] = torch.randn(n - 1, d)
    first = [losses.info_nce(q[:1], kk[:1], t, queue=queue, impl=impl) for kk in (k, k2)]
    whole = losses.info_nce(q, k2, t, queue=queue, impl=impl)
    torch.testing.assert_close(first[0], first[1])
    rows = torch.stack([losses.info_nce(q[i:i + 1], k2[i:i + 1], t, queue=queue, impl=impl) for i in range(n)])
    torch.testing.assert_close(rows.mean(), whole)
    with pytest.raises(ValueError, match="batch_negatives=False needs a queue"):
        losses.info_nce(q, k, t, batch_negatives=False, impl=impl)


@pytest.mark.skipif(not losses._has_triton(), reason="needs triton")
def test_info_nce_queue_runs_the_fused_kernel(monkeypatch):
    """MoCo v2's queue part goes through the Triton kernel (not a torch fallback) when impl='triton'."""
    from fastssl.kernels import contrastive as K

    calls = []
    real = K.contrastive_ce
    monkeypatch.setattr(K, "contrastive_ce", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    z1, z2 = _pair(6, 16, 11)
    queue = torch.randn(10, 16)
    losses.info_nce(z1.float().requires_grad_(), z2.float(), 0.2, queue=queue, impl="triton").backward()
    assert calls == [torch.Size([10, 16])]                         # the queue alone is the column set


# ------------------------------------------------------------------------------------------------
# self-distillation and SwAV (cookbook sections 2.3, 2.4.2): formulas written out, stop-gradients
# ------------------------------------------------------------------------------------------------
def test_byol_loss_and_negative_cosine_are_the_papers_and_stop_the_target_gradient():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    pn, zn = p / p.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    want_byol = ((pn - zn) ** 2).sum(1).mean()                   # BYOL eq. 2: ||p/|p| - z/|z|||^2
    want_simsiam = -(pn * zn).sum(1).mean()                      # SimSiam eq. 1: D(p, z) = -cos
    got_byol, got_simsiam = losses.byol_loss(p, z), losses.negative_cosine(p, z)
    assert got_byol.item() == pytest.approx(want_byol.item(), rel=1e-6)
    assert got_simsiam.item() == pytest.approx(want_simsiam.item(), rel=1e-6)
    (got_byol + got_simsiam).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0   # the target gets no gradient
    same = torch.randn(4, 3)
    assert abs(losses.byol_loss(same, 2 * same).item()) < 1e-6
    assert losses.negative_cosine(same, 2 * same).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="byol_loss"):
        losses.byol_loss(torch.randn(4, 3), torch.randn(4, 2))


def test_dino_and_swav_losses_average_cross_entropy_over_pairs_of_different_views():
    g = torch.Generator().manual_seed(1)
    b, k, n_views = 3, 5, 4
    targets = [torch.softmax(torch.randn(b, k, generator=g), 1) for _ in range(2)]
    logp = [torch.log_softmax(torch.randn(b, k, generator=g), 1) for _ in range(n_views)]
    terms = []
    for t in range(2):
        for v in range(n_views):
            if v != t:                                          # a view never predicts itself
                terms.append(sum(-(targets[t][i] * logp[v][i]).sum() for i in range(b)) / b)
    want = sum(terms) / len(terms)                              # 2 x 3 = 6 pairs
    for fn in (losses.dino_loss, losses.swav_loss):
        assert fn(targets, logp).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="dino_loss"):
        losses.dino_loss(targets, logp[:1])


def test_sinkhorn_codes_are_distributions_with_equal_prototype_mass():
    scores = F.normalize(torch.randn(32, 8), dim=1) @ F.normalize(torch.randn(4, 8), dim=1).t()
    q = losses.sinkhorn(scores, eps=0.05, iters=50)
    torch.testing.assert_close(q.sum(1), torch.ones(32), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.sum(0), torch.full((4,), 8.0), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(losses.sinkhorn(scores + 3.0, 0.05, 3), losses.sinkhorn(scores, 0.05, 3))


_UNDER_AUTOCAST = {
    "nt_xent": lambda a, b: losses.nt_xent(a, b, 0.1, impl="torch"),
    "dcl": lambda a, b: losses.nt_xent(a, b, 0.1, decoupled=True, impl="torch"),
    "info_nce": lambda a, b: losses.info_nce(a, b, 0.2, impl="torch"),
    "vicreg_gram": lambda a, b: losses.vicreg(a, b, impl="torch", path="gram"),
    "vicreg_dxd": lambda a, b: losses.vicreg(a, b, impl="torch", path="dxd"),
    "barlow_gram": lambda a, b: losses.barlow_twins(a, b, impl="torch", path="gram"),
    "barlow_dxd": lambda a, b: losses.barlow_twins(a, b, impl="torch", path="dxd"),
}


@pytest.mark.parametrize("name", sorted(_UNDER_AUTOCAST))
def test_fp32_losses_ignore_the_callers_autocast(name):
    """The trainer computes the loss inside the step's bf16 autocast, where a matmul of fp32 inputs would
    run in bf16. fp32 inputs must give the fp32 loss and gradients. Without that, the Gram path's
    backward fails on a bf16 Gram against fp32 rows, and NT-Xent's gradient is off by 22% at low loss
    (the softmax recomputed in fp32 against a log-sum-exp of bf16 logits)."""
    fn = _UNDER_AUTOCAST[name]
    out = []
    for autocast in (False, True):
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(64, 96, generator=g)
        z2 = (z1 + 0.3 * torch.randn(64, 96, generator=g)).requires_grad_()
        z1.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(z1, z2)
        loss.backward()
        out.append((loss.detach(), z1.grad, z2.grad))
    for plain, under in zip(*out):
        torch.testing.assert_close(under, plain, rtol=1e-5, atol=1e-6, msg=name)


def test_the_eager_estimate_scales_the_measured_eager_peak():
    """At N=65536 eager is not run: its need is its peak at N=8192 times 64, not one fp32 logit matrix."""
    from fastssl.cli.bench_loss import eager_need

    small = {"loss": "nt_xent", "batch": 8192, "dim": 128, "dtype": "bf16",
             "results": [{"impl": "eager", "status": "ok", "peak_mem_bytes": 5_650_000_000}]}
    big = {"loss": "nt_xent", "batch": 65536, "dim": 128, "dtype": "bf16", "full_logit_matrix_fp32_bytes": 4 * 131072 ** 2,
           "results": [{"impl": "triton", "status": "ok"}]}
    need, basis = eager_need([small, big], big)
    assert need == 64 * 5_650_000_000 and "N=8192" in basis       # 362 GB: more than an H200 holds
    need, basis = eager_need([], big)
    assert need == 4 * 131072 ** 2 and "lower bound" in basis
