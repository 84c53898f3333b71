"""Evaluation: kNN, linear probe, RankMe, alpha-ReQ against direct formulas; caching; reports."""
import json
import math

import torch

from fastssl.evaluation import knn_scores, knn_top1, rankme
from fastssl.evaluation.offline import alpha_req, cached_features, fit_linear_probe
from fastssl.report import time_to_accuracy, write_report


def test_knn_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    vx = torch.randn(7, 8, generator=g)
    k, t = 5, 0.1
    ours = knn_scores(tx, ty, vx, 4, k, t)
    for i in range(7):
        sims = [(float(torch.dot(vx[i], tx[j]) / (vx[i].norm() * tx[j].norm())), int(ty[j])) for j in range(50)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * 4
        for s, c in sims[:k]:
            votes[c] += math.exp(s / t)
        assert torch.allclose(ours[i], torch.tensor(votes), rtol=1e-4)


def test_knn_weighted_votes_break_a_count_tie():
    tx = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    ty = torch.tensor([0, 0, 1, 1])
    vx = torch.tensor([[1.0, 0.2]])  # two neighbours of each class; class 0 closer
    assert knn_top1(tx, ty, vx, torch.tensor([0]), 2, k=4, temperature=0.07) == 100.0


def test_linear_probe_separable_and_selects_without_val():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 16, generator=g) * 4
    ty = torch.randint(0, 3, (600,), generator=g)
    tx = centers[ty] + torch.randn(600, 16, generator=g)
    vy = torch.randint(0, 3, (200,), generator=g)
    vx = centers[vy] + torch.randn(200, 16, generator=g)
    res = fit_linear_probe(tx, ty, vx, vy, 3, epochs=10)
    assert res["linear_top1"] > 98
    garbage = fit_linear_probe(tx, ty, vx, torch.randint(0, 3, (200,), generator=g), 3, epochs=10)
    assert garbage["protocol"]["chosen"] == res["protocol"]["chosen"]  # val labels never steer the choice


def test_rankme_of_rank_r_matrix_is_about_r():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(200, 5, generator=g))
    z = q @ torch.linalg.qr(torch.randn(5, 5, generator=g))[0] * 3  # rank 5, equal singular values
    assert abs(rankme(z) - 5) < 0.05
    s = torch.linalg.svdvals(torch.randn(40, 10, generator=g))
    p = s / s.sum() + 1e-7
    assert abs(rankme(torch.diag(s)) - float(torch.exp(-(p * p.log()).sum()))) < 1e-4


def test_alpha_req_recovers_a_power_law_exponent():
    g = torch.Generator().manual_seed(3)
    d, alpha = 64, 1.5
    ev = torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha)
    z = torch.randn(20000, d, generator=g, dtype=torch.float64) * ev.sqrt()
    assert abs(alpha_req(z, rank_fraction=0.5) - alpha) < 0.1


def test_features_are_cached_not_reextracted(tmp_path):
    calls = {"n": 0}

    def extract():
        calls["n"] += 1
        return torch.randn(10, 4), torch.arange(10)

    meta = {"step": 3, "split": "train"}
    a = cached_features(tmp_path, "train", 3, meta, extract)
    b = cached_features(tmp_path, "train", 3, meta, extract)
    assert calls["n"] == 1 and torch.equal(a[0], b[0])
    cached_features(tmp_path, "train", 4, {**meta, "step": 4}, extract)
    assert calls["n"] == 2


def _fake_run(d, name, speed):
    d.mkdir()
    rows = [{"kind": "train", "step": s, "wall": s / speed, "loss": 5 - s / 50, "lr": 0.1, "images_per_second": speed,
             "data_wait": 0.1} for s in range(1, 100, 10)]
    rows += [{"kind": "eval", "step": s, "wall": s / speed, "knn_top1": 10 + s / 2} for s in (0, 50, 100)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "summary.json").write_text(json.dumps({"method": "simclr", "knn_top1": 60.0, "images_per_second": speed}))
    (d / "config.yaml").write_text("method: {name: simclr}\n")
    return d


def test_report_for_two_runs_writes_pngs_and_markdown(tmp_path):
    a, b = _fake_run(tmp_path / "a", "a", 10.0), _fake_run(tmp_path / "b", "b", 20.0)
    md = write_report([a, b], tmp_path / "out")
    text = md.read_text()
    assert "| a |" in text and "| b |" in text and "Time to accuracy" in text
    for png in ("loss.png", "knn_vs_time.png", "throughput.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    tta = time_to_accuracy([{"wall": 1.0, "knn_top1": 25}, {"wall": 3.0, "knn_top1": 45}], thresholds=(20, 40, 50))
    assert tta == {20: 1.0, 40: 3.0, 50: None}


def test_probe_standardisation_moments_match_torch_in_chunks():
    """The probe standardises batch by batch from chunked moments (no fp32 copy of the bank): the
    moments equal torch's over the whole bank, across chunk boundaries and for a bf16 bank."""
    from fastssl.evaluation.offline import _moments

    x = torch.randn(70_000, 96) * 3 + 5                     # 70k rows: several chunks of 2^22 / 96 rows
    mu, sd = _moments(x)
    assert torch.allclose(mu, x.mean(0), atol=1e-4) and torch.allclose(sd, x.std(0), atol=1e-4)
    xb = x.bfloat16()
    mub, sdb = _moments(xb)
    assert torch.allclose(mub, xb.float().mean(0), atol=1e-3) and torch.allclose(sdb, xb.float().std(0), atol=1e-3)
    assert not torch.allclose(mu, torch.zeros_like(mu), atol=1.0)  # the comparison can fail
