"""``fastssl-bench peer`` in its smoke mode: the JSON contract (no timings asserted).

Each arm runs in its own process; ratios are quotients of the reported images/s; losses are finite; both
sides train the same backbone (parameter count); the stage table has every stage.
"""
import json
import math
import os

import pytest


def _check(out: dict, method: str) -> None:
    from fastssl.cli.bench_peer import ARMS

    r = out["methods"][method]
    arms = r["arms"]
    assert set(arms) == set(ARMS)
    pids = [p for a in arms.values() for p in a["pids"]] + [s["pid"] for s in r["stages_fastssl_rounds"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids          # a fresh process per arm and round
    ips = {k: a["images_per_second"] for k, a in arms.items()}
    assert all(v > 0 for v in ips.values())
    rt = r["ratios"]
    assert rt["fastssl_over_lightly"] == pytest.approx(ips["fastssl"] / ips["lightly"], rel=2e-3)
    assert rt["bare"] == max(("bare-fastssl", "bare-lightly"), key=ips.get)
    for arm in ("fastssl", "lightly"):
        assert rt[f"{arm}_over_bare"] == pytest.approx(ips[arm] / ips[rt["bare"]], rel=2e-3)
        assert rt[f"{arm}_over_own_bare"] == pytest.approx(ips[arm] / ips[f"bare-{arm}"], rel=2e-3)
    settings = out["settings"]
    for arm, a in arms.items():
        assert math.isfinite(a["first_loss"]) and math.isfinite(a["last_loss"])
        for rd in r["rounds"]:
            losses = rd[arm]["losses"]
            assert all(math.isfinite(x) for x in losses)
            want = settings["warmup"] + settings["steps"] if arm in ("lightly", "fastssl") else \
                settings["bare_warmup"] + settings["bare_steps"]
            assert len(losses) == want
    # The same backbone on both sides: torchvision's resnet18 without fc and timm's without its classifier.
    assert arms["lightly"]["params"]["backbone"] == arms["fastssl"]["params"]["backbone"] == 11_176_512
    assert set(arms["lightly"]["cpu_ms_per_image"]) == {"decode", "crop", "photometric", "model"}
    assert set(arms["fastssl"]["cpu_ms_per_image"]) == {"decode+crop", "photometric", "model"}
    assert all(v > 0 for a in ("lightly", "fastssl") for v in arms[a]["cpu_ms_per_image"].values())
    assert arms["fastssl"]["command"].startswith("python -m fastssl.train ")
    assert f"| {method} | fastssl |" in out["table"]


def test_bench_peer_smoke_simclr(demo_data, capsys, tmp_path):
    pytest.importorskip("lightly")
    from fastssl.cli.bench import main

    rc = main(["peer", "--smoke", "--data", str(demo_data), "--methods", "simclr", "--threads", "1", "--json",
               "--out", str(tmp_path / "peer.json")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "peer.json").read_text())["methods"].keys() == {"simclr"}
    _check(out, "simclr")
    fl = out["methods"]["simclr"]["arms"]["fastssl"]["command"]
    for kv in ("optim.name=sgd", "optim.lr=0.06", "method.temperature=0.5", "aug.views.1.brightness=0.8",
               "model.backbone=resnet18", "train.log_every=1"):
        assert kv in fl


@pytest.mark.slow
def test_bench_peer_smoke_dino(demo_data, capsys):
    pytest.importorskip("lightly")
    from fastssl.cli.bench import main

    assert main(["peer", "--smoke", "--data", str(demo_data), "--methods", "dino", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    _check(out, "dino")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_peer_arms_build_the_same_backbone_and_projector_width(arch):
    """At every --arch the lightly arm (torchvision) and fastssl (timm) train backbones of one size, and the
    projector is as wide as the features (lightly's SimCLRProjectionHead(512, 512, 128) / 2048-2048-128)."""
    pytest.importorskip("lightly")
    from fastssl.cli.bench_peer import FEATURE_DIM, LightlyArm, proj_hidden
    from fastssl.config import load_config
    from fastssl.models import count_params, create_backbone

    arm = LightlyArm("simclr", arch=arch)
    backbone, dim = create_backbone(load_config(None, [f"model.backbone={arch}"]).model)
    assert arm.params()["backbone"] == count_params(backbone)
    assert dim == FEATURE_DIM[arch] == proj_hidden(arch) == arm.model.projection_head.layers[0].in_features
    with pytest.raises(ValueError, match="resnet50"):
        proj_hidden("vit_small")


def test_peer_lightly_arm_bf16_autocasts_the_forward():
    """--precision bf16: the lightly arm's forward runs under bf16 autocast (its parameters stay fp32)."""
    pytest.importorskip("lightly")
    import torch

    from fastssl.cli.bench_peer import LightlyArm

    arm = LightlyArm("simclr", precision="bf16")
    seen = []
    arm.model.projection_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = arm.step([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], 0, 1)
    assert seen == [torch.bfloat16, torch.bfloat16] and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in arm.model.parameters())


@pytest.mark.cuda
def test_bench_peer_smoke_on_cuda_bf16(tmp_path, capsys):
    """The GPU recipe of the peer benchmark (224 px, ResNet-50, bf16) in its smoke sizes."""
    pytest.importorskip("lightly")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from fastssl.cli.bench import main

    # Its own photos (the bench writes them; no .beton, so no ffcv: the GPU machine has none).
    assert main(["peer", "--smoke", "--data", str(tmp_path / "photos"), "--methods", "simclr", "--device", "cuda",
                 "--precision", "bf16", "--arch", "resnet50", "--backend", "torch", "--workers", "2",
                 "--arms", "lightly,fastssl", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    arms = out["methods"]["simclr"]["arms"]
    assert arms["lightly"]["params"]["backbone"] == arms["fastssl"]["params"]["backbone"] == 23_508_032
    assert "train.device=cuda" in arms["fastssl"]["command"] and "train.precision=bf16" in arms["fastssl"]["command"]
    assert all(math.isfinite(a["last_loss"]) for a in arms.values())


def test_table_shows_no_model_cpu_without_a_bare_arm():
    """fastssl's model CPU per image is its bare arm's; run without one, the table says '-', not 0.0."""
    from fastssl.cli.bench_peer import _table

    def arm(ips, cpu):
        return {"images_per_second": ips, "images_per_second_rounds": [ips], "first_loss": 6.2, "last_loss": 6.5,
                "cpu_ms_per_image": cpu}

    res = {"methods": {"dino": {"ratios": {}, "arms": {
        "lightly": arm(6.3, {"decode": 1.45, "crop": 7.37, "photometric": 11.7, "model": 282.8}),
        "fastssl": arm(11.4, {"decode+crop": 2.05, "photometric": 1.99})}}}}
    rows = {line.split("|")[2].strip(): line for line in _table(res).splitlines()[2:]}
    assert rows["fastssl"].rstrip(" |").endswith("2.05 (decode+crop) / 1.99 / -")
    assert rows["lightly"].rstrip(" |").endswith("/ 282.8") and "| 1.81 |" in rows["fastssl"]
