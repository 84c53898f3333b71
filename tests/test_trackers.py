"""Experiment trackers (``train.log_with``): they mirror metrics.jsonl, which stays the source of truth.

TensorBoard is read back offline with tensorboard's own ``EventAccumulator``; W&B runs in offline
mode when the package is installed (skipped otherwise).
"""
import json

import pytest

from conftest import tiny_overrides
from fastssl.config import ConfigError, load_config
from fastssl.metrics_log import MetricsLog, flat_config, tracker_values
from fastssl.train import main


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config


def test_log_with_is_validated_with_did_you_mean_and_install_command(monkeypatch):
    cfg = load_config("configs/demo/simclr.yaml", ["train.log_with= TensorBoard , none,tensorboard"])
    assert cfg.train.log_with == "tensorboard"
    assert load_config("configs/demo/simclr.yaml").train.log_with == "none"
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord': did you mean 'tensorboard'"):
        load_config("configs/demo/simclr.yaml", ["train.log_with=tensorbord"])
    with pytest.raises(ConfigError, match=r"unknown tracker 'wandbb'"):
        load_config("configs/demo/simclr.yaml", ["train.log_with=tensorboard,wandbb"])

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the mlflow package.*pip install mlflow"):
        load_config("configs/demo/simclr.yaml", ["train.log_with=tensorboard,mlflow"])


def test_flat_config_and_tracker_values():
    cfg = load_config("configs/demo/simclr.yaml")
    flat = flat_config(cfg)
    assert flat["optim.batch_size"] == cfg.optim.batch_size and flat["method.name"] == "simclr"
    assert flat["aug.global_size"] == cfg.aug.global_size
    assert all(k.startswith(("data.", "aug.", "model.", "method.", "optim.", "train.", "eval.")) for k in flat)
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    rec = {"kind": "train", "step": 7, "epoch": 0, "loss": 5.5, "lr": 0.1, "init": True, "note": "x",
           "bad": float("nan")}
    assert tracker_values(rec) == {"train/epoch": 0, "train/loss": 5.5, "train/lr": 0.1}
    assert tracker_values({"kind": "eval", "step": 0, "knn_top1": 12.5}) == {"eval/knn_top1": 12.5}


class _FlakyAcc:
    """An Accelerator stand-in whose tracker fails on the second log call."""

    def __init__(self):
        from accelerate.utils import LoggerType

        self.log_with, self.trackers, self.logged, self.inited = [LoggerType.TENSORBOARD], [], [], None

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.inited = (project, config)

    def log(self, values, step=None):
        if self.logged:
            raise ConnectionError("tracker server gone")
        self.logged.append((step, values))


def test_a_failing_tracker_never_stops_metrics_jsonl(tmp_path, capsys):
    cfg = load_config("configs/demo/simclr.yaml", ["train.log_with=tensorboard"])
    acc = _FlakyAcc()
    log = MetricsLog(tmp_path / "metrics.jsonl", True, cfg=cfg, acc=acc)
    assert acc.inited[0] == "fastssl" and acc.inited[1]["train.log_with"] == "tensorboard"
    for step in (1, 2, 3):
        log.write(kind="train", step=step, loss=1.0 / step)
    log.write(kind="preempted", step=3, signal="SIGTERM")
    log.close()
    assert acc.logged == [(1, {"train/loss": 1.0})]
    assert "experiment tracker failed (ConnectionError" in capsys.readouterr().err
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 3]


def test_missing_tracker_in_accelerator_is_an_error(tmp_path):
    cfg = load_config("configs/demo/simclr.yaml", ["train.log_with=tensorboard"])
    acc = _FlakyAcc()
    acc.log_with = []  # accelerate dropped it (package missing): it only says so at debug level
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLog(tmp_path / "metrics.jsonl", True, cfg=cfg, acc=acc)
    # other ranks (enabled=False) start nothing
    MetricsLog(tmp_path / "m2.jsonl", False, cfg=cfg, acc=acc).close()


# ----------------------------------------------------------------------------- end to end


def test_tensorboard_event_files_mirror_metrics_jsonl(demo_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 3, "eval.final": True, "train.log_with": "tensorboard"})
    assert main(args) == 0
    run = tmp_path / "t"
    recs = records(run)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]

    logdir = run / "tensorboard" / "fastssl"
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for key in ("loss", "lr", "images_per_second", "data_wait", "epoch", "z_std"):
        assert f"train/{key}" in tags, key
        got = [(e.step, e.value) for e in ea.Scalars(f"train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train], key
    for key in ("knn_top1", "rankme"):
        got = [(e.step, e.value) for e in ea.Scalars(f"eval/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in evals], key

    # the config as hyper-parameters (add_hparams writes them in a sub-folder of the log dir)
    hparams = {}
    for sub in [p for p in logdir.iterdir() if p.is_dir()]:
        acc = EventAccumulator(str(sub))
        acc.Reload()
        try:
            contents = acc.PluginTagToContent("hparams")
        except KeyError:
            continue  # accelerate's hparams.yml folder
        for tag, content in contents.items():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                for k, v in data.session_start_info.hparams.items():
                    hparams[k] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
    assert hparams["method.name"] == "simclr" and hparams["train.log_with"] == "tensorboard"
    assert hparams["optim.batch_size"] == 32 and hparams["model.backbone"] == "resnet_tiny"


def wandb_records(path):
    """The protobuf records of an offline ``.wandb`` file (LevelDB-log framing after a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert buf[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(buf):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", buf[pos + 4:pos + 7])
        pending += buf[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def test_wandb_offline_run_mirrors_metrics_jsonl(demo_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 2, "train.log_with": "wandb"})
    assert main(args) == 0
    run = tmp_path / "t"
    train = [r for r in records(run) if r["kind"] == "train"]
    (offline,) = (run / "wandb").glob("offline-run-*/*.wandb")
    history, config, meta = [], {}, None
    for rec in wandb_records(offline):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run":
            meta = rec.run
    assert meta.project == "fastssl" and meta.display_name == "t"
    assert config["train.log_with"] == "wandb" and config["optim.batch_size"] == 32
    assert [h["_step"] for h in history] == [r["step"] for r in train]
    for h, r in zip(history, train):
        assert h["train/loss"] == pytest.approx(r["loss"], rel=1e-6) and h["train/lr"] == pytest.approx(r["lr"])
