"""fastssl-export: the backbone alone, loaded by torchvision / timm / fastssl, gives the run's own features.

Each exported file is loaded the way its JSON says (torchvision ``resnet18()`` with ``fc``
dropped and ``strict=True``; ``timm.create_model(pretrained=True, pretrained_cfg_overlay=
dict(file=...))``, offline; fastssl's ``load_backbone``) and its features on the same images
are compared with ``method.embed`` of the checkpoint it came from.
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from fastssl import checkpoint
from fastssl.cli import export as E
from fastssl.cli.export import main as export_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails: timm must read the exported file, not the Hugging Face hub."""
    import socket

    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _method_checkpoint(tmp_path, overrides, step=7):
    """A method built directly and saved in the trainer's checkpoint layout (no training: seconds, any backbone)."""
    from fastssl.config import load_config, to_dict
    from fastssl.methods import create_method

    cfg = load_config(None, overrides + ["train.name=exp", f"train.out_dir={tmp_path}"])
    torch.manual_seed(0)
    method = create_method(cfg, 10)
    with torch.no_grad():  # BN statistics away from (0, 1), so a wrong BN mapping would show in the features
        for m in method.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    run = tmp_path / "exp"
    checkpoint.save_atomic({"method": method.state_dict(), "optimizer": {}, "probe": None, "step": step, "epoch": 0,
                            "batch_in_epoch": step, "total_steps": 10, "wall_seconds": 0.0, "knn_init": None,
                            "rng": [checkpoint.rng_state()], "config": to_dict(cfg)},
                           run / "checkpoints" / "last.pt")
    return run


def _run_features(run, x):
    _, method, _ = checkpoint.load_for_eval(run)
    with torch.no_grad():
        return method.embed(x)


def _meta(path):
    return json.loads(Path(path).with_suffix(".json").read_text())


def test_cpu_resnet_run_exports_native_and_refuses_torchvision(demo_data, tmp_path, capsys):
    from fastssl.train import main as train

    assert train(["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"model.backbone": "resnet_nano", "train.max_steps": 1})) == 0
    run = tmp_path / "t"
    assert export_main([str(run)]) == 0                                     # auto -> native for resnet_nano
    out = run / "export" / "resnet_nano-native-step1.safetensors"
    assert out.is_file() and "load:" in capsys.readouterr().out
    meta = _meta(out)
    assert meta["format"] == "native" and meta["architecture"] == "resnet_nano"
    assert meta["image_size"] == 16 and meta["run"]["step"] == 1 and meta["run"]["name"] == "t"
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["verified"]["max_abs_diff"] <= 1e-4
    from safetensors.torch import load_file

    assert not any(k.startswith(("projector", "teacher")) for k in load_file(str(out)))   # the backbone alone
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(E.load_backbone(out)(x), _run_features(run, x))

    for fmt, words in (("torchvision", "not a torchvision architecture"), ("timm", "not an architecture timm")):
        assert export_main([str(run), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert words in err and "--format native" in err, err


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet_nano", "resnet_nano_s2"])
def test_fastssl_cpu_resnets_pick_native(name):
    """Their stems (3x3, stride 1 or 2, no max-pool) are not timm's: auto must not call them timm models."""
    from types import SimpleNamespace

    from fastssl.cli.export import ExportError, pick_format
    from fastssl.models import create_backbone

    net, _ = create_backbone(SimpleNamespace(backbone=name, drop_path=0.0))
    assert pick_format("auto", name, net) == "native"
    with pytest.raises(ExportError):
        pick_format("timm", name, net)


def test_torchvision_resnet_loads_strict_in_torchvision_and_timm(tmp_path, no_network):
    import timm
    import torchvision

    run = _method_checkpoint(tmp_path, ["model.backbone=resnet18", "aug.global_size=32", "method.proj_hidden=32",
                                        "method.proj_dim=16"])
    x = torch.randn(2, 3, 32, 32)
    want = _run_features(run, x)

    out = tmp_path / "rn18.safetensors"
    assert export_main([str(run), "--out", str(out)]) == 0                  # auto -> torchvision
    meta = _meta(out)
    assert meta["format"] == "torchvision" and meta["run"]["step"] == 7 and meta["feat_dim"] == 512
    from safetensors.torch import load_file

    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()                                             # "once fc is dropped"
    tv.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), want, rtol=1e-4, atol=1e-5)

    pt = tmp_path / "rn18_timm.pt"                                          # torch .pt on request
    assert export_main([str(run), "--format", "timm", "--out", str(pt)]) == 0
    meta = _meta(pt)
    assert meta["weights_format"] == "pt" and meta["timm"]["model_name"] == "resnet18"
    # offline: the file is read from disk; num_classes=0 in the overlay makes timm build it headless, load strict
    m = timm.create_model("resnet18", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(pt), **meta["timm"]["pretrained_cfg_overlay"]))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), want, rtol=1e-4, atol=1e-5)
    data_cfg = timm.data.resolve_data_config(model=m)
    assert tuple(data_cfg["input_size"]) == (3, 32, 32) and data_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("pool,layer_scale", [("avg", 0.1), ("token", 0.0)])
