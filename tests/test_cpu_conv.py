"""train.cpu_conv_wgrad: each rewritten weight gradient equals the convolution's, the module swap changes nothing
else, and the per-shape choices are kept on disk per machine."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import ConfigError, load_config
from fastssl.models import cpu_conv
from fastssl.models.cpu_conv import ALTERNATIVES, FastWgradConv2d, use_fast_wgrad, wgrad_conv, wgrad_gemm

CL = torch.channels_last


@pytest.mark.parametrize("cin,cout,hw,k,stride,pad", [
    (8, 16, 9, 3, 1, 1), (16, 8, 10, 3, 2, 1), (8, 12, 7, 1, 2, 0), (3, 8, 16, 7, 2, 3), (6, 6, 5, 3, 1, 0),
])
@pytest.mark.parametrize("how", ALTERNATIVES)
def test_each_rewrite_is_the_convolutions_weight_gradient(how, cin, cout, hw, k, stride, pad):
    # (16, 8, 10, 3, 2, 1): (10 + 2 - 3) is odd, so the dilated forward conv's output is one larger than
    # the kernel and wgrad_conv must cut it.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cin, hw, hw, generator=g).contiguous(memory_format=CL)
    w = torch.randn(cout, cin, k, k, generator=g, requires_grad=True)
    y = F.conv2d(x, w, None, stride, pad)
    gy = torch.randn(y.shape, generator=g).contiguous(memory_format=CL)
    (ref,) = torch.autograd.grad(y, w, gy)
    args = (gy, x, (k, k), (stride, stride), (pad, pad))
    got = wgrad_gemm(*args) if how == "gemm" else wgrad_conv(*args, nchw=how == "conv_nchw")
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("mode", ALTERNATIVES + ("auto",))
def test_swapped_model_trains_identically(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_conv, "_disk", None)
    monkeypatch.setattr(cpu_conv, "_choice", {})  # as in a fresh process: nothing chosen yet
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 1, 1, 0, bias=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).to(memory_format=CL)
    ours = copy.deepcopy(net)
    assert use_fast_wgrad(ours, mode) == 3
    assert all(type(m) is FastWgradConv2d for m in ours.modules() if isinstance(m, nn.Conv2d))
    assert list(ours.state_dict()) == list(net.state_dict())
    x = torch.randn(6, 3, 12, 12).contiguous(memory_format=CL)
    for m in (net, ours):
        m(x).square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    if mode == "auto":  # every conv shape was timed once and given one of the candidates, kept on disk
        keys = [((6, 3, 12, 12), (8, 3, 3, 3), (1, 1), (1, 1)), ((6, 8, 12, 12), (16, 8, 3, 3), (2, 2), (1, 1)),
                ((6, 16, 6, 6), (16, 16, 1, 1), (1, 1), (0, 0))]
        assert {cpu_conv._choice[k] for k in keys} <= {"onednn", *ALTERNATIVES}
        disk = json.loads(cpu_conv.cache_path().read_text())
        assert {disk[cpu_conv._disk_key(k)]["choice"] for k in keys} == {cpu_conv._choice[k] for k in keys}


def test_other_convolutions_take_the_plain_path():
    grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    plain = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(grouped, dilated, plain)
    assert use_fast_wgrad(net, "gemm") == 1 and type(grouped) is nn.Conv2d and type(plain) is FastWgradConv2d
    x = torch.randn(2, 4, 8, 8)  # NCHW: the swapped conv falls back to F.conv2d, same result
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.weight, plain.bias, 1, 1))
    with torch.no_grad():
        plain(x.contiguous(memory_format=CL))
    assert use_fast_wgrad(nn.Conv2d(2, 2, 1), "onednn") == 0


def test_bad_mode_fails_with_the_closest():
    with pytest.raises(ConfigError, match="gemm"):
        load_config(None, ["train.cpu_conv_wgrad=gem"])
    with pytest.raises(ValueError, match="onednn"):
        use_fast_wgrad(nn.Conv2d(2, 2, 1), "onedn")


def test_a_rewrite_must_win_by_the_margin():
    # Near-ties keep oneDNN's, so noisy timings pick the same way in every run; among rewrites, the fastest.
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.9}) == "onednn"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.8}) == "gemm"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.99}, margin=0.0) == "gemm"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 1.2}, margin=0.0) == "onednn"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.8, "conv": 0.6, "conv_nchw": 0.7}) == "conv"
    assert cpu_conv.choose({"onednn": 1.0, "gemm": 0.9, "conv": 0.95, "conv_nchw": 2.0}) == "onednn"


def _fake_candidates(monkeypatch, calls):
    monkeypatch.setattr(cpu_conv, "_onednn_backward", lambda *a: calls.append("onednn") or (None, None))
    monkeypatch.setattr(cpu_conv, "_wgrad", lambda how, *a: calls.append(how))


def test_pick_times_all_interleaved_and_keeps_the_choice_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_conv, "_disk", None)
    calls = []
    _fake_candidates(monkeypatch, calls)
    key = ("test-shape",)
    monkeypatch.delitem(cpu_conv._choice, key, raising=False)
    got = cpu_conv._pick(key, None, None, torch.empty(1, 1, 1, 1), (1, 1), (0, 0), rounds=3)
    assert cpu_conv._choice.pop(key) == got in ("onednn", *ALTERNATIVES)
    # one warm call each, then interleaved: a burst of other work lands on all of them
    every = ["onednn", *ALTERNATIVES]
    assert calls == every + every * 3
    entry = json.loads(cpu_conv.cache_path().read_text())[cpu_conv._disk_key(key)]
    assert entry["choice"] == got and set(entry["ms"]) == set(every)
    # A new process (the module's memory cleared) reads the choice and times nothing.
    calls.clear()
    monkeypatch.setattr(cpu_conv, "_disk", None)
    assert cpu_conv._pick(key, None, None, torch.empty(1, 1, 1, 1), (1, 1), (0, 0)) == got
    assert calls == [] and cpu_conv._choice.pop(key) == got


def test_the_disk_key_names_the_threads_and_a_corrupt_cache_is_timed_again(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSSL_CACHE_DIR", str(tmp_path))
    n = torch.get_num_threads()
    a = cpu_conv._disk_key(("s",))
    torch.set_num_threads(n + 1)
    try:
        assert cpu_conv._disk_key(("s",)) != a  # timings of 2 threads do not choose for 3
    finally:
        torch.set_num_threads(n)
    cpu_conv.cache_path().write_text("{not json")
    monkeypatch.setattr(cpu_conv, "_disk", None)
    calls = []
    _fake_candidates(monkeypatch, calls)
    monkeypatch.delitem(cpu_conv._choice, ("s",), raising=False)
    cpu_conv._pick(("s",), None, None, None, (1, 1), (0, 0), rounds=1)
    assert len(calls) == 2 * (1 + len(ALTERNATIVES))
    assert json.loads(cpu_conv.cache_path().read_text())[a]["choice"] == cpu_conv._choice.pop(("s",))
