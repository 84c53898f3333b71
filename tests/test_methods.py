"""Every registered method: loss vs a direct transcription of its paper's equation (values and
gradients), state updates (EMA, centre, queue, Sinkhorn) once per optimizer step, and 20 CPU
steps of its demo config through the real CLI.

The tests iterate over ``METHODS.names()``: registering a method without a reference below
fails ``test_every_method_has_a_reference``.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastssl.config import load_config
from fastssl.methods import METHODS, create_method

ROOT = Path(__file__).resolve().parents[1]
VIT_METHODS = {"mae", "dino"}        # demo/tests with a micro ViT
MULTICROP = {"dino", "swav"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32, "hidden": 32, "bottleneck": 16, "out_dim": 64,
         "num_prototypes": 20, "queue_size": 24, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def tiny_method(name, total_steps=100, **method_kw):
    ov = [f"method.name={name}", "aug.global_size=16", "aug.local_size=8",
          "model.backbone=" + ("vit_micro_patch8" if name in VIT_METHODS else "resnet_tiny")]
    if name in MULTICROP:
        ov += ["aug.recipe=dino", "aug.num_local=2"]
    ov += ["train.epochs=10"]
    cfg = load_config(None, ov)
    for k, v in {**SMALL, **method_kw}.items():
        if hasattr(cfg.method, k):
            setattr(cfg.method, k, v)
    torch.manual_seed(0)
    return create_method(cfg, total_steps), cfg


def make_views(cfg, b=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, v.size, v.size, generator=g) for v in cfg.aug.resolved_views()]


# ----------------------------------------------------------------------------- direct references


def each_view(f, views):
    """The two-view methods' reference code: the network called once per view (BatchNorm per view)."""
    return torch.cat([f(v) for v in views[:2]])


def _nce_rows(anchors, cols, pos, exclude, t):
    """-log softmax over the kept columns, one anchor at a time (loop: the paper's sum written out)."""
    out = []
    for i in range(anchors.shape[0]):
        sims = torch.stack([anchors[i] @ cols[j] / t for j in range(cols.shape[0])])
        keep = [j for j in range(cols.shape[0]) if j not in exclude[i]]
        denom = torch.logsumexp(sims[keep], 0)
        out.append(denom - sims[pos[i]])
    return torch.stack(out).mean()


def ref_simclr(m, views, step):
    b = views[0].shape[0]
    z = F.normalize(each_view(lambda v: m.projector(m.backbone(v)), views).float(), dim=1)
    n = 2 * b
    pos = [(i + b) % n for i in range(n)]
    excl = [{i, pos[i]} if m.decoupled else {i} for i in range(n)]
    return _nce_rows(z, z, pos, excl, m.temperature)


def ref_byol(m, views, step):
    b = views[0].shape[0]
    p = each_view(lambda v: m.predictor(m.projector(m.backbone(v))), views)
    with torch.no_grad():
        zt = each_view(lambda v: m.teacher["projector"](m.teacher["backbone"](v)), views)
    pn, zn = p / p.norm(dim=1, keepdim=True), zt / zt.norm(dim=1, keepdim=True)
    # ||p/|p| - z'/|z'|||^2, both directions summed (BYOL eq. 2 and the symmetrised loss)
    return ((pn[:b] - zn[b:]) ** 2).sum(1).mean() + ((pn[b:] - zn[:b]) ** 2).sum(1).mean()


def ref_simsiam(m, views, step):
    b = views[0].shape[0]
    z = each_view(lambda v: m.projector(m.backbone(v)), views)
    p = each_view(m.predictor, list(z.chunk(2)))
    z = z.detach()

    def d(p, z):  # D(p, z) = - p/|p| . z/|z|
        return -(p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))

    return (0.5 * d(p[:b], z[b:]) + 0.5 * d(p[b:], z[:b])).mean()


def ref_mocov3(m, views, step):
    b = views[0].shape[0]
    q = F.normalize(each_view(lambda v: m.predictor(m.projector(m.backbone(v))), views), dim=1)
    with torch.no_grad():
        k = F.normalize(each_view(lambda v: m.teacher["projector"](m.teacher["backbone"](v)), views), dim=1)
    t = m.temperature

    def ctr(q, k):  # MoCo v3 Algorithm 1: CrossEntropyLoss(q k^T / t, arange) * 2t
        logits = q @ k.t() / t
        return -(logits.diag() - torch.logsumexp(logits, dim=1)).mean() * 2 * t

    return ctr(q[:b], k[b:]) + ctr(q[b:], k[:b])


