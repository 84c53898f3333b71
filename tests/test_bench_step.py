"""``fastssl-bench step``: FLOP count, achieved TFLOP/s, peak memory and the photometric stage with the probe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["aug.global_size=16", "model.backbone=resnet_tiny"]


def test_flop_count_matches_a_hand_count():
    """FlopCounterMode's rules as fastssl.flops relies on them: 2 FLOPs per MAC; the backward of a layer whose
    input needs no gradient is its weight gradient alone (1x the forward), of any later layer 2x."""
    from fastssl.flops import count_flops

    b, h, w = 4, 8, 8
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(8 * h * w, 10))
    x = torch.randn(b, 3, h, w)
    conv = 2 * b * (8 * h * w) * (3 * 3 * 3)
    linear = 2 * b * (8 * h * w) * 10
    assert count_flops(lambda: net(x)) == conv + linear
    assert count_flops(lambda: net(x).sum().backward()) == 2 * conv + 3 * linear


def test_resnet50_at_224_counts_the_published_4_1_gmac():
    """On the meta device (no compute): 4.1 GMAC forward per image; fwd+bwd = 3x, less the stem's input gradient."""
    import timm

    from fastssl.flops import count_flops

    with torch.device("meta"):
        net = timm.create_model("resnet50", num_classes=0)
        x = torch.randn(2, 3, 224, 224)
    fwd = count_flops(lambda: net(x)) / 2
    assert fwd / 2 / 1e9 == pytest.approx(4.1, rel=0.01)  # GMAC per image
    both = count_flops(lambda: net(x).sum().backward()) / 2
    assert both / 1e9 == pytest.approx(24.6, rel=0.02)  # GFLOP fwd+bwd per view


def test_step_flops_of_the_simclr_rn50_recipe_at_its_batch():
    """Two 224 px views through ResNet-50 and the 2048-2048-128 projector, the recipe's batch counted on meta."""
    from fastssl.config import load_config
    from fastssl.flops import FLOP_COUNT_SOURCE, step_flops

    cfg = load_config(ROOT / "configs/imagenet/simclr_rn50.yaml", ["train.res_start=0"])
    r = step_flops(cfg, 1000, 512)
    assert r["flop_count_device"] == "meta" and r["flop_count_batch"] == 512 and r["flop_count"] == FLOP_COUNT_SOURCE
    proj = 3 * 2 * (2048 * 2048 + 2048 * 128)  # fwd+bwd of the projector's two linears, per view
    assert r["flops_per_image"] == pytest.approx(2 * (24.3e9 + proj), rel=0.01)
    assert r["flops_per_step"] == pytest.approx(512 * r["flops_per_image"])


def test_peak_table_by_device_name():
    from fastssl.flops import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H200") == 989
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_bf16_tflops("Tesla T4") is None and peak_bf16_tflops(None) is None
    assert peak_bf16_tflops("NVIDIA L4") == 121 and peak_bf16_tflops("NVIDIA L40") is None   # not L4's figure
    assert peak_bf16_tflops("NVIDIA A10G") is None and peak_bf16_tflops("NVIDIA L40S") == 362


def _bench(capsys, *args) -> dict:
    from fastssl.cli.bench import main

    rc = main(["step", "--config", str(ROOT / "configs/demo/simclr.yaml"), *TINY, "--device", "cpu", "--batch", "8",
               "--steps", "2", "--rounds", "1", "--warmup", "1", "--json", *args])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_flops_tflops_and_memory(capsys):
    res = _bench(capsys, "--peak-tflops", "0.5")
    v = res["variants"][0]
    assert res["flop_count"] == "torch.utils.flop_counter, fwd+bwd, matmul/conv only"
    assert v["flop_count_device"] == "meta" and v["flops_per_image"] > 1e6
    assert v["flops_per_step"] == pytest.approx(8 * v["flops_per_image"])
    assert v["tflops"] == pytest.approx(v["flops_per_image"] * v["images_per_s"] / 1e12)
    assert res["peak_tflops"] == 0.5 and res["peak_source"] == "--peak-tflops"
    assert v["fraction_of_peak"] == pytest.approx(v["tflops"] / 0.5)
    assert not v["photometric"] and not v["online_probe"] and v["photometric_peak_gb"] is None
    if res["mem_source"] is not None:  # Linux: the process's peak RSS over the timed rounds
        assert 0.05 < res["peak_mem_gb"] < 64 and v["step_transient_gb"] >= 0
    else:
        assert res["peak_mem_gb"] is None and res["mem_note"]