def test_vit_exports_to_timm_vision_transformer(tmp_path, pool, layer_scale, no_network):
    import timm

    run = _method_checkpoint(tmp_path, ["model.backbone=vit_micro_patch8", "aug.global_size=32",
                                        f"model.global_pool={pool}", f"model.layer_scale={layer_scale}",
                                        "method.proj_hidden=32", "method.proj_dim=16"])
    out = tmp_path / "vit.safetensors"
    assert export_main([str(run), "--out", str(out)]) == 0                  # auto -> timm
    meta = _meta(out)
    t = meta["timm"]
    assert meta["format"] == "timm" and t["kwargs"]["global_pool"] == pool
    m = timm.create_model(t["model_name"], pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(out), **t["pretrained_cfg_overlay"]), **t["kwargs"])
    m.eval()
    for size in (32, 48):                                                   # native grid and a resampled one
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(m(x), _run_features(run, x), rtol=1e-4, atol=1e-5)
    assert export_main([str(run), "--format", "torchvision", "--out", str(tmp_path / "no.safetensors")]) == 2


def test_trust_flag_is_passed_only_where_load_for_eval_takes_it(tmp_path, monkeypatch):
    run = _method_checkpoint(tmp_path, ["model.backbone=resnet_tiny", "aug.global_size=16", "method.proj_hidden=16",
                                        "method.proj_dim=8"])
    real = checkpoint.load_for_eval
    seen = []

    def with_trust(path, device="cpu", trust=False):
        seen.append(trust)
        return real(path, device)

    def without_trust(path, device="cpu"):
        seen.append("old")
        return real(path, device)

    monkeypatch.setattr(checkpoint, "load_for_eval", with_trust)
    assert export_main([str(run), "--trust-checkpoint", "--no-verify"]) == 0
    monkeypatch.setattr(checkpoint, "load_for_eval", without_trust)
    assert export_main([str(run), "--trust-checkpoint", "--no-verify"]) == 0
    assert seen == [True, "old"]


def test_export_that_would_not_reproduce_the_run_is_refused(tmp_path, monkeypatch, capsys):
    run = _method_checkpoint(tmp_path, ["model.backbone=resnet_tiny", "aug.global_size=16", "method.proj_hidden=16",
                                        "method.proj_dim=8"])
    real = E.load_backbone

    def perturbed(path):
        m = real(path)
        with torch.no_grad():
            m.conv1.weight.mul_(1.5)
        return m

    monkeypatch.setattr(E, "load_backbone", perturbed)
    out = tmp_path / "bad.safetensors"
    assert export_main([str(run), "--out", str(out)]) == 2
    assert "differ from the run's" in capsys.readouterr().err and not out.exists()