def ref_nnclr(m, views, step):
    b = views[0].shape[0]
    z = each_view(lambda v: m.projector(m.backbone(v)), views)
    p = F.normalize(each_view(m.predictor, list(z.chunk(2))), dim=1)
    zn = F.normalize(z.detach(), dim=1)
    support = m.queue.rows[: int(m.queue.filled)]
    nn1 = torch.stack([support[int(torch.argmax(support @ zi))] for zi in zn[:b]])
    nn2 = torch.stack([support[int(torch.argmax(support @ zi))] for zi in zn[b:]])
    # NNCLR eq. 2: -log exp(NN(z_i).p_i^+ / t) / sum_k exp(NN(z_i).p_k^+ / t), symmetrised
    l1 = _nce_rows(nn1, p[b:], list(range(b)), [set()] * b, m.temperature)
    l2 = _nce_rows(nn2, p[:b], list(range(b)), [set()] * b, m.temperature)
    return 0.5 * (l1 + l2)


def ref_vicreg(m, views, step):
    b = views[0].shape[0]
    z = each_view(lambda v: m.projector(m.backbone(v)), views).float()
    za, zb = z[:b], z[b:]
    sim, std_c, cov_c = m.coeffs
    inv = ((za - zb) ** 2).mean()
    d = za.shape[1]

    def var_cov(x):
        x = x - x.mean(0)
        cov = x.t() @ x / (b - 1)                                            # D x D, built here on purpose
        std = torch.sqrt(cov.diag() + 1e-4)
        off = cov - torch.diag(cov.diag())
        return torch.relu(1 - std).mean(), (off ** 2).sum() / d

    va, ca = var_cov(za)
    vb, cb = var_cov(zb)
    return sim * inv + std_c * (va + vb) / 2 + cov_c * (ca + cb)


def ref_barlow_twins(m, views, step):
    b = views[0].shape[0]
    z = each_view(lambda v: m.projector(m.backbone(v)), views).float()
    bn = torch.nn.BatchNorm1d(z.shape[1], affine=False).train()            # the official code's bn
    c = bn(z[:b]).t() @ bn(z[b:]) / b
    on = ((torch.diagonal(c) - 1) ** 2).sum()
    off = (c ** 2).sum() - (torch.diagonal(c) ** 2).sum()
    return on + m.lambd * off


def _sinkhorn_ref(scores, eps, iters):
    """SwAV Algorithm 1 (single process): Q = exp(scores/eps)^T; rows to 1/K, columns to 1/B; return Q*B."""
    q = torch.exp(scores / eps).t().double()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t().float()


def ref_swav(m, views, step):
    b = views[0].shape[0]
    feats = torch.cat([m.backbone(v) for v in views])                       # per view (BN off: eval mode below)
    z = F.normalize(m.projector(feats), dim=1)
    scores = z @ m.prototypes.weight.t()
    terms = []
    for i in range(m.num_assign):
        q = _sinkhorn_ref(scores[i * b:(i + 1) * b].detach(), m.sinkhorn_eps, m.sinkhorn_iters)
        for v in range(len(views)):
            if v != i:
                lp = torch.log_softmax(scores[v * b:(v + 1) * b] / m.temperature, dim=1)
                terms.append(-(q * lp).sum(1).mean())
    return sum(terms) / len(terms)


def ref_dino(m, views, step):
    feats = [m.backbone(v) for v in views]                                  # ViT: per-view == batched
    s = [m.head(f) / m.student_temp for f in feats]
    tt = float(m.teacher_temp[step])
    with torch.no_grad():
        t = [torch.softmax((m.teacher["head"](m.teacher["backbone"](v)) - m.center) / tt, dim=1) for v in views[:2]]
    terms = [-(t[a] * torch.log_softmax(s[v], dim=1)).sum(1).mean() for a in range(2) for v in range(len(views)) if v != a]
    return sum(terms) / len(terms)


