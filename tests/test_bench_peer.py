"""``fastssl-bench peer`` in its smoke mode: the JSON contract (no timings asserted).

Each arm runs in its own process; ratios are quotients of the reported images/s; losses are finite; both
sides train the same backbone (parameter count); the stage table has every stage; lightly-tuned differs from
lightly only in compile and channels_last, and is the headline's reference when it ran.
"""
import json
import math
import os

import pytest


def _check(out: dict, method: str, want_arms=None) -> None:
    from fastssl.cli.bench_peer import CPU_ARMS, warmup_steps

    r = out["methods"][method]
    arms = r["arms"]
    assert set(arms) == set(want_arms or CPU_ARMS)
    pids = [p for a in arms.values() for p in a["pids"]] + [s["pid"] for s in r["stages_fastssl_rounds"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids          # a fresh process per arm and round
    ips = {k: a["images_per_second"] for k, a in arms.items()}
    assert all(v > 0 for v in ips.values())
    rt = r["ratios"]
    assert rt["fastssl_over_lightly"] == pytest.approx(ips["fastssl"] / ips["lightly"], rel=2e-3)
    ref = "lightly-tuned" if "lightly-tuned" in arms else "lightly"
    assert r["headline"]["against"] == ref and out["headline"][method] == r["headline"]
    assert r["headline"]["value"] == pytest.approx(ips["fastssl"] / ips[ref], rel=2e-3)
    assert len(r["headline"]["rounds"]) == out["settings"]["rounds"]
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
            # the loader's ready batches are untimed too (warmup_steps)
            want = warmup_steps(settings, arm) + settings["steps"] if arm in ("lightly", "lightly-tuned", "fastssl") \
                else settings["bare_warmup"] + settings["bare_steps"]
            assert len(losses) == want
    # The same backbone on both sides: torchvision's resnet18 without fc and timm's without its classifier.
    assert arms["lightly"]["params"]["backbone"] == arms["fastssl"]["params"]["backbone"] == 11_176_512
    assert set(arms["lightly"]["cpu_ms_per_image"]) == {"decode", "crop", "photometric", "model"}
    assert set(arms["fastssl"]["cpu_ms_per_image"]) == {"decode+crop", "photometric", "model"}
    assert all(v > 0 for a in ("lightly", "fastssl") for v in arms[a]["cpu_ms_per_image"].values())
    assert arms["fastssl"]["command"].startswith("python -m fastssl.train ")
    assert f"| {method} | fastssl |" in out["table"]
    if "lightly-tuned" in arms:
        _check_tuned_settings(arms["lightly"]["settings"], arms["lightly-tuned"]["settings"])
        assert arms["lightly-tuned"]["params"] == arms["lightly"]["params"]


def _check_tuned_settings(plain: dict, tuned: dict) -> None:
    """lightly-tuned is the lightly arm plus compile and channels_last: every other recorded setting is equal."""
    differ = {k for k in plain.keys() | tuned.keys() if plain.get(k) != tuned.get(k)}
    assert differ == {"channels_last", "compile", "compile_options"}
    assert plain["channels_last"] is False and plain["compile"] == [] and plain["compile_options"] is None
    assert tuned["channels_last"] is True and "model.forward" in tuned["compile"]
    assert tuned["compile_options"]["dynamic"] is False


def test_bench_peer_smoke_simclr(demo_data, capsys, tmp_path):
    """All five arms, each in its own process; lightly-tuned compiles with Dynamo's eager backend (the code path,
    not inductor's minutes on a CPU)."""
    pytest.importorskip("lightly", reason="the peer benchmark's other arm: pip install 'fastssl[peer]'")
    from fastssl.cli.bench import main
    from fastssl.cli.bench_peer import ARMS

    rc = main(["peer", "--smoke", "--data", str(demo_data), "--methods", "simclr", "--threads", "1", "--json",
               "--arms", ",".join(ARMS), "--compile-backend", "eager", "--out", str(tmp_path / "peer.json")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "peer.json").read_text())["methods"].keys() == {"simclr"}
    _check(out, "simclr", ARMS)
    assert out["methods"]["simclr"]["arms"]["lightly-tuned"]["settings"]["compile_options"]["backend"] == "eager"
    fl = out["methods"]["simclr"]["arms"]["fastssl"]["command"]
    for kv in ("optim.name=sgd", "optim.lr=0.06", "method.temperature=0.5", "aug.views.1.brightness=0.8",
               "model.backbone=resnet18", "train.log_every=1"):
        assert kv in fl


@pytest.mark.slow
def test_bench_peer_smoke_dino(demo_data, capsys):
    """DINO with every arm over two interleaved rounds, 3 local views (lightly's DINOTransform and fastssl's
    aug.num_local alike)."""
    pytest.importorskip("lightly", reason="the peer benchmark's other arm: pip install 'fastssl[peer]'")
    from fastssl.cli.bench import main
    from fastssl.cli.bench_peer import ARMS

    assert main(["peer", "--smoke", "--data", str(demo_data), "--methods", "dino", "--threads", "1", "--json",
                 "--arms", ",".join(ARMS), "--compile-backend", "eager", "--local-views", "3", "--rounds", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    _check(out, "dino", ARMS)
    arms = out["methods"]["dino"]["arms"]
    assert "aug.num_local=3" in arms["fastssl"]["command"]
    assert len(arms["lightly"]["settings"]["transform"]["views"]) == 2 + 3
    assert arms["lightly-tuned"]["settings"]["compile"] == ["model.forward", "model.forward_teacher"]
    # interleaved: the second round runs the arms in the reverse order (each in a fresh process: _check)
    r1, r2 = ([rd[a]["started_at"] for a in ARMS] for rd in out["methods"]["dino"]["rounds"])
    assert r1 == sorted(r1) and r2 == sorted(r2, reverse=True) and max(r1) < min(r2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vit_small_patch16"])
def test_peer_arms_build_the_same_backbone_and_projector_width(arch):
    """At every --arch the lightly arm (torchvision's ResNets, timm's ViT) and fastssl train backbones of one size,
    and the projector is as wide as the features (lightly's SimCLRProjectionHead(512, 512, 128) / 2048-2048-128)."""
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


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_lightly_tuned_is_the_lightly_arm_compiled_and_channels_last(method):
    """The tuned arm's recorded settings equal the lightly arm's but for compile and channels_last; its weights
    are channels_last and what the loop calls is compiled (DINO: the student's forward and the teacher's)."""
    pytest.importorskip("lightly", reason="the peer benchmark's other arm: pip install 'fastssl[peer]'")
    import torch

    from fastssl.cli.bench_peer import LightlyArm

    plain, tuned = LightlyArm(method), LightlyArm(method, tuned=True)
    _check_tuned_settings(plain.settings, tuned.settings)
    assert tuned.settings["compile_options"]["backend"] == "inductor"
    assert tuned.settings["compile"] == (["model.forward"] if method == "simclr" else
                                         ["model.forward", "model.forward_teacher"])
    conv = next(m for m in tuned.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # what the loop calls is compiled: model(x) and model.forward(x) (lightly's DINO loop) alike
    assert hasattr(tuned.model.forward, "_torchdynamo_orig_callable")
    assert not hasattr(plain.model.forward, "_torchdynamo_orig_callable")
    if method == "dino":
        assert hasattr(tuned.model.forward_teacher, "_torchdynamo_orig_callable")
    assert tuned.params() == plain.params()


def test_headline_is_fastssl_over_lightly_tuned_when_it_ran():
    """With lightly-tuned among the arms the headline quotient is fastssl over it (the others stay as ratios);
    without it, over the lightly arm."""
    from fastssl.cli.bench_peer import _headline, _table, summarise

    def arm(ips, loss=6.0):
        return {"images_per_second": ips, "losses": [loss, loss - 0.1], "pid": 1, "steps": 2, "params": {"backbone": 1}}

    rounds = [{"lightly": arm(10.0), "lightly-tuned": arm(20.0), "fastssl": arm(30.0), "bare-lightly": arm(40.0),
               "bare-fastssl": arm(50.0)},
              {"lightly-tuned": arm(25.0), "lightly": arm(10.0), "fastssl": arm(25.0), "bare-lightly": arm(40.0),
               "bare-fastssl": arm(50.0)}]
    r = summarise("simclr", rounds, [])
    assert r["headline"] == {"ratio": "fastssl_over_lightly_tuned", "against": "lightly-tuned",
                             "value": pytest.approx(27.5 / 22.5, abs=1e-4), "rounds": [1.5, 1.0]}
    assert r["ratios"]["fastssl_over_lightly"] == pytest.approx(2.75, abs=1e-4)
    assert r["ratios"]["fastssl_over_bare"] == pytest.approx(0.55, abs=1e-4)
    assert r["ratios"]["lightly_tuned_over_bare"] == pytest.approx(0.45, abs=1e-4)
    res = {"methods": {"simclr": r}}
    row = next(line for line in _table(res).splitlines() if "| fastssl |" in line)
    assert "| 1.22 | 2.75 | 0.55 |" in row
    assert _headline(res) == "simclr: fastssl / lightly-tuned = 1.22x (rounds: 1.50, 1.00)"
    plain = summarise("simclr", [{k: v for k, v in rd.items() if k != "lightly-tuned"} for rd in rounds], [])
    assert plain["headline"]["against"] == "lightly" and "fastssl_over_lightly_tuned" not in plain["ratios"]
    # A run cut short mid-round (--out is written after each arm): the partial round counts where it can.
    cut = summarise("simclr", [rounds[0], {"bare-fastssl": arm(60.0), "bare-lightly": arm(40.0)}], [])
    assert cut["arms"]["bare-fastssl"]["images_per_second_rounds"] == [50.0, 60.0]
    assert cut["arms"]["fastssl"]["images_per_second_rounds"] == [30.0] and cut["headline"]["rounds"] == [1.5]


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


def test_warmup_drains_each_arms_prefetched_batches():
    """Timing starts once the batches a loader filled during compilation are used up: else a short run
    of a slow loader is served from its queue and measures the model."""
    from fastssl.cli.bench_peer import warmup_steps

    spec = {"warmup": 5, "workers": 14, "backend": "ffcv"}
    assert warmup_steps(spec, "lightly") == warmup_steps(spec, "lightly-tuned") == 5 + 28  # 14 x prefetch_factor 2
    assert warmup_steps(spec, "fastssl") == 5 + 4                                          # ffcv: 2 ahead + 2 slots
    assert warmup_steps({**spec, "backend": "torch"}, "fastssl") == 5 + 56                 # 14 x prefetch_factor 4
    assert warmup_steps({**spec, "workers": 0}, "lightly") == 5


def test_dino_local_size_keeps_whole_patches_for_a_vit():
    from fastssl.cli.bench_peer import local_size_for

    assert local_size_for(224) == local_size_for(224, 16) == 96
    assert local_size_for(96) == 41 and local_size_for(96, 16) == 48      # ViT-S/16 needs a multiple of 16
    assert local_size_for(160, 16) % 16 == 0 and local_size_for(32, 16) == 16
