"""Features extracted once per checkpoint (the trainer's evaluation fills fastssl-eval's cache), the cost
returned, and every linear figure named by its protocol (the quick cached probe, SimCLR's linear evaluation)."""
import json

import pytest
import torch
from conftest import tiny_overrides


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """A 2-step tiny SimCLR run; its final evaluation passes the run directory and step as the trainer will."""
    from fastssl.evaluation import online
    from fastssl.train import main as train

    out = tmp_path_factory.mktemp("reuse")
    real, calls, results = online.evaluate_knn, [], []

    def final_writes_the_cache(*a, **kw):
        calls.append(1)
        if len(calls) > 1:  # the first call evaluates the initial weights (step 0, no checkpoint)
            kw.update(cache_dir=out / "t", step=2)
        res = real(*a, **kw)
        results.append(res)
        return res

    mp = pytest.MonkeyPatch()
    mp.setattr(online, "evaluate_knn", final_writes_the_cache)
    try:
        rc = train(["--config", "configs/demo/simclr.yaml"]
                   + tiny_overrides(demo_data, out, **{"train.max_steps": 2, "eval.final": True}))
    finally:
        mp.undo()
    assert rc == 0 and len(calls) == 2
    return out / "t", results[-1]


def test_trainer_evaluation_reports_its_cost_and_writes_the_cache(trained):
    run, res = trained
    for key in ("eval_seconds", "eval_features_seconds", "eval_knn_seconds", "eval_cache_seconds"):
        assert isinstance(res[key], float) and res[key] >= 0, key
    assert res["eval_seconds"] >= res["eval_features_seconds"] + res["eval_knn_seconds"] - 1e-6
    assert sorted(p.rsplit("/", 1)[1] for p in res["protocol"]["feature_cache"]) == ["train_step2.safetensors",
                                                                                      "val_step2.safetensors"]
    assert (run / "features" / "train_step2.safetensors").is_file()


def test_fastssl_eval_after_training_extracts_nothing(trained, monkeypatch, capsys):
    from fastssl.cli import eval as eval_cli
    from fastssl.evaluation import offline

    run, res = trained

    def no_extraction(*a, **kw):
        raise AssertionError("fastssl-eval extracted features the trainer had cached")

    monkeypatch.setattr(offline, "extract_features", no_extraction)
    assert eval_cli.main([str(run), "--knn", "--device", "cpu", "--quiet"]) == 0
    out = json.loads((run / "eval.json").read_text())
    assert out["train_size"] == 200 and out["val_size"] == 100
    # the same features, the same kNN: the trainer's figure is fastssl-eval's
    assert out["knn_top1"] == pytest.approx(res["knn_top1"], abs=1e-9)
    assert "knn_top1" in capsys.readouterr().out


def test_a_cache_of_other_weights_is_not_reused(trained, tmp_path):
    from fastssl import checkpoint
    from fastssl.evaluation.offline import feature_meta, weights_fingerprint

    run, _ = trained
    cfg, method, step = checkpoint.load_for_eval(run, "cpu")
    before = weights_fingerprint(method)
    meta = feature_meta(cfg, "train", step, before)
    with torch.no_grad():
        next(method.backbone.parameters()).add_(1e-3)
    assert feature_meta(cfg, "train", step, weights_fingerprint(method)) != meta


