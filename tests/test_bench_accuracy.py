"""``fastssl-bench accuracy``: both arms train the same steps, and one protocol evaluates them."""
import json

import pytest

from conftest import has_module

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (has_module("lightly") and has_module("ffcv")), reason="needs lightly and ffcv")]


def test_accuracy_smoke_same_steps_one_protocol(demo_data, tmp_path):
    from fastssl.cli.bench_accuracy import main

    out = tmp_path / "acc.json"
    assert main(["--smoke", "--data", str(demo_data), "--work", str(tmp_path / "w"), "--json", "--out", str(out), "--workers", "1"]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["steps"]["fastssl"] == row["steps"]["lightly"] > 0
    # The re-evaluation is the trainer's own kNN protocol: it reproduces the run's reported figure.
    assert row["knn_top1_fastssl"] == pytest.approx(row["fastssl_self_reported"], abs=1e-4)
    for k in ("knn_top1_init", "knn_top1_fastssl", "knn_top1_lightly"):
        assert 0.0 <= row[k] <= 100.0
    assert res["goal_met"] == (res["mean_fastssl_minus_lightly"] >= -2.0)
    assert res["protocol"]["k"] == 20 and "(200 images)" in res["protocol"]["train_split"]
