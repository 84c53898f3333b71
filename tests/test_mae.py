"""MAE: masking shapes and order, the encoder sees only the kept tokens, the loss only the removed patches."""
import pytest
import torch
import torch.nn.functional as F

from fastssl.config import load_config
from fastssl.methods import create_method
from fastssl.models.mae import mae_loss, patchify
from fastssl.models.vit import random_masking


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_mae(mask_ratio=0.75):
    cfg = load_config(None, ["method.name=mae", "model.backbone=vit_micro_patch8", "aug.global_size=32",
                             f"method.mask_ratio={mask_ratio}", "method.decoder_dim=32", "method.decoder_depth=1",
                             "method.decoder_heads=2"])
    torch.manual_seed(0)
    return create_method(cfg, 10)


@pytest.mark.parametrize("ratio,keep", [(0.75, 16), (0.5, 32), (0.9, 6), (0.0, 64)])
def test_random_masking_shapes_and_restore(ratio, keep):
    x = torch.randn(3, 64, 5)
    kept, mask, ids_restore = random_masking(x, ratio)
    assert kept.shape == (3, keep, 5) and mask.shape == (3, 64) and ids_restore.shape == (3, 64)
    assert mask.sum(1).tolist() == [64 - keep] * 3
    # The kept rows are exactly the rows with mask 0, in some order; restoring puts everything back.
    for i in range(3):
        assert sorted(map(tuple, kept[i].tolist())) == sorted(map(tuple, x[i][mask[i] == 0].tolist()))
    removed = torch.stack([x[i][mask[i] == 1] for i in range(3)]) if keep < 64 else x[:, :0]
    # gather(cat(kept, removed in shuffle order)) == x needs the removed rows in shuffle order: rebuild them
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    full = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 5))
    torch.testing.assert_close(full[:, :keep], kept)
    torch.testing.assert_close(torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 5)), x)
    assert removed.shape[1] == 64 - keep


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.0])
def test_encoder_processes_exactly_the_kept_tokens(ratio):
    m = tiny_mae(ratio)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1])) for b in m.backbone.blocks]
    out = m([torch.randn(2, 3, 32, 32)], 0)                                   # 4x4 = 16 patches
    for h in hooks:
        h.remove()
    n = 16
    keep = round((1 - ratio) * n)
    assert seen == [1 + keep] * len(m.backbone.blocks)                        # + the class token
    assert float(out["visible_tokens"]) == keep
    assert torch.isfinite(out["loss"])


def test_patchify_matches_unfold():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, 8)                                                        # (B, 6, 192) in (p, p, C) order
    u = F.unfold(x, 8, stride=8).transpose(1, 2)                              # (B, 6, 192) in (C, p, p) order
    torch.testing.assert_close(p, u.reshape(2, 6, 3, 64).transpose(2, 3).reshape(2, 6, 192))


def test_loss_uses_only_removed_patches_with_per_patch_normalised_targets():
    imgs = torch.randn(2, 3, 16, 16)
    target = patchify(imgs, 8)                                                # (2, 4, 192)
    mask = torch.tensor([[1., 0, 1, 0], [0, 0, 1, 1]])
    pred = torch.randn(2, 4, 192, requires_grad=True)
    loss = mae_loss(pred, imgs, mask, norm_pix=True, patch=8)
    loss.backward()
    assert pred.grad[mask == 0].abs().max() == 0 and pred.grad[mask == 1].abs().min() > 0
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    want = torch.stack([((pred[i, j] - t[i, j]) ** 2).mean() for i in range(2) for j in range(4) if mask[i, j]]).mean()
    torch.testing.assert_close(loss, want)
    # Changing a visible patch's prediction does not change the loss.
    with torch.no_grad():
        pred2 = pred.clone()
        pred2[0, 1] += 5.0
    assert mae_loss(pred2, imgs, mask, patch=8).item() == pytest.approx(loss.item())


def test_embed_uses_all_patches_mean_pooled():
    m = tiny_mae().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        e = m.embed(x)
        tokens, _ = m.backbone.tokens(x)
        want = m.backbone.encode(tokens)[:, 1:].mean(1)
    torch.testing.assert_close(e, want)


def test_mae_needs_a_vit():
    cfg = load_config(None, ["method.name=mae", "model.backbone=resnet_tiny"])
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        create_method(cfg, 10)


@pytest.mark.parametrize("ratio", [0.75, 0.0])
def test_masked_tokens_embed_only_kept_patches_but_equal_the_full_embedding(ratio):
    m = tiny_mae(ratio)
    x = torch.randn(2, 3, 32, 48)
    noise = torch.rand(2, 24)
    ours, mask, ids = m.backbone.masked_tokens(x, ratio, noise)
    full, _ = m.backbone.tokens(x)                                           # conv on every patch
    want, mask2, ids2 = random_masking(full, ratio, noise)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(mask, mask2) and torch.equal(ids, ids2)
