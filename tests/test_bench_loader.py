"""``fastssl-bench loader``: the JSON contract, rounds and the recipe cost ratio (no timings asserted)."""
import json


def test_bench_loader_json_rounds_and_recipe_ratio(demo_data, capsys):
    from fastssl.cli.bench import main

    rc = main(["loader", "--backend", "ffcv,baseline", "--data", str(demo_data), "--recipe", "simclr,dino",
               "--stage", "loader", "--batch-size", "8", "--workers", "1", "--max-batches", "2", "--size", "32",
               "--rounds", "2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["backend"], r["recipe"], r["stage"]): r for r in out["results"]}
    # baseline is always the full stage; every other back-end runs the stages asked for.
    assert set(rows) == {("ffcv", "simclr", "loader"), ("ffcv", "dino", "loader"),
                         ("baseline", "simclr", "full"), ("baseline", "dino", "full")}
    for r in rows.values():
        assert r["images_per_second"] > 0 and r["rounds"] == 2 and len(r["images_per_second_rounds"]) == 2
        assert r["images_per_second"] in r["images_per_second_rounds"]
        assert r["images"] == 16                                      # 2 batches of 8
    assert rows[("ffcv", "dino", "loader")]["views"] == 8 and rows[("ffcv", "simclr", "loader")]["views"] == 2
    assert rows[("baseline", "dino", "full")]["views"] == 2             # baseline: the two global views only
    # DINO's cost relative to SimCLR, per back-end: the median of per-round ratios, each round's listed.
    d = rows[("ffcv", "dino", "loader")]
    assert len(d["time_per_image_vs_simclr_rounds"]) == 2
    assert min(d["time_per_image_vs_simclr_rounds"]) <= d["time_per_image_vs_simclr"] <= max(
        d["time_per_image_vs_simclr_rounds"])
    assert "time_per_image_vs_simclr" not in rows[("ffcv", "simclr", "loader")]
    assert rows[("baseline", "simclr", "full")]["x_baseline"] == 1.0


def test_gpu_bench_loader_script_smoke_on_cpu_and_its_goal_check(tmp_path, capsys):
    """``scripts/gpu_bench_loader.py --smoke``: the GPU script's code path, tiny, on the CPU; the goal compares
    the GPU-decode full-stage SimCLR loader with the step benchmark's ResNet-50 figure."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_bench_loader", root / "scripts" / "gpu_bench_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"simclr_rn50_bf16_compiled": {"variants": [{"images_per_s": 1e9}]}}))
    assert mod.main(["--smoke", "--recipes", "simclr", "--step-json", str(step)]) == 0
    out = json.loads(capsys.readouterr().out)
    runs = {(r["pipeline"], r["stage"]): r for r in out["runs"]}
    assert set(runs) == {("torch_cpu_decode", "loader"), ("torch_cpu_decode", "full"), ("torch_gpu_decode", "loader"),
                         ("torch_gpu_decode", "full"), ("baseline_torchvision", "full")}
    assert all(r["images_per_second"] > 0 for r in runs.values())
    goal = out["goal"]
    assert goal["loader_images_per_second"] == runs[("torch_gpu_decode", "full")]["images_per_second"]
    assert goal["met"] is False and goal["loader_over_step"] < 1                 # nothing feeds 1e9 images/s
    fast = mod._goal(out["runs"], step.with_name("missing.json"))
    assert "error" in fast                                                        # a missing yardstick says so
    step.write_text(json.dumps({"simclr_rn50_bf16_compiled": {"variants": [{"images_per_s": 1e-3}]}}))
    assert mod._goal(out["runs"], step)["met"] is True


def test_bench_loader_lightly_peer_arm_and_its_jitter(demo_data, capsys):
    """The peer arm (lightly's own transforms in a DataLoader) beside ours; ``x_lightly`` is the images/s quotient."""
    import pytest

    pytest.importorskip("lightly")
    from fastssl.cli.bench import main
    from fastssl.cli.bench_loader import LIGHTLY_JITTER, peer_jitter
    from fastssl.pipelines.recipes import preset

    views = preset("simclr")
    jittered = peer_jitter("simclr", views)
    assert (jittered[1].brightness, jittered[1].contrast, jittered[1].saturation, jittered[1].hue) == (0.8, 0.8, 0.8, 0.2)
    assert views[0].brightness == 0.4                                   # the preset itself is left alone
    assert [v.hue for v in peer_jitter("dino", preset("dino"))] == [0.1] * 8 == [v.hue for v in preset("dino")]
    assert peer_jitter("mae", preset("mae"))[0].jitter_p == 0.0 and "mae" not in LIGHTLY_JITTER

    rc = main(["loader", "--backend", "lightly,torch", "--data", str(demo_data), "--recipe", "simclr,dino",
               "--stage", "full", "--batch-size", "8", "--workers", "1", "--max-batches", "2", "--size", "32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["backend"], r["recipe"]): r for r in out["results"]}
    assert set(rows) == {("lightly", "simclr"), ("lightly", "dino"), ("torch", "simclr"), ("torch", "dino")}
    assert rows[("lightly", "simclr")]["views"] == 2 and rows[("lightly", "dino")]["views"] == 8
    for (be, recipe), r in rows.items():
        assert r["stage"] == "full" and r["jitter"] == "lightly" and r["images"] == 16
        want = r["images_per_second"] / rows[("lightly", recipe)]["images_per_second"]
        assert abs(r["x_lightly"] - want) <= 0.006
    assert rows[("lightly", "dino")]["x_lightly"] == 1.0
