"""The step's options that a GPU run measures (``fastssl-bench step`` variants): what each one changes.

Their speed is measured on a GPU (BENCHMARKS.md); here, that each option reaches the step and
leaves the computation the same.
"""
import pytest
import torch

from fastssl.config import ConfigError, load_config


def _core(tmp_path, *extra):
    from fastssl.config import derive
    from fastssl.engine import TrainCore, make_accelerator

    cfg = load_config("configs/demo/simclr.yaml", [
        "model.backbone=resnet_tiny", "method.proj_hidden=32", "method.proj_dim=16", "optim.batch_size=8",
        "optim.warmup_epochs=0", "train.epochs=1", f"train.out_dir={tmp_path}", "train.name=t",
        "train.progress=false", *extra])
    device = torch.device("cpu")
    return TrainCore(cfg, derive(cfg, 16), make_accelerator(cfg, device))


def test_compile_scope_method_compiles_the_whole_forward_where_it_reads_no_step(tmp_path):
    core = _core(tmp_path, "train.compile=on", "train.compile_scope=method")
    assert hasattr(core.method, "compile_state")               # the method's own call is the compiled unit
    assert not hasattr(core.method.backbone, "compile_state")
    plain = _core(tmp_path, "train.compile=on")
    assert hasattr(plain.method.backbone, "compile_state") and not hasattr(plain.method, "compile_state")


def test_compile_scope_method_falls_back_to_the_backbone_where_the_forward_reads_the_step(tmp_path):
    msgs = []
    from fastssl.config import derive
    from fastssl.engine import TrainCore, make_accelerator

    cfg = load_config("configs/demo/byol.yaml", [
        "model.backbone=resnet_tiny", "optim.batch_size=8", "train.epochs=1", f"train.out_dir={tmp_path}",
        "train.compile=on", "train.compile_scope=method"])
    core = TrainCore(cfg, derive(cfg, 16), make_accelerator(cfg, torch.device("cpu")), log=msgs.append)
    assert hasattr(core.method.backbone, "compile_state") and not hasattr(core.method, "compile_state")
    assert any("reads the step" in m for m in msgs)


@pytest.mark.parametrize("key", ["train.compile_scope=graph", "method.loss_dtype=bf16", "optim.foreach=maybe"])
def test_bad_option_values_name_the_key(key):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config("configs/demo/simclr.yaml", [key])


def test_simclr_loss_dtype_input_keeps_the_steps_precision(monkeypatch):
    from fastssl import losses
    from fastssl.methods.simclr import SimCLR

    seen = []
    real = losses.nt_xent

    def spy(z1, z2, **kw):
        seen.append(z1.dtype)
        return real(z1, z2, **kw)

    monkeypatch.setattr(losses, "nt_xent", spy)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    m = SimCLR(backbone, feat_dim=8, proj_hidden=16, proj_dim=8, loss_dtype="input")
    assert SimCLR(backbone, feat_dim=8).loss_fp32 and not m.loss_fp32
    views = [torch.randn(16, 3, 12, 12), torch.randn(16, 3, 12, 12)]
    out = {}
    for fp32 in (True, False):  # the same weights, the loss's input cast or not
        m.loss_fp32 = fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[fp32] = float(m(views, 0)["loss"].detach())
    assert seen == [torch.float32, torch.bfloat16]
    assert abs(out[True] - out[False]) < 0.02 * abs(out[True])


def test_update_path_reads_the_optimizers_choice():
    from timm.optim import Lars

    from fastssl.optim import update_path

    p = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    assert update_path(Lars(p, lr=0.1)) == "single-tensor"             # CPU tensors: timm loops, as torch's default
    assert update_path(Lars(p, lr=0.1, foreach=True)) == "foreach"
    assert update_path(torch.optim.AdamW(p, lr=0.1, fused=True)) == "fused"
    assert update_path(torch.optim.SGD(p, lr=0.1, foreach=False)) == "single-tensor"
    assert update_path(torch.optim.SGD(p, lr=0.1, foreach=True)) == "foreach"


@pytest.mark.parametrize("name", ["lars", "sgd"])
def test_optim_foreach_picks_the_update_path_and_both_paths_agree(name):
    from types import SimpleNamespace

    from fastssl.optim import build_optimizer, update_path

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(8, 6)
    for net, fe, want in zip(nets, ("on", "off"), ("foreach", "single-tensor")):
        cfg = SimpleNamespace(name=name, weight_decay=1e-4, momentum=0.9, lars_eta=0.02, foreach=fe)
        opt = build_optimizer(net, cfg, 0.5)
        assert update_path(opt) == want
        for _ in range(3):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_the_whole_simclr_forward_compiles_without_falling_back(tmp_path):
    """train.compile_scope=method through inductor (C++ on the CPU): two steps, no eager fallback."""
    from fastssl.engine import train_step
    from fastssl.pipelines import Batch

    core = _core(tmp_path, "train.compile=on", "train.compile_scope=method")
    views = [torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    batch = Batch(views=views, labels=None, indices=torch.arange(8))
    for step in range(2):
        assert train_step(core, [batch], step) == 1
    assert core.method.compile_state == {"calls": 2, "failed": False}
    assert torch.isfinite(core.loss_sum)