def test_no_peak_on_the_cpu_unless_given(capsys):
    res = _bench(capsys)
    assert res["peak_tflops"] is None and res["variants"][0]["fraction_of_peak"] is None
    assert res["variants"][0]["tflops"] > 0


def test_photometric_runs_the_augmenter_and_the_probe_each_step(capsys, monkeypatch):
    from fastssl.evaluation import OnlineLinearProbe
    from fastssl.pipelines.augment import Augmenter

    calls = {"aug": 0, "probe": 0}
    shapes = []
    real_aug, real_probe = Augmenter.__call__, OnlineLinearProbe.step

    def aug(self, crops, step):
        calls["aug"] += 1
        shapes.append([(tuple(c.shape), c.dtype) for c in crops])
        return real_aug(self, crops, step)

    def probe(self, feats, labels):
        calls["probe"] += 1
        assert labels.dtype == torch.int64 and int(labels.max()) < 7
        return real_probe(self, feats, labels)

    monkeypatch.setattr(Augmenter, "__call__", aug)
    monkeypatch.setattr(OnlineLinearProbe, "step", probe)
    res = _bench(capsys, "--photometric", "--num-classes", "7")
    v = res["variants"][0]
    assert res["photometric"] and res["num_classes"] == 7 and "photometric stage" in res["protocol"]
    assert v["photometric"] and v["online_probe"] and v["probe_rows_last_step"] == 8
    # every step (warm-up, the untimed memory step, the timed ones) plus the stage timed alone
    steps = res["warmup"] + 1 + res["steps_timed"]
    assert calls == {"aug": steps + 1, "probe": steps}
    assert shapes[0] == [((8, 16, 16, 3), torch.uint8)] * 2
    assert v["finite"] and v["tflops"] > 0
    if res["mem_source"] is not None:
        assert v["photometric_peak_gb"] >= 0


def test_gpu_suite_has_the_recipe_batch_with_photometric():
    from fastssl.cli.bench_step import SUITES

    case = {c[0]: c for c in SUITES["gpu"]}["simclr_rn50_b512_photometric"]
    assert case[1] == "configs/imagenet/simclr_rn50.yaml" and case[3] == 512 and case[5] == {"photometric": True}


def test_every_gpu_suite_variant_is_a_valid_config():
    """A GPU call is minutes of a lent machine: a variant with a misspelt key must fail here, not there."""
    from fastssl.cli.bench_step import SUITES
    from fastssl.config import load_config

    for case, cfg, ov, batch, compares, *opts in SUITES["gpu"]:
        for extra in [[]] + compares:
            load_config(str(ROOT / cfg), ov + extra)


def test_cases_take_patterns_and_name_what_exists(monkeypatch):
    from fastssl.cli import bench_step

    ran = []
    monkeypatch.setattr(bench_step, "run", lambda path, ov, compares, *a, **kw: ran.append(compares) or {})
    bench_step.run_suite("gpu", torch.device("cpu"), cases=["simclr_rn50_opt_*"], emit=lambda line: None)
    assert len(ran) == 5 and all(len(c) == 1 for c in ran)
    with pytest.raises(ValueError, match="simclr_rn50_opt_foreach"):
        bench_step.run_suite("gpu", torch.device("cpu"), cases=["simclr_rn50_opt_nothing*"])


@pytest.mark.cuda
def test_cuda_memory_and_fraction_of_peak(capsys):
    from fastssl.cli.bench import main

    rc = main(["step", "--config", str(ROOT / "configs/demo/simclr.yaml"), *TINY, "--device", "cuda", "--batch", "32",
               "--steps", "2", "--rounds", "1", "--warmup", "1", "--photometric", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    v = res["variants"][0]
    assert res["mem_source"] == "torch.cuda.max_memory_allocated" and res["peak_mem_gb"] > 0
    assert v["photometric_peak_gb"] > 0 and v["augmenter"] == "torch" and v["online_probe"]
    if res["peak_tflops"]:
        assert 0 < v["fraction_of_peak"] < 1
