"""fastssl.grad_clip: per-parameter clipping as DINO's utils.clip_gradients, global as clip_grad_norm_."""
import math

import pytest
import torch

from fastssl.grad_clip import clip_gradients


def _params(*grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        ps.append(p)
    return ps


def test_per_param_scales_each_tensor_by_its_own_norm():
    # norms 5 (3-4-5), 0.5 and 13 (5-12-13); threshold 1: the first and last are scaled to norm ~1, the middle kept
    a, b, c = _params([3.0, 4.0], [0.3, 0.4], [5.0, 12.0])
    norms = clip_gradients([a, b, c], 1.0, "per_param")
    assert norms.tolist() == pytest.approx([5.0, 0.5, 13.0])
    # by hand, DINO's rule: grad * clip / (norm + 1e-6) when that factor is below 1
    assert a.grad.tolist() == pytest.approx([3.0 / (5 + 1e-6), 4.0 / (5 + 1e-6)], rel=1e-6)
    assert b.grad.tolist() == pytest.approx([0.3, 0.4])  # untouched: its norm is under the threshold
    assert c.grad.tolist() == pytest.approx([5.0 / (13 + 1e-6), 12.0 / (13 + 1e-6)], rel=1e-6)


def test_global_scales_all_by_one_factor():
    a, b, c = _params([3.0, 4.0], [0.3, 0.4], [5.0, 12.0])
    total = clip_gradients([a, b, c], 1.0, "global")
    want_total = math.sqrt(25 + 0.25 + 169)
    assert float(total) == pytest.approx(want_total)
    f = 1.0 / (want_total + 1e-6)
    assert b.grad.tolist() == pytest.approx([0.3 * f, 0.4 * f], rel=1e-5)  # the small one shrinks too
    assert float(torch.cat([p.grad for p in (a, b, c)]).norm()) == pytest.approx(1.0, rel=1e-5)


def test_the_two_modes_differ_as_dino_vs_global_thresholds_do():
    """DINO's 0.3 per parameter leaves a model's total norm near 0.3 x sqrt(tensors), not 0.3."""
    torch.manual_seed(0)
    grads = [torch.randn(64).tolist() for _ in range(100)]
    per = _params(*grads)
    clip_gradients(per, 0.3, "per_param")
    total = float(torch.cat([p.grad for p in per]).norm())
    assert total == pytest.approx(0.3 * math.sqrt(100), rel=1e-4)


def test_skips_params_without_grad_and_rejects_bad_arguments():
    a, = _params([3.0, 4.0])
    frozen = torch.nn.Parameter(torch.ones(3))  # no .grad (teacher, frozen layer)
    assert clip_gradients([frozen, a], 1.0, "per_param").tolist() == pytest.approx([5.0])
    assert clip_gradients([frozen], 1.0, "per_param").numel() == 0
    with pytest.raises(ValueError, match="per_param"):
        clip_gradients([a], 1.0, "per-param")
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradients([a], 0.0, "global")


def test_bf16_gradients_are_clipped_with_a_float32_norm():
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    p.grad = torch.full((4096,), 0.5, dtype=torch.bfloat16)  # norm 32
    norms = clip_gradients([p], 1.0, "per_param")
    assert norms.dtype == torch.float32 and float(norms[0]) == pytest.approx(32.0)
    assert float(p.grad.float().norm()) == pytest.approx(1.0, rel=1e-2)


DTENSOR_CHECK = r"""
import json, socket, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from fastssl.grad_clip import clip_gradients
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
ps = []
for g in ([3.0, 4.0], [0.3, 0.4]):
    p = torch.nn.Parameter(distribute_tensor(torch.zeros(2), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.tensor(g), mesh, [Shard(0)])
    ps.append(p)
norms = clip_gradients(ps, 1.0, "per_param")
print(json.dumps([norms.tolist(), ps[0].grad.full_tensor().tolist(), ps[1].grad.full_tensor().tolist()]))
dist.destroy_process_group()
"""


def test_per_param_on_sharded_dtensor_gradients():
    """FSDP2's gradients are DTensors: each is clipped by its whole norm (a one-process gloo mesh here)."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", DTENSOR_CHECK], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    norms, a, b = json.loads(res.stdout.strip().splitlines()[-1])
    assert norms == pytest.approx([5.0, 0.5]) and a == pytest.approx([0.6, 0.8], rel=1e-5)
    assert b == pytest.approx([0.3, 0.4])
