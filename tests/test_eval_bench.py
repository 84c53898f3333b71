"""``fastssl-bench eval`` on synthetic features: the kNN within its budget, the dense reference agreeing, the probe."""
import json


def test_bench_eval_synthetic_reports_cost_budget_and_agreement(capsys, one_torch_thread):
    from fastssl.cli import bench_eval

    budget = 1 << 20
    assert bench_eval.main(["--n-train", "6000", "--dim", "32", "--n-val", "300", "--classes", "10",
                            "--probe-epochs", "1", "--budget-bytes", str(budget), "--reference",
                            "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kn = out["knn"]
    assert out["n_train"] == 6000 and out["dim"] == 32 and out["bank_bytes"] == 6000 * 32 * 4 + 6000 * 8
    assert kn["budget_bytes"] == budget and kn["block_bytes_planned"] <= budget
    assert kn["max_similarity_block_bytes"] <= budget and kn["train_chunks"] > 1  # chunked: the budget binds
    assert kn["seconds"] > 0 and kn["peak_bytes"] > 0 and kn["top1"] > 50  # clustered features (chance: 10)
    assert out["knn_dense_reference"]["predictions_agree"] == 1.0
    assert out["cached_probe"]["protocol"] == "cached" and 0 <= out["cached_probe"]["top1"] <= 100


def test_bench_eval_rejects_a_bad_size_in_one_line(capsys):
    from fastssl.cli import bench_eval

    assert bench_eval.main(["--n-train", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n-train must be at least 1" in err[0]