def test_simclr_linear_protocol_one_epoch_names_its_protocol(trained, capsys):
    from fastssl.cli import eval as eval_cli

    run, _ = trained
    assert eval_cli.main([str(run), "--linear-protocol", "simclr", "--linear-epochs", "1", "--linear-batch-size", "64",
                          "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    out = json.loads((run / "eval.json").read_text())
    p = out["linear_protocol"]
    assert p["name"] == "simclr" and p["epochs"] == 1 and p["batch_size"] == 64
    assert p["lr"] == pytest.approx(0.1 * 64 / 256) and p["steps"] == 4  # 200 images / 64 -> 4 batches
    assert 0.0 <= out["linear_top1"] <= 100.0 and 0.0 <= out["linear_top5"] <= 100.0
    assert out["linear_top5"] >= out["linear_top1"]
    assert "linear protocol simclr" in printed and "knn_top1" not in printed


def test_cached_linear_probe_names_its_protocol(trained, capsys):
    from fastssl.cli import eval as eval_cli

    run, _ = trained
    assert eval_cli.main([str(run), "--linear", "--linear-epochs", "2", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    # Kept beside any earlier run of the papers' protocol on the same checkpoint.
    out = json.loads((run / "eval.json").read_text())["linear_by_protocol"]["cached"]
    assert out["linear_protocol"]["name"] == "cached" and out["linear_protocol"]["epochs"] == 2
    assert 0.0 <= out["linear_top1"] <= 100.0
    assert "linear protocol cached" in printed


def test_bad_linear_options_fail_in_one_line(trained, capsys):
    from fastssl.cli import eval as eval_cli

    run, _ = trained
    assert eval_cli.main([str(run), "--linear-protocol", "simclr", "--linear-epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--linear-epochs must be at least 1" in err[0]


def test_simclr_view_is_crop_and_flip_only():
    from fastssl.evaluation.linear import SIMCLR_LINEAR, train_view

    v = train_view(32)
    assert (v.size, v.scale_min, v.scale_max, v.flip_p) == (32, 0.08, 1.0, 0.5)
    assert v.jitter_p == v.gray_p == v.blur_p == v.solarize_p == 0.0
    assert SIMCLR_LINEAR["epochs"] == 90 and SIMCLR_LINEAR["nesterov"] and SIMCLR_LINEAR["weight_decay"] == 0.0


def test_feature_cache_on_a_full_disk_warns_and_keeps_the_features(tmp_path, monkeypatch, caplog):
    """The cache only saves a later extraction: a full disk leaves no partial file and the evaluation goes on."""
    import errno
    import logging

    import safetensors.torch
    import torch

    from fastssl.evaluation.offline import cached_features

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    feats, labels = torch.randn(8, 4), torch.arange(8)
    with caplog.at_level(logging.WARNING, logger="fastssl"):
        got = cached_features(tmp_path, "train", 3, {"k": 1}, lambda: (feats, labels))
    assert got[0] is feats and got[1] is labels
    assert list((tmp_path / "features").iterdir()) == []  # the partial file is removed
    lines = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "MiB" in lines[0]


def test_eval_json_keeps_earlier_figures_of_the_same_checkpoint(tmp_path):
    """A quick kNN after the papers' linear protocol keeps its figure; another checkpoint replaces the file."""
    from fastssl.evaluation.offline import write_eval

    simclr = {"checkpoint_step": 10, "weights": "w1", "linear_top1": 61.0, "linear_top5": 83.0,
              "linear_protocol": {"name": "simclr", "epochs": 90}, "seconds": {"linear": 9000.0}}
    write_eval(tmp_path, simclr)
    write_eval(tmp_path, {"checkpoint_step": 10, "weights": "w1", "knn_top1": 55.0, "seconds": {"knn": 7.0}})
    cached = {"checkpoint_step": 10, "weights": "w1", "linear_top1": 58.0, "linear_top5": 80.0,
              "linear_protocol": {"name": "cached"}, "seconds": {"linear": 30.0}}
    got = write_eval(tmp_path, cached)
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert got == on_disk and on_disk["knn_top1"] == 55.0
    assert on_disk["linear_top1"] == 61.0 and on_disk["linear_protocol"]["name"] == "simclr"   # the papers' first
    assert on_disk["linear_by_protocol"]["cached"]["linear_top1"] == 58.0
    assert on_disk["seconds"] == {"linear": 30.0, "knn": 7.0}
    other = write_eval(tmp_path, {"checkpoint_step": 20, "weights": "w2", "knn_top1": 60.0, "seconds": {}})
    assert "linear_top1" not in other and json.loads((tmp_path / "eval.json").read_text()) == other
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_simclr_protocol_resumes_to_the_same_head(trained, monkeypatch):
    """Killed in its second epoch, the papers' protocol resumes after the first and ends with the same head;
    alone, it extracts no cached features."""
    from fastssl import checkpoint
    from fastssl.evaluation import linear, offline

    run, _ = trained
    cfg, method, step = checkpoint.load_for_eval(checkpoint.resolve(str(run)), "cpu")
    state = run / "linear_simclr.pt"
    state.unlink(missing_ok=True)

    def no_features(*a, **kw):
        raise AssertionError("the papers' protocol alone extracted cached features")

    monkeypatch.setattr(offline, "cached_features", no_features)
    kw = dict(knn=False, linear=True, rank=False, alpha=False, device="cpu", progress=False,
              linear_protocol="simclr", linear_epochs=2, linear_batch_size=64)
    whole = offline.evaluate(cfg, method, step, run, **kw)
    head_whole = torch.load(state, weights_only=True)["head"]
    assert whole["linear_protocol"]["resumed_after_epoch"] == 0 and whole["linear_protocol"]["steps"] == 8

    state.unlink()
    real, calls = linear._embed, []

    def killed_in_epoch_two(*a):
        calls.append(1)
        if len(calls) == 6:  # 4 batches per epoch: the second batch of epoch 2
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(linear, "_embed", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        offline.evaluate(cfg, method, step, run, **kw)
    assert torch.load(state, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(linear, "_embed", real)
    resumed = offline.evaluate(cfg, method, step, run, **kw)
    assert resumed["linear_protocol"]["resumed_after_epoch"] == 1 and resumed["linear_protocol"]["steps"] == 8
    head = torch.load(state, weights_only=True)["head"]
    for name in head_whole:
        torch.testing.assert_close(head[name], head_whole[name], rtol=0, atol=0)
    assert resumed["linear_top1"] == whole["linear_top1"]
    # Other settings do not pick up this state: three epochs start from epoch 0.
    other = offline.evaluate(cfg, method, step, run, **{**kw, "linear_epochs": 3})
    assert other["linear_protocol"]["resumed_after_epoch"] == 0


def test_feature_cache_key_names_the_data_file_not_only_its_path(tmp_path):
    """A split written again at the same path (other caps, a flat folder made class folders) is re-extracted."""
    import os
    from types import SimpleNamespace

    from fastssl.evaluation.offline import feature_meta

    f = tmp_path / "val.beton"
    f.write_bytes(b"x" * 10)
    cfg = SimpleNamespace(data=SimpleNamespace(train=str(f), val=str(tmp_path / "shards-{000..009}.tar")),
                          aug=SimpleNamespace(global_size=32))
    first = feature_meta(cfg, "train", 5, "w")
    f.write_bytes(b"y" * 12)
    os.utime(f, ns=(1, 1))
    assert feature_meta(cfg, "train", 5, "w") != first and first["data"].startswith("10:")
    assert "data" not in feature_meta(cfg, "val", 5, "w")  # a pattern: path only


def test_checkpoint_loads_for_evaluation_in_the_trainers_memory_format(trained):
    """NHWC weights as the trainer ran them (the fast convolutions); the same features as NCHW weights."""
    from fastssl import checkpoint

    run, _ = trained
    cfg, method, _ = checkpoint.load_for_eval(checkpoint.resolve(str(run)), "cpu")
    assert cfg.train.channels_last
    convs = [m.weight for m in method.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    nchw = checkpoint.load_for_eval(checkpoint.resolve(str(run)), "cpu")[1].to(memory_format=torch.contiguous_format)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(method.embed(x), nchw.embed(x), rtol=1e-4, atol=1e-4)
