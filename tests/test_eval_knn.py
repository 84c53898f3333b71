"""kNN in chunks of the train bank (cookbook section 3.7.1) against the dense computation, and its memory bound."""
import pytest
import torch

from fastssl.cli.bench_eval import dense_knn_scores  # the dense reference, as the benchmark's other arm
from fastssl.evaluation import extract_features, knn_plan, knn_scores, knn_top1



def _random_bank(n_train, n_test, dim, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_train, dim, generator=g), torch.randint(0, classes, (n_train,), generator=g),
            torch.randn(n_test, dim, generator=g))


@pytest.mark.parametrize("chunk_test,chunk_train", [(None, None), (1, 5), (7, 3), (64, 17), (130, 999), (50, 1000)])
def test_chunked_knn_equals_the_dense_reference(chunk_test, chunk_train):
    tx, ty, vx = _random_bank(1000, 130, 16, 7)
    ref = dense_knn_scores(tx, ty, vx, 7, k=20, temperature=0.07)
    stats = {}
    ours = knn_scores(tx, ty, vx, 7, k=20, temperature=0.07, chunk=chunk_test, chunk_train=chunk_train, stats=stats)
    # A similarity computed in another block shape may round in its last bit; exp(s / 0.07)
    # scales that to ~1e-6 relative. The neighbours and their order are the same.
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    if chunk_train:
        assert stats["train_chunks"] == -(-1000 // chunk_train)  # the bank is read once


def test_k_larger_than_a_train_chunk_and_than_the_bank():
    tx, ty, vx = _random_bank(40, 9, 8, 3, seed=1)
    ref = dense_knn_scores(tx, ty, vx, 3, k=25, temperature=0.1)
    assert torch.allclose(knn_scores(tx, ty, vx, 3, k=25, temperature=0.1, chunk=4, chunk_train=6), ref, rtol=1e-5)
    # k beyond the bank: every train row votes, as in the dense computation
    ref_all = dense_knn_scores(tx, ty, vx, 3, k=100, temperature=0.1)
    assert torch.allclose(knn_scores(tx, ty, vx, 3, k=100, temperature=0.1, chunk_train=7), ref_all, rtol=1e-5)


def test_the_budget_chooses_blocks_that_fit_it():
    tx, ty, vx = _random_bank(3000, 200, 32, 5, seed=2)
    ref = dense_knn_scores(tx, ty, vx, 5)
    for budget in (60_000, 200_000, 1_000_000):
        stats = {}
        ours = knn_scores(tx, ty, vx, 5, budget_bytes=budget, stats=stats)
        assert torch.allclose(ours, ref, rtol=1e-5)
        assert stats["block_bytes"] <= budget and stats["max_block_bytes"] <= budget, (budget, stats)
    with pytest.raises(ValueError, match="budget_bytes of at least"):
        knn_scores(tx, ty, vx, 5, budget_bytes=100)


def test_bf16_bank_scores_like_its_fp32_values():
    tx, ty, vx = _random_bank(500, 30, 16, 4, seed=3)
    tb = tx.bfloat16()
    ref = dense_knn_scores(tb.float(), ty, vx, 4)
    assert torch.allclose(knn_scores(tb, ty, vx, 4, chunk_train=64), ref, rtol=1e-5)


def test_large_bank_in_one_pass_within_the_budget(one_torch_thread):
    # 200k x 64 bank, 512 queries: the dense computation would hold 512 x 200k fp32 similarities
    # (410 MB); the chunked one stays within 8 MB per block and reads the bank once.
    n, m, dim, budget = 200_000, 512, 64, 8 << 20
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(10, dim, generator=g)
    ty = torch.randint(0, 10, (n,), generator=g)
    tx = centers[ty] + 0.5 * torch.randn(n, dim, generator=g)
    vy = torch.randint(0, 10, (m,), generator=g)
    vx = centers[vy] + 0.5 * torch.randn(m, dim, generator=g)
    stats = {}
    top1 = knn_top1(tx, ty, vx, vy, 10, budget_bytes=budget, stats=stats)
    assert top1 > 95  # well-separated clusters: the kNN works at this size
    assert stats["max_block_bytes"] <= budget and stats["block_bytes"] <= budget
    assert stats["max_block_bytes"] < 4 * n * m / 20  # far below the dense block
    assert stats["train_chunks"] == -(-n // stats["chunk_train"])  # one pass over the bank
    # the plan predicts the same chunks
    plan = knn_plan(m, n, dim, 20, budget)
    assert (plan.chunk_test, plan.chunk_train) == (stats["chunk_test"], stats["chunk_train"])


@pytest.mark.slow
def test_imagenet_sized_bank_within_the_default_budget():
    # 1.28 M x 2048 train features against 1,000 queries on the CPU: about 11 GB of bank.
    n, m, dim = 1_281_167, 1000, 2048
    tx = torch.randn(n, dim)
    ty = torch.randint(0, 1000, (n,))
    vx = tx[:m] + 0.01 * torch.randn(m, dim)
    stats = {}
    scores = knn_scores(tx, ty, vx, 1000, stats=stats)
    assert torch.equal(scores.argmax(1), ty[:m])  # each query's nearest neighbour is its own source row
    assert stats["max_block_bytes"] <= stats["budget_bytes"] and stats["train_chunks"] == -(-n // stats["chunk_train"])


class _Batch:
    def __init__(self, x, y):
        self.views, self.labels, self.indices = [x], y, None


class _Loader:
    def __init__(self, n, batch, announced=None, labels=True):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(n, 3, generator=g)
        self.batch, self.labels = batch, labels
        self.num_samples = n if announced is None else announced

    def __iter__(self):
        for s in range(0, len(self.x), self.batch):
            yield _Batch(self.x[s:s + self.batch], torch.arange(s, min(s + self.batch, len(self.x)))
                         if self.labels else None)


@pytest.mark.parametrize("announced", [None, 7, 100])
def test_extract_features_keeps_every_row_in_order(announced):
    ld = _Loader(23, 5, announced=announced)
    embed = torch.nn.Linear(3, 4)
    x, y = extract_features(embed, ld)
    assert x.dtype == torch.float32 and x.shape == (23, 4) and torch.equal(y, torch.arange(23))
    assert torch.allclose(x, embed(ld.x).detach())
    x, y = extract_features(embed, ld, max_samples=12)
    assert x.shape == (12, 4) and torch.equal(y, torch.arange(12))
    _, y = extract_features(embed, _Loader(6, 4, labels=False))
    assert torch.equal(y, torch.full((6,), -1))


def test_a_bank_too_large_for_the_device_stays_on_the_host_with_one_log_line(monkeypatch, caplog):
    import logging

    from fastssl import evaluation

    free = 10 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    cuda = torch.device("cuda")
    # 1.28 M x 2048 bf16 = 5.2 GB: fits in 10 GiB free beside the 2 GiB headroom
    assert evaluation._bank_home(cuda, 1_281_167, 2048, torch.bfloat16) == (cuda, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="fastssl.evaluation"):
        # the same bank in fp32 (10.5 GB) does not: host memory, fp32, and the reason
        assert evaluation._bank_home(cuda, 1_281_167, 2048, torch.float32) == (torch.device("cpu"), torch.float32)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not fit" in lines[0] and "host memory" in lines[0]
    # the kNN over a host bank streams it: each chunk's copy is counted in the block
    plan_host = knn_plan(1000, 100_000, 2048, 20, 256 << 20, copy_bytes=4)
    plan_here = knn_plan(1000, 100_000, 2048, 20, 256 << 20)
    assert plan_host.block_bytes <= 256 << 20 and plan_host.chunk_train < plan_here.chunk_train


@pytest.mark.cuda
def test_knn_on_the_gpu_equals_the_dense_reference_and_stays_there():
    tx, ty, vx = _random_bank(20_000, 300, 128, 10, seed=6)
    ref = dense_knn_scores(tx, ty, vx, 10)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 similarities, as the reference's
    stats = {}
    ours = knn_scores(tx.cuda(), ty.cuda(), vx.cuda(), 10, chunk_train=3000, stats=stats)
    assert ours.device.type == "cuda" and stats["device"].startswith("cuda")
    assert torch.allclose(ours.cpu(), ref, rtol=1e-4) and torch.equal(ours.argmax(1).cpu(), ref.argmax(1))
    # a bank in host memory, queries on the GPU: computed on the GPU, chunks streamed
    streamed = knn_scores(tx, ty, vx.cuda(), 10, chunk_train=3000)
    assert streamed.device.type == "cuda" and torch.equal(streamed.argmax(1).cpu(), ref.argmax(1))


@pytest.mark.cuda
def test_extracted_features_stay_on_the_gpu():
    ld = _Loader(23, 5)
    ld.x = ld.x.cuda()
    embed = torch.nn.Linear(3, 4).cuda()
    x, y = extract_features(embed, ld)
    assert x.device.type == "cuda" and x.shape == (23, 4) and torch.equal(y.cpu(), torch.arange(23))


def test_blocks_the_allocator_caches_count_as_free_for_the_bank(monkeypatch):
    from fastssl import evaluation

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 20 << 30)
    assert evaluation._bank_home(cuda, 1_281_167, 2048, torch.bfloat16)[0].type == "cpu"  # 5.2 GB > 4 GiB - 2
    # after training, the allocator holds 10 GiB that no tensor uses: the bank fits there
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 << 30)
    assert evaluation._bank_home(cuda, 1_281_167, 2048, torch.bfloat16) == (cuda, torch.bfloat16)


def test_the_bank_is_sized_for_the_rows_this_process_reads(demo_data, monkeypatch):
    """With eval.knn_stride 10 a loader reads a tenth of the split: the bank is allocated for that tenth,
    not for the whole split (1.28 M x 2048 bf16 is 5.2 GB where 0.5 GB are read)."""
    from conftest import small_views
    from fastssl import evaluation
    from fastssl.pipelines.loader import build_loader

    ld = build_loader(None, small_views("simclr"), str(demo_data / "train.beton"), 16, "cpu", train=False,
                      drop_last=False, backend="ffcv", workers=1)
    ld.set_stride(10)
    asked = []
    real = evaluation._bank_home
    monkeypatch.setattr(evaluation, "_bank_home", lambda *a: asked.append(a[1]) or real(*a))
    x, _ = extract_features(lambda v: v.flatten(1)[:, :8], ld)
    assert asked == [ld.rank_samples] == [len(x)] and len(x) == -(-ld.num_samples // 10)
