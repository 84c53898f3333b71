"""The timed single-GPU ImageNet SimCLR script, dry-run on the CPU end to end."""
import json

import pytest

from fastssl.cli.timed import main


@pytest.mark.slow  # ~2-5 min on 2 cores: ImageNet-like JPEGs, prepare, train, eval, report
def test_timed_dry_run_end_to_end_writes_time_to_accuracy(tmp_path):
    rc = main(["--dry-run", "--epochs", "2", "--out", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")])
    assert rc == 0
    run = tmp_path / "runs" / "timed-dry-run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["knn_top1"] is not None
    assert (run / "eval.json").exists()
    report = (run / "report" / "report.md").read_text()
    assert "time to" in report.lower()
