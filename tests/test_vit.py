"""ViT backbones: attention kernels agree, any input size, position-embedding resampling,
token dropping, one compile per resolution."""
import pytest
import torch

from fastssl.config import ModelConfig
from fastssl.models import create_backbone
from fastssl.models.vit import Attention, VisionTransformer, naive_attention, resample_pos_embed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def micro(**kw):
    torch.manual_seed(0)
    return create_backbone(ModelConfig(backbone="vit_micro_patch8", **kw))[0]


def test_all_registered_sizes_build_with_their_widths():
    from fastssl.models.vit import _SIZES

    for name, (patch, dim, depth, heads, img) in _SIZES.items():
        if dim > 384:
            continue  # base models: same code, more memory
        net, feat = create_backbone(ModelConfig(backbone=name))
        assert isinstance(net, VisionTransformer) and feat == dim and len(net.blocks) == depth and net.patch == patch


def test_sdpa_equals_naive_attention_values_and_grads():
    x = torch.randn(3, 3, 32, 32)
    outs, grads = [], []
    for impl in ("sdpa", "naive"):
        net = micro(attn=impl)
        y = net(x)
        y.pow(2).sum().backward()
        outs.append(y)
        grads.append(net.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_naive_attention_is_the_softmax_formula():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    torch.testing.assert_close(naive_attention(q, k, v), want)


def test_xformers_missing_fails_loudly_with_install_command():
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install 'fastssl\[xformers\]'"):
        Attention(64, 4, impl="xformers")


def test_any_input_size_and_pooling_modes():
    avg, tok = micro(global_pool="avg"), micro(global_pool="token")
    for s in (16, 32, 48, 64):
        x = torch.randn(2, 3, s, s)
        assert avg(x).shape == (2, 192) and tok(x).shape == (2, 192)
    assert not torch.allclose(avg(torch.randn(2, 3, 32, 32)), tok(torch.randn(2, 3, 32, 32)))
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        avg(torch.randn(1, 3, 30, 30))


def test_pos_embed_same_grid_is_identity_and_new_grid_matches_timm():
    from timm.layers import resample_abs_pos_embed

    net = micro()
    assert net.pos_embed_for(net.grid) is net.pos_embed
    assert resample_pos_embed(net.pos_embed, (4, 4), (4, 4)) is net.pos_embed
    for grid in ((2, 2), (6, 6), (3, 5)):
        ours = net.pos_embed_for(grid)
        theirs = resample_abs_pos_embed(net.pos_embed, list(grid), old_size=[4, 4], num_prefix_tokens=0)
        assert ours.shape == (1, grid[0] * grid[1], 192)
        torch.testing.assert_close(ours, theirs)


def test_resampled_pos_embed_cached_per_size_without_grad_and_invalidated_by_updates():
    net = micro()
    with torch.no_grad():
        a = net.pos_embed_for((6, 6))
        assert net.pos_embed_for((6, 6)) is a                               # cached
        net.pos_embed.add_(1.0)                                              # an optimizer step
        b = net.pos_embed_for((6, 6))
    assert b is not a and torch.allclose(b, a + 1.0, atol=1e-4)
    c = net.pos_embed_for((6, 6))                                            # with grad: fresh, differentiable
    assert c.requires_grad and c is not b


def _count_block_tokens(net, x):
    seen = []
    h = net.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    net(x)
    h.remove()
    return seen[0]


def test_patch_drop_keeps_a_random_subset_in_training_only():
    net = micro(patch_drop=0.5)
    x = torch.randn(2, 3, 64, 64)                                           # 8x8 = 64 patches
    net.train()
    assert _count_block_tokens(net, x) == 1 + 32
    net.eval()
    assert _count_block_tokens(net, x) == 1 + 64


def test_frozen_patch_embed_and_layer_scale():
    net = micro(frozen_patch_embed=True, layer_scale=1e-4)
    assert all(not p.requires_grad for p in net.patch_embed.parameters())
    assert net.blocks[0].ls1.gamma.detach().eq(1e-4).all()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert net.patch_embed.weight.grad is None and net.blocks[0].ls1.gamma.grad is not None


def test_compiles_once_per_resolution():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    net = micro()
    cnt = CompileCounter()
    f = torch.compile(net, backend=cnt, dynamic=False)
    for s in (32, 16, 32, 16, 32):
        f(torch.randn(2, 3, s, s))
    assert cnt.frame_count == 2, cnt.frame_count                            # one graph per distinct size
    torch._dynamo.reset()


def test_multicrop_runs_one_backbone_call_per_resolution():
    from fastssl.methods._common import forward_by_resolution, resolution_groups

    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3
    assert resolution_groups(views) == [(0, 2), (2, 5)]
    calls = []
    net = micro()
    out = forward_by_resolution(lambda x: (calls.append(x.shape[0]), net(x))[1], views)
    assert calls == [4, 6] and out.shape == (10, 192)
    net.eval()
    torch.testing.assert_close(out[4:6], net(views[2]), rtol=1e-4, atol=1e-5)  # rows stay in view order


def test_dino_head_scores_are_fp32_under_the_steps_autocast():
    """The teacher's scores are sharpened by a temperature of 0.04: bf16's rounding would become 0.1 there."""
    from fastssl.models.heads import DINOHead

    torch.manual_seed(0)
    head = DINOHead(32, 64, 32, 16)
    x = torch.randn(8, 32)
    plain = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = head(x)
    # the MLP before the scores runs in bf16 as before; the scores themselves are computed in fp32
    h = head.project(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = head.score(h.to(torch.bfloat16))
    assert under.dtype == s.dtype == torch.float32 and plain.dtype == torch.float32
    torch.testing.assert_close(s, head.score(h.to(torch.bfloat16).float()), rtol=0, atol=0)
