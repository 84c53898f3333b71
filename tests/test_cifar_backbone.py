"""resnet18_cifar / resnet50_cifar (solo-learn's CIFAR stem on timm's ResNets) and the CIFAR / STL-10 recipes."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastssl.config import ModelConfig, derive, load_config
from fastssl.models import BACKBONES, create_backbone

ROOT = Path(__file__).resolve().parents[1]
SMALL_RECIPES = sorted(p for d in ("cifar10", "cifar100", "stl10") for p in (ROOT / "configs" / d).glob("*.yaml"))


def test_resnet18_cifar_has_solo_learns_stem_and_keeps_the_resolution():
    net, dim = create_backbone(ModelConfig(backbone="resnet18_cifar"))
    assert dim == 512
    # solo-learn solo/methods/base.py: Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False); maxpool Identity
    c = net.conv1
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias) == (3, 64, (3, 3), (1, 1),
                                                                                          (2, 2), None)
    assert isinstance(net.maxpool, nn.Identity)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = net.forward_features(x)
        out = net(x)
    # padding 2 makes 32 px 34 px after the stem, then 17, 9 and 5 after the three stride-2 stages
    # (lightly's padding-1 stem ends at 4x4); timm's ImageNet stem would leave 1x1 here.
    assert fmap.shape == (2, 512, 5, 5)
    assert out.shape == (2, 512)


def test_state_dict_is_timms_resnet18_but_for_the_stem_conv():
    import timm

    net, _ = create_backbone(ModelConfig(backbone="resnet18_cifar"))
    ref = timm.create_model("resnet18", pretrained=False, num_classes=0)
    ours, theirs = net.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k].shape != theirs[k].shape] == ["conv1.weight"]
    assert ours["conv1.weight"].shape == (64, 3, 3, 3)


def test_resnet50_cifar():
    assert "resnet50_cifar" in BACKBONES
    net, dim = create_backbone(ModelConfig(backbone="resnet50_cifar"))
    assert dim == 2048 and net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity)


def test_a_simclr_step_on_resnet18_cifar_trains(one_torch_thread):
    from fastssl.methods import create_method

    torch.manual_seed(0)
    m = create_method("simclr", backbone="resnet18_cifar", proj_hidden=64, proj_dim=32)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    before = m.backbone.conv1.weight.detach().clone()
    out = m(views, 0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.backbone.conv1.weight.grad is not None and m.backbone.conv1.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, m.backbone.conv1.weight)


def test_export_round_trips_in_the_native_format(tmp_path):
    from fastssl.cli.export import load_backbone, main as export_main, pick_format
    from test_export import _method_checkpoint, _run_features

    net, _ = create_backbone(ModelConfig(backbone="resnet18_cifar"))
    assert pick_format("auto", "resnet18_cifar", net) == "native"  # timm/torchvision build another stem by name
    run = _method_checkpoint(tmp_path, ["model.backbone=resnet18_cifar", "aug.global_size=32",
                                        "method.proj_hidden=32", "method.proj_dim=16"])
    out = tmp_path / "rn18c.safetensors"
    assert export_main([str(run), "--out", str(out), "--no-verify"]) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(out)(x), _run_features(run, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", SMALL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_small_benchmark_recipes_resolve_and_build(path):
    from fastssl.methods import create_method

    cfg = load_config(path)
    cifar = path.parent.name.startswith("cifar")
    # solo-learn swaps in the CIFAR stem for cifar10/cifar100 only; STL-10 (96 px) keeps the ImageNet stem
    assert cfg.model.backbone == ("resnet18_cifar" if cifar else "resnet18")
    # the in-training kNN and the online probe stay on, STL-10's unlabeled images included (labels -1 are left out)
    assert cfg.eval.online_probe and cfg.eval.final and cfg.eval.every_epochs > 0 and cfg.data.val
    d = derive(cfg, 105_000 if not cifar else 50_000)
    method = create_method(cfg, d.total_steps)
    assert method.feat_dim == 512