def ref_mae(m, views, step):
    x = views[0]
    p = m.patch
    torch.manual_seed(1234)
    latent, mask, ids_restore = m.backbone(x, mask_ratio=m.mask_ratio)
    pred = m.decoder(latent, ids_restore, (x.shape[2] // p, x.shape[3] // p))
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        patches = F.unfold(x[i:i + 1], p, stride=p)[0].t()                 # (N, 3*p*p), channel-major
        patches = patches.reshape(-1, 3, p * p).transpose(1, 2).reshape(-1, p * p * 3)   # -> (p, p, C) order
        for j in range(patches.shape[0]):
            if mask[i, j] == 1:                                             # removed patches only
                tgt = patches[j]
                tgt = (tgt - tgt.mean()) / torch.sqrt(tgt.var() + 1e-6)
                total = total + ((pred[i, j] - tgt) ** 2).mean()
                count += 1
    return total / count


REFERENCES = {"simclr": ref_simclr, "dcl": ref_simclr, "byol": ref_byol, "simsiam": ref_simsiam,
              "mocov3": ref_mocov3, "nnclr": ref_nnclr, "vicreg": ref_vicreg, "barlow_twins": ref_barlow_twins,
              "swav": ref_swav, "dino": ref_dino, "mae": ref_mae}


def test_every_method_has_a_reference():
    missing = set(METHODS.names()) - set(REFERENCES)
    assert not missing, f"methods without a reference loss in tests/test_methods.py: {sorted(missing)}"


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", METHODS.names())
def test_loss_and_grads_match_direct_reference(name):
    m, cfg = tiny_method(name)
    views = make_views(cfg)
    if name == "nnclr":  # a filled support set so nearest neighbours matter
        m.queue.stage(F.normalize(torch.randn(20, m.queue.rows.shape[1]), dim=1))
        m.after_step(0)
    if name == "dino":
        m.center.normal_()                                                  # a non-trivial centre
    if name == "swav":
        m.eval()  # BN batch statistics per view group vs per view differ; eval makes rows independent
    step = 3
    torch.manual_seed(1234)
    out = m(views, step)
    out["loss"].backward()
    g_method = _grads(m)
    m.zero_grad(set_to_none=True)
    ref = REFERENCES[name](m, views, step)
    ref.backward()
    g_ref = _grads(m)
    assert torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    assert g_method.keys() == g_ref.keys() and g_method
    for k in g_method:
        torch.testing.assert_close(g_method[k], g_ref[k], rtol=2e-3, atol=2e-5, msg=f"{name}: grad of {k}")
    assert out["features"].shape == (views[0].shape[0], m.feat_dim) and not out["features"].requires_grad
    for k, v in out.items():
        if k not in ("loss", "features"):
            assert v.ndim == 0 and not v.requires_grad, k


# ----------------------------------------------------------------------------- state updates


@pytest.mark.parametrize("name", METHODS.names())
def test_accumulation_advances_state_like_one_big_step(name):
    """k micro-batches then after_step == one batch of k*B then after_step (EMA, centre, queue)."""
    a, cfg = tiny_method(name)
    b, _ = tiny_method(name)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # a student that differs from its teacher, so the EMA moves
        for p in list(a.parameters()):
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        b.load_state_dict(a.state_dict())
    a.eval(), b.eval()  # BN running statistics: every row computed independently of its batch
    views = make_views(cfg, b=8)
    with torch.no_grad():
        a(views, 5)
        a.after_step(5)
        for half in (slice(0, 4), slice(4, 8)):
            b([v[half] for v in views], 5)
        b.after_step(5)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n in ("byol", "mocov3", "dino")])
def test_ema_update_is_the_cosine_momentum_average(name):
    m, cfg = tiny_method(name, total_steps=50)
    teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    step = 10
    mom = cfg.method.momentum_end - (cfg.method.momentum_end - cfg.method.momentum) * (math.cos(math.pi * step / 49) + 1) / 2
    m.after_step(step)
    student = {"backbone": m.backbone, "projector": getattr(m, "projector", None), "head": getattr(m, "head", None)}
    for part, mod in m.teacher.items():
        for (n, tp), sp in zip(mod.named_parameters(), student[part].parameters()):
            want = mom * teacher_before[f"{part}.{n}"] + (1 - mom) * sp.detach()
            torch.testing.assert_close(tp, want, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for p in m.teacher.parameters())
    # the teacher is checkpointed once, under teacher.*
    keys = list(m.state_dict())
    assert any(k.startswith("teacher.") for k in keys) and len(keys) == len(set(keys))


