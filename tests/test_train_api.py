"""``fastssl.train(...)``: one call trains from Python as ``fastssl-train`` does."""
import json

import pytest


def test_fastssl_train_from_python_equals_the_cli_run(demo_data, tmp_path):
    import fastssl.train as module
    from fastssl.train import TrainResult, main

    common = {"aug.global_size": 16, "model.backbone": "resnet_tiny", "method.proj_hidden": 64,
              "method.proj_dim": 32, "optim.batch_size": 32, "optim.warmup_epochs": 0, "train.epochs": 1,
              "train.log_every": 1, "train.progress": False, "eval.final": False, "data.workers": 1}
    # The module itself is callable: `fastssl.train(...)` is fit(...), and `python -m fastssl.train` still runs.
    result = module(data=demo_data, method="simclr", config="demo/simclr", out=tmp_path / "api",
                    optim={"lr": 0.1}, **{k: v for k, v in common.items() if k != "optim.batch_size"},
                    **{"optim.batch_size": 32})
    assert isinstance(result, TrainResult)
    assert result.run_dir == tmp_path / "api"
    assert result.summary == json.loads((tmp_path / "api" / "summary.json").read_text())
    assert result.summary["method"] == "simclr" and result.summary["steps"] == 200 // 32

    argv = ["--config", "demo/simclr", f"data.train={demo_data}/train.beton", f"data.val={demo_data}/val.beton",
            "optim.lr=0.1", f"train.out_dir={tmp_path}", "train.name=cli"] + [f"{k}={v}" for k, v in common.items()]
    assert main(argv) == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert cli["final_loss"] == pytest.approx(result.summary["final_loss"], rel=1e-5)


def test_fastssl_train_names_a_bad_key_before_work(tmp_path, demo_data):
    import fastssl.train as module
    from fastssl.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lr"):
        module(data=demo_data, out=tmp_path / "bad", **{"optim.lrr": 0.1})
    assert not (tmp_path / "bad").exists()
