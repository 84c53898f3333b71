"""Two gloo processes, DIFFERENT data on each rank: gathered losses and gradients equal the full batch's.

Each rank holds half of a batch; with ``gather=True`` the mean of the per-rank losses equals the
single-process loss on the whole batch, and each rank's gradient divided by the world size (what
DDP's averaging does) equals the single-process gradient of its rows. Checked for nt_xent (with
DCL), info_nce (with a queue), vicreg and barlow_twins, torch and Triton (interpreter) paths.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import socket

import torch
import torch.multiprocessing as mp

from fastssl import losses

WORLD, N, D = 2, 6, 20  # N rows per rank


def _inputs():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(WORLD * N, D, generator=g)
    z2 = 0.5 * z1 + torch.randn(WORLD * N, D, generator=g)
    queue = torch.randn(5, D, generator=g)
    return z1, z2, queue


def _cases(queue):
    return {
        "nt_xent": lambda a, b, **k: losses.nt_xent(a, b, 0.2, **k),
        "dcl": lambda a, b, **k: losses.nt_xent(a, b, 0.2, decoupled=True, **k),
        "info_nce": lambda a, b, **k: losses.info_nce(a, b, 0.2, queue=queue, **k),
        "vicreg": lambda a, b, **k: losses.vicreg(a, b, path="gram", **k),
        "barlow_twins": lambda a, b, **k: losses.barlow_twins(a, b, path="gram", **k),
    }


def _impls():
    return ["torch", "triton"] if losses._has_triton() else ["torch"]


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    from fastssl.distributed import rank as my_rank, world_size

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        assert world_size() == WORLD and my_rank() == rank
        z1, z2, queue = _inputs()
        rows = slice(rank * N, (rank + 1) * N)                              # this rank's different data
        res = {}
        for impl in _impls():
            for name, fn in _cases(queue).items():
                a = z1[rows].clone().requires_grad_()
                b = z2[rows].clone().requires_grad_()
                loss = fn(a, b, impl=impl)                                  # gather defaults to True here
                loss.backward()
                res[f"{name}/{impl}"] = (loss.detach(), a.grad, b.grad)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_with_grad_two_processes_equals_full_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    z1, z2, queue = _inputs()
    for impl in _impls():
        for name, fn in _cases(queue).items():
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            full = fn(a, b, impl=impl, gather=False)
            full.backward()
            key = f"{name}/{impl}"
            mean_loss = sum(r[key][0] for r in per_rank) / WORLD
            torch.testing.assert_close(mean_loss, full.detach(), msg=key)
            for r in range(WORLD):
                rows = slice(r * N, (r + 1) * N)
                torch.testing.assert_close(per_rank[r][key][1] / WORLD, a.grad[rows], msg=f"{key} rank {r} z1")
                torch.testing.assert_close(per_rank[r][key][2] / WORLD, b.grad[rows], msg=f"{key} rank {r} z2")
            # different data per rank: the contrastive ranks see different anchors, so losses differ
            if name in ("nt_xent", "info_nce"):
                assert not torch.allclose(per_rank[0][key][0], per_rank[1][key][0])


def test_helpers_without_a_process_group():
    from fastssl.distributed import gather_with_grad, rank, world_size

    x = torch.randn(3, 4)
    assert world_size() == 1 and rank() == 0
    assert gather_with_grad(x) is x