def test_dino_centre_and_teacher_temperature():
    m, cfg = tiny_method("dino", total_steps=100)
    m.eval()
    views = make_views(cfg)
    with torch.no_grad():
        m.center.fill_(0.5)
        m(views, 0)
        g = m.teacher["head"](m.teacher["backbone"](torch.cat(views[:2])))
        m.after_step(0)
    torch.testing.assert_close(m.center, 0.9 * 0.5 + 0.1 * g.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    # 30 warm-up epochs of 10 steps each exceed the 100-step run: linear from 0.04 at the slope to 0.07 at step 300
    spe = 100 / 10
    assert m.teacher_temp[0] == pytest.approx(0.04)
    assert m.teacher_temp[50] == pytest.approx(0.04 + 0.03 * 50 / (30 * spe - 1))
    short, _ = tiny_method("dino", total_steps=100, warmup_teacher_temp_epochs=2.0)
    assert short.teacher_temp[19] == pytest.approx(0.07) and short.teacher_temp[99] == pytest.approx(0.07)


@pytest.mark.parametrize("name,param", [("dino", "head.last_layer.weight"), ("swav", "prototypes.weight")])
def test_last_layer_or_prototypes_frozen_during_first_epoch(name, param):
    m, cfg = tiny_method(name, total_steps=100)          # 10 epochs -> 10 steps per epoch
    views = make_views(cfg)
    p = dict(m.named_parameters())[param]
    for step, frozen in ((0, True), (9, True), (10, False)):
        m.zero_grad(set_to_none=True)
        m(views, step)["loss"].backward()
        assert p.grad is not None
        m.before_optimizer_step(step)
        assert (p.grad is None) == frozen, (step, frozen)


def test_swav_prototypes_stay_normalised_and_sinkhorn_is_equipartition():
    from fastssl.losses import sinkhorn

    m, cfg = tiny_method("swav")
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    m.after_step(0)
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(m.prototypes.weight.shape[0]))
    scores = F.normalize(torch.randn(64, 16), dim=1) @ F.normalize(torch.randn(10, 16), dim=1).t()
    q = sinkhorn(scores, eps=0.05, iters=50)
    torch.testing.assert_close(q.sum(1), torch.ones(64), rtol=1e-4, atol=1e-4)       # each row a distribution
    torch.testing.assert_close(q.sum(0), torch.full((10,), 6.4), rtol=2e-2, atol=2e-2)  # equal prototype mass
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3), _sinkhorn_ref(scores, 0.05, 3), rtol=1e-4, atol=1e-5)


def test_feature_queue_is_fifo_with_device_pointer():
    from fastssl.methods._common import FeatureQueue

    q = FeatureQueue(5, 2)
    q.stage(torch.arange(6.).reshape(3, 2))
    q.commit()
    assert int(q.ptr) == 3 and int(q.filled) == 3 and q.filled_mask().tolist() == [True] * 3 + [False] * 2
    q.stage(torch.arange(6., 12.).reshape(3, 2))
    q.commit()                                                              # wraps: rows 3,4 then 0
    assert int(q.ptr) == 1 and int(q.filled) == 5
    assert q.rows[:, 0].tolist() == [10.0, 2.0, 4.0, 6.0, 8.0]
    assert "rows" in q.state_dict() and "ptr" in q.state_dict()


# ----------------------------------------------------------------------------- 20 CPU steps per demo config


