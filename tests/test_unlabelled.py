"""Unlabelled images (label -1: STL-10's unlabeled split, a flat folder) in the kNN bank and the online probe.

The kNN votes with the labelled rows only, the probe masks the others out of its loss and of its
accuracy without a host sync, and a tiny STL-10-shaped run (``fastssl-prepare stl10_binary
--split train+unlabeled``) ends with kNN and probe figures.
"""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl.evaluation import OnlineLinearProbe, knn_scores, knn_top1, labelled_rows


def _bank(n=120, dim=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return feats, labels


def test_knn_with_unlabelled_rows_equals_knn_on_the_labelled_subset():
    feats, labels = _bank()
    test, test_y = _bank(40, seed=1)
    mixed = labels.clone()
    mixed[::3] = -1
    keep = mixed >= 0
    for kw in ({}, {"chunk": 7, "chunk_train": 11}):
        got = knn_scores(feats, mixed, test, 5, k=10, temperature=0.1, **kw)
        want = knn_scores(feats[keep], labels[keep], test, 5, k=10, temperature=0.1, **kw)
        torch.testing.assert_close(got, want)
    assert knn_top1(feats, mixed, test, test_y, 5, k=10) == knn_top1(feats[keep], labels[keep], test, test_y, 5, k=10)


def test_knn_accuracy_counts_only_labelled_test_rows():
    feats, labels = _bank()
    test, test_y = _bank(40, seed=1)
    mixed = test_y.clone()
    mixed[1::2] = -1
    keep = mixed >= 0
    assert knn_top1(feats, labels, test, mixed, 5, k=10) == knn_top1(feats, labels, test[keep], test_y[keep], 5, k=10)


def test_a_fully_labelled_bank_is_not_copied():
    feats, labels = _bank()
    f, y = labelled_rows(feats, labels)
    assert f is feats and y is labels


def test_a_bank_without_labelled_rows_is_an_error_naming_them():
    feats, _ = _bank()
    with pytest.raises(ValueError, match="labelled"):
        knn_scores(feats, torch.full((len(feats),), -1), feats[:3], 5)


def test_probe_ignores_unlabelled_rows():
    torch.manual_seed(0)
    probe = OnlineLinearProbe(16, 5, lr=0.5)
    ref = copy.deepcopy(probe)
    feats, labels = _bank(32)
    labels[::2] = -1
    valid = labels >= 0
    loss, correct, labelled = probe.step(feats, labels)
    # the reference: cross-entropy over the labelled rows only (BatchNorm still sees the whole batch)
    logits = ref(feats)
    want = F.cross_entropy(logits[valid], labels[valid])
    ref.opt.zero_grad()
    want.backward()
    ref.opt.step()
    torch.testing.assert_close(loss, want.detach())
    assert int(labelled) == int(valid.sum()) == 16
    assert int(correct) == int((logits.argmax(1) == labels)[valid].sum())
    torch.testing.assert_close(probe.head.weight, ref.head.weight)
    torch.testing.assert_close(probe.head.bias, ref.head.bias)


def test_probe_on_a_batch_without_labels_learns_nothing_and_stays_finite():
    probe = OnlineLinearProbe(16, 5)
    before = copy.deepcopy(probe.head.state_dict())
    feats, _ = _bank(32)
    loss, correct, labelled = probe.step(feats, torch.full((32,), -1))
    assert float(loss) == 0.0 and int(correct) == 0 and int(labelled) == 0
    for k, v in probe.head.state_dict().items():
        torch.testing.assert_close(v, before[k])


class _NoHostSync:
    """Python-level host reads of a tensor raise while active (on CUDA they would wait for the GPU)."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def refuse(name):
            def f(self, *a, **kw):
                raise AssertionError(f"host sync in the step: Tensor.{name}")
            return f

        for n in self.NAMES:
            self.mp.setattr(torch.Tensor, n, refuse(n))

    def __exit__(self, *exc):
        self.mp.undo()


def test_train_step_feeds_the_probe_labelled_rows_without_a_host_sync(tmp_path, monkeypatch):
    from fastssl.config import derive, load_config
    from fastssl.engine import TrainCore, make_accelerator, train_step
    from fastssl.pipelines import Batch

    cfg = load_config("configs/demo/simclr.yaml", [
        "model.backbone=resnet_tiny", "method.proj_hidden=32", "method.proj_dim=16", "optim.batch_size=8",
        "optim.warmup_epochs=0", "train.epochs=1", "train.compile=off", f"train.out_dir={tmp_path}",
        "train.name=t", "train.progress=false"])
    device = torch.device("cpu")
    acc = make_accelerator(cfg, device)
    core = TrainCore(cfg, derive(cfg, 16), acc, num_classes=10)
    assert core.probe is not None
    labels = torch.tensor([0, -1, 3, -1, -1, 7, 9, -1])
    batch = Batch(views=[torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)], labels=labels,
                  indices=torch.arange(8))
    seen = []
    real = core.probe.step

    def spy(feats, y):
        seen.append(y)
        return real(feats, y)

    core.probe.step = spy
    with _NoHostSync(monkeypatch):
        assert train_step(core, [batch], 0) == 1
    assert seen and seen[0] is labels
    snap = core.snapshot_logs()
    logs, _ = core.resolve_logs(snap)
    assert snap.host[-3] == 4          # the probe's count: the labelled rows only
    assert 0.0 <= logs["linear_top1_online"] <= 100.0


def test_the_probe_step_and_its_counts_do_not_sync_the_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (torch.cuda.set_sync_debug_mode)")
    from fastssl.config import derive, load_config
    from fastssl.engine import TrainCore, make_accelerator, train_step
    from fastssl.pipelines import Batch

    cfg = load_config("configs/demo/simclr.yaml", [
        "model.backbone=resnet_tiny", "method.proj_hidden=32", "method.proj_dim=16", "optim.batch_size=8",
        "optim.warmup_epochs=0", "train.epochs=1", "train.compile=off", f"train.out_dir={tmp_path}",
        "train.name=t", "train.progress=false"])
    device = torch.device("cuda")
    core = TrainCore(cfg, derive(cfg, 16), make_accelerator(cfg, device), num_classes=10)
    labels = torch.tensor([0, -1, 3, -1, -1, 7, 9, -1], device=device)
    views = [torch.randn(8, 3, 16, 16, device=device) for _ in range(2)]
    batch = Batch(views=views, labels=labels, indices=torch.arange(8, device=device))
    train_step(core, [batch], 0)  # first step: lazy initialisations
    torch.cuda.synchronize()
    x, y = torch.randn(8, core.probe.head.in_features, device=device), labels
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, correct, labelled = core.probe.step(x, y)
        core.probe_correct += correct
        core.probe_seen += labelled
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _stl10_binary(root, train=40, unlabeled=80, test=20):
    """An stl10_binary folder in STL-10's layout (96 px, column-major, labels 1-10) of the built-in shapes."""
    from fastssl.pipelines.synthetic import SyntheticImages

    d = root / "stl10_binary"
    d.mkdir()

    def write(name, ds, n, labels=True):
        imgs = np.stack([ds[i][0] for i in range(n)])
        (d / f"{name}_X.bin").write_bytes(imgs.transpose(0, 3, 2, 1).tobytes())
        if labels:
            (d / f"{name}_y.bin").write_bytes(np.array([ds[i][1] + 1 for i in range(n)], np.uint8).tobytes())

    write("train", SyntheticImages(10, train // 10, 96, seed=0, split="train"), train)
    write("unlabeled", SyntheticImages(10, unlabeled // 10, 96, seed=1, split="train"), unlabeled, labels=False)
    write("test", SyntheticImages(10, test // 10, 96, seed=0, split="test"), test)
    (d / "class_names.txt").write_text("\n".join(SyntheticImages(10).classes))
    return d


def test_tiny_stl10_run_with_unlabeled_images_reports_knn_and_probe(tmp_path):
    pytest.importorskip("ffcv")
    from fastssl.cli.prepare import main as prepare
    from fastssl.pipelines.prepare import read_labels
    from fastssl.train import main as train

    from conftest import tiny_overrides

    src = _stl10_binary(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for split, name in (("train+unlabeled", "train"), ("test", "val")):
        assert prepare([str(src), str(data / f"{name}.beton"), "--split", split, "--write-mode", "raw",
                        "--workers", "1", "--quiet"]) == 0
    labels = read_labels(data / "train.beton")
    assert (labels == -1).sum() == 80 and (labels >= 0).sum() == 40
    args = ["--config", "configs/stl10/simclr_rn18.yaml"] + tiny_overrides(
        data, tmp_path / "runs", **{"train.epochs": 2, "eval.every_epochs": 1, "eval.final": True,
                                    "eval.knn_k": 20, "optim.name": "adamw", "optim.lr": 0.001,
                                    "optim.lr_scaling": "none", "aug.views.0.blur_p": 0.0,
                                    "aug.views.1.blur_p": 0.0})
    assert train(args) == 0
    s = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    for k in ("knn_top1", "knn_top1_init", "linear_top1_online"):
        assert s[k] is not None and 0.0 <= s[k] <= 100.0, (k, s[k])
