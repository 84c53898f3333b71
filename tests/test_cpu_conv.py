"""train.cpu_conv_wgrad: the GEMM weight gradient equals the convolution's, and the module swap changes nothing else."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import ConfigError, load_config
from fastssl.models import cpu_conv
from fastssl.models.cpu_conv import GemmWgradConv2d, use_gemm_wgrad, wgrad_gemm

CL = torch.channels_last


@pytest.mark.parametrize("cin,cout,hw,k,stride,pad", [
    (8, 16, 9, 3, 1, 1), (16, 8, 10, 3, 2, 1), (8, 12, 7, 1, 2, 0), (3, 8, 16, 7, 2, 3), (6, 6, 5, 3, 1, 0),
])
def test_wgrad_gemm_is_the_convolutions_weight_gradient(cin, cout, hw, k, stride, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cin, hw, hw, generator=g).contiguous(memory_format=CL)
    w = torch.randn(cout, cin, k, k, generator=g, requires_grad=True)
    y = F.conv2d(x, w, None, stride, pad)
    gy = torch.randn(y.shape, generator=g).contiguous(memory_format=CL)
    (ref,) = torch.autograd.grad(y, w, gy)
    got = wgrad_gemm(gy, x, (k, k), (stride, stride), (pad, pad))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("mode", ["gemm", "auto"])
def test_swapped_model_trains_identically(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 1, 1, 0, bias=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).to(memory_format=CL)
    ours = copy.deepcopy(net)
    assert use_gemm_wgrad(ours, mode) == 3
    assert all(type(m) is GemmWgradConv2d for m in ours.modules() if isinstance(m, nn.Conv2d))
    assert list(ours.state_dict()) == list(net.state_dict())
    x = torch.randn(6, 3, 12, 12).contiguous(memory_format=CL)
    for m in (net, ours):
        m(x).square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    if mode == "auto":  # every conv shape was timed once and given one of the two
        assert {cpu_conv._choice[(tuple(s), tuple(m.weight.shape), m.stride, m.padding)]
                for s, m in [((6, 3, 12, 12), ours[0]), ((6, 8, 12, 12), ours[3]), ((6, 16, 6, 6), ours[5])]} <= {"gemm", "onednn"}


def test_other_convolutions_take_the_plain_path():
    grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    plain = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(grouped, dilated, plain)
    assert use_gemm_wgrad(net, "gemm") == 1 and type(grouped) is nn.Conv2d and type(plain) is GemmWgradConv2d
    x = torch.randn(2, 4, 8, 8)  # NCHW: the swapped conv falls back to F.conv2d, same result
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.weight, plain.bias, 1, 1))
    with torch.no_grad():
        plain(x.contiguous(memory_format=CL))
    assert use_gemm_wgrad(nn.Conv2d(2, 2, 1), "onednn") == 0


def test_bad_mode_fails_with_the_closest():
    with pytest.raises(ConfigError, match="gemm"):
        load_config(None, ["train.cpu_conv_wgrad=gem"])
    with pytest.raises(ValueError, match="onednn"):
        use_gemm_wgrad(nn.Conv2d(2, 2, 1), "onedn")


def test_the_gemm_must_win_by_the_margin():
    # Near-ties keep oneDNN's, so noisy timings pick the same way in every run.
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.9}) == "onednn"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.8}) == "gemm"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.99}, margin=0.0) == "gemm"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 1.2}, margin=0.0) == "onednn"


def test_pick_times_both_and_caches_the_choice(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_conv, "_onednn_backward", lambda *a: calls.append("onednn") or (None, None))
    monkeypatch.setattr(cpu_conv, "wgrad_gemm", lambda *a: calls.append("gemm"))
    key = ("test-shape",)
    monkeypatch.delitem(cpu_conv._choice, key, raising=False)
    got = cpu_conv._pick(key, None, None, torch.empty(1, 1, 1, 1), (1, 1), (0, 0), rounds=3)
    assert cpu_conv._choice.pop(key) == got in ("gemm", "onednn")
    # one warm call each, then interleaved: a burst of other work lands on both
    assert calls == ["onednn", "gemm"] + ["onednn", "gemm"] * 3