def _demo_overrides(name, data, out):
    kv = {"data.train": f"{data}/train.beton", "data.val": f"{data}/val.beton", "data.workers": 1,
          "train.max_steps": 20, "train.epochs": 4, "optim.batch_size": 32, "train.log_every": 5,
          "train.out_dir": str(out), "train.name": "t", "train.progress": False, "eval.final": True,
          "optim.warmup_epochs": 0, "aug.global_size": 16 if name not in VIT_METHODS else 32}
    if name in MULTICROP:
        kv["aug.local_size"] = 8 if name not in VIT_METHODS else 16
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.mark.parametrize("name", METHODS.names())  # 5-10 s each on one CPU thread
def test_demo_config_runs_20_cpu_steps_without_collapse(name, demo_data, tmp_path):
    from fastssl.train import main

    cfg_path = ROOT / "configs" / "demo" / f"{name}.yaml"
    assert cfg_path.is_file(), f"configs/demo/{name}.yaml is missing"
    rc = main(["--config", str(cfg_path)] + _demo_overrides(name, demo_data, tmp_path))
    assert rc == 0
    run = tmp_path / "t"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert train[-1]["step"] == 20 and all(math.isfinite(r["loss"]) for r in train)
    summary = json.loads((run / "summary.json").read_text())
    # Non-collapsed backbone features on the val split: RankMe well above 1 (collapse) ...
    assert summary["rankme"] > 5.0, summary["rankme"]
    # ... and the method's own spread indicator (std of l2-normalised embeddings) away from 0.
    if "z_std" in train[-1]:
        assert train[-1]["z_std"] > 0.02, train[-1]["z_std"]


# ----------------------------------------------------------------------------- fastssl-bench step


