"""Two processes through accelerate + gloo on the CPU: the same trainer, sharded data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(demo_data, tmp_path):
    train_py = Path(__file__).resolve().parents[1] / "fastssl" / "train.py"
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process unless mpirun is configured;
    # `--multi_gpu` goes through torchrun, and the trainer's Accelerator(cpu=True) then uses gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(train_py), "--config", "configs/demo/simclr.yaml",
           *tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 4, "eval.final": True})]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    env = json.loads((tmp_path / "t" / "env.json").read_text())
    assert env["world_size"] == 2 and env["derived"]["micro_batch"] == 16
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["knn_top1"] is not None
