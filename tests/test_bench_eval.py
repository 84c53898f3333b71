"""``fastssl-bench eval``: both arms run the same probe; only the feature source differs."""
import json

from conftest import tiny_overrides


def test_bench_eval_arms_agree_and_reextract_runs_the_backbone_every_epoch(demo_data, tmp_path, capsys, monkeypatch):
    from fastssl.cli import bench_eval
    from fastssl.train import main as train

    assert train(["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 2})) == 0
    import fastssl.evaluation as ev

    calls = {"n": 0}
    real = ev.extract_features

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(ev, "extract_features", counting)
    capsys.readouterr()  # drop the trainer's output: the benchmark's stdout must be one JSON object
    assert bench_eval.main([str(tmp_path / "t"), "--epochs", "3", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracies_agree"] and out["linear_top1_cached"] == out["linear_top1_reextract"]
    assert out["probe_epochs"] == 3 and out["train_size"] == 200 and out["val_size"] == 100
    for k in ("cached_seconds", "reextract_seconds", "cached_over_reextract", "extract_seconds_per_epoch"):
        assert out[k] > 0, k
    # 2 for the cache fill (train, val) + 3 in the re-extract arm; the cached arm extracts nothing.
    assert calls["n"] == 2 + 3