def test_bench_step_json_with_compare_variant(capsys):
    from fastssl.cli.bench import main

    rc = main(["step", "--config", str(ROOT / "configs/demo/mae.yaml"), "--device", "cpu", "--batch", "4",
               "--steps", "2", "--rounds", "2", "--warmup", "1", "--json", "--compare", "method.mask_ratio=0.0"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    base, var = res["variants"]
    assert base["method"] == "mae" and var["overrides"][-1] == "method.mask_ratio=0.0"
    assert base["batch"] == 4 and base["finite"] and var["finite"] and len(base["round_sec_per_step"]) == 2
    assert base["images_per_s"] == pytest.approx(4 / base["sec_per_step"])
    assert var["images_per_s_vs_base"] == pytest.approx(var["images_per_s"] / base["images_per_s"])
    assert main(["step", "--config", str(ROOT / "configs/demo/mae.yaml"), "method.mask_ratoi=0.1"]) == 2


def test_bench_step_suite_smoke_on_cpu(capsys):
    """``fastssl-bench step --suite smoke``: the GPU suite's code path on the CPU, one JSON line per case."""
    from fastssl.cli.bench import main as bench

    assert bench(["step", "--suite", "smoke"]) == 0
    res = {r.pop("case"): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(res) == {"simclr_demo", "mae_demo", "dino_demo"}
    assert [v["overrides"][-1] for v in res["dino_demo"]["variants"]][1] == "model.attn=naive"


# ----------------------------------------------------------------------------- the method protocol


def test_every_method_follows_the_protocol():
    """``SSLMethod`` in code: every registered class mixes in ``MethodHooks`` and has each member."""
    from fastssl.methods import MethodHooks, SSLMethod

    hooks = {n for n in vars(MethodHooks) if not n.startswith("_")}
    members = {n for n in vars(SSLMethod) if not n.startswith("_") or n == "__call__"} | set(SSLMethod.__annotations__)
    # the protocol lists the mixin's hooks plus what each method must build itself
    assert members == hooks | {"backbone", "feat_dim", "__call__"}
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert issubclass(cls, MethodHooks), name
        m, _ = tiny_method(name)
        assert isinstance(m, SSLMethod), name
        assert isinstance(m.feat_dim, int) and isinstance(m.backbone, torch.nn.Module), name


def test_method_docs_name_only_hooks_that_exist():
    """The docs in methods/__init__.py and optim.py describe the protocol, not hooks nothing calls."""
    import fastssl.methods as pkg
    import fastssl.optim as optim

    for doc in (pkg.__doc__, optim.__doc__):
        for gone in ("on_train_step_start", "extra_state"):
            assert gone not in doc
    for hook in ("after_step", "before_optimizer_step", "embed", "param_groups"):
        assert f"``{hook}(" in pkg.__doc__


def test_mixin_defaults_and_param_groups_hook():
    from fastssl.optim import build_optimizer, default_param_groups

    m, cfg = tiny_method("simclr")
    x = torch.randn(2, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m.embed(x), m.backbone(x))
    assert m.after_step(0) is None and m.before_optimizer_step(0) is None
    got, want = m.param_groups(0.05), default_param_groups(m, 0.05)
    assert [[id(p) for p in g["params"]] for g in got] == [[id(p) for p in g["params"]] for g in want]
    # build_optimizer takes the method's own groups when it overrides the hook
    m.param_groups = lambda wd: [{"params": list(m.projector.parameters()), "weight_decay": wd, "apply_wd": True}]
    opt = build_optimizer(m, cfg.optim, 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.projector.parameters()))


def _projector_module(m):
    """The module whose output ``z_std`` describes: the projector (DINO: its head's MLP to the bottleneck)."""
    if hasattr(m, "projector"):
        return m.projector
    if hasattr(m, "head"):
        return m.head.mlp
    return None


@pytest.mark.parametrize("name", METHODS.names())
def test_z_std_is_the_projector_output_of_view0_in_every_method(name):
    """``z_std`` means one tensor everywhere: embedding_std of the online projector's output on views[0]."""
    from fastssl.methods._common import embedding_std

    m, cfg = tiny_method(name)
    views = make_views(cfg)
    b = views[0].shape[0]
    proj = _projector_module(m)
    if proj is None:                                                        # MAE: no projector, no z_std
        torch.manual_seed(0)
        assert "z_std" not in m(views, 3)
        return
    seen = []
    handle = proj.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    try:
        torch.manual_seed(0)
        out = m(views, 3)
    finally:
        handle.remove()
    assert seen, f"{name}: the projector did not run"
    torch.testing.assert_close(out["z_std"], embedding_std(seen[0][:b]), msg=name)


def _two_view_methods():
    from fastssl.config import TwoViewConfig

    return [n for n in METHODS.names() if issubclass(METHODS.meta(n)["config"], TwoViewConfig)]


@pytest.mark.parametrize("name", _two_view_methods())
def test_two_view_methods_normalise_each_view_alone(name):
    """BatchNorm statistics per view (the reference code's one call per view): in training mode, view 0's
    features do not depend on view 1's images; with ``method.joint_bn=true`` they do (the test can fail)."""
    m, cfg = tiny_method(name)
    views = make_views(cfg)
    other = [views[0], make_views(cfg, seed=7)[1]]
    m.train()
    torch.manual_seed(0)
    a = m(views, 3)["features"]
    torch.manual_seed(0)
    b = m(other, 3)["features"]
    torch.testing.assert_close(a, b, msg=name)
    joint, _ = tiny_method(name, joint_bn=True)
    joint.train()
    torch.manual_seed(0)
    a = joint(views, 3)["features"]
    torch.manual_seed(0)
    assert not torch.allclose(a, joint(other, 3)["features"]), name


@pytest.mark.parametrize("name", METHODS.names())
def test_every_tensor_a_method_makes_is_on_its_views_device(name):
    """A tensor made without ``device=`` lands on the CPU; on a GPU it then meets CUDA tensors (the trainer
    stacks every log value into one device vector at a log point, which fails across devices). With the
    default device set to ``meta``, any such tensor shows up here off the views' device (the CPU)."""
    m, cfg = tiny_method(name)
    views = make_views(cfg)
    with torch.device("meta"):
        out = m(views, 3)
        out["loss"].backward()
        getattr(m, "after_step", lambda step: None)(3)
    off = {k: v.device.type for k, v in out.items() if torch.is_tensor(v) and v.device != views[0].device}
    assert not off, f"{name}: made without device=: {off}"
    off = [n for n, t in list(m.named_parameters()) + list(m.named_buffers())
           if t.device != views[0].device or (t.grad is not None and t.grad.device != views[0].device)]
    assert not off, f"{name}: state off the views' device: {off[:3]}"


def test_ddp_does_not_broadcast_feature_queues_but_does_the_rest(tmp_path):
    """NNCLR's queue is equal on every rank (commit enqueues the gathered rows): DDP skips it in its
    per-forward broadcast of buffers, and still broadcasts the BatchNorm statistics."""
    import torch.distributed as dist

    from fastssl.engine import ddp_skip_queues

    m, _ = tiny_method("nnclr")
    assert ddp_skip_queues(m) == ["queue.rows", "queue.ptr", "queue.filled"]
    assert ddp_skip_queues(tiny_method("simclr")[0]) == []                  # no queue: nothing skipped
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        sent = {n for n, b in m.named_buffers() if any(b is x for x in ddp.modules_buffers)}
    finally:
        dist.destroy_process_group()
    assert not any(n.startswith("queue.") for n in sent) and any("running_mean" in n for n in sent)
