"""``fastssl-bench loader``: the JSON contract, rounds and the recipe cost ratio (no timings asserted)."""
import json
import os


def test_bench_loader_json_rounds_and_recipe_ratio(demo_data, capsys):
    from fastssl.cli.bench import main

    rc = main(["loader", "--backend", "ffcv,baseline", "--data", str(demo_data), "--recipe", "simclr,dino",
               "--stage", "loader", "--batch-size", "8", "--workers", "1", "--max-batches", "2", "--size", "32",
               "--rounds", "2", "--json", "--same-process"])
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
    # The JSON fields of a CPU run (what earlier figures were read from), none added by --device.
    base = {"backend", "recipe", "stage", "views", "size", "batch_size", "workers", "images", "seconds",
            "images_per_second", "ms_per_batch", "cpu_percent", "jitter", "rounds", "images_per_second_rounds",
            "x_baseline", "first_batch_seconds", "images_per_second_after_first_batch", "pid", "host_alloc"}
    for r in rows.values():  # the epoch's start-up timed apart: the first batch, and the rate after it
        assert 0 < r["first_batch_seconds"] <= r["seconds"] + 0.01
        assert r["images_per_second_after_first_batch"] is None or r["images_per_second_after_first_batch"] > 0
    assert set(rows[("ffcv", "simclr", "loader")]) == set(rows[("baseline", "simclr", "full")]) == base
    assert set(d) == base | {"time_per_image_vs_simclr", "time_per_image_vs_simclr_rounds"}
    assert set(out) == {"benchmark", "cpu_count", "argv", "fresh_process", "results"}
    assert out["fresh_process"] is False and {r["pid"] for r in rows.values()} == {os.getpid()}
    assert {r["host_alloc"] for r in rows.values()} <= {"system", "retain"}  # retain only if set earlier in pytest


def test_bench_loader_measures_each_configuration_in_a_fresh_process(demo_data, capsys):
    """The default: no arm inherits another's thread pools (lightly's DataLoader forks after ffcv's numba pool)."""
    from fastssl.cli.bench import main

    rc = main(["loader", "--backend", "torch", "--data", str(demo_data), "--recipe", "simclr", "--stage", "loader",
               "--batch-size", "8", "--workers", "0", "--max-batches", "1", "--size", "16", "--rounds", "2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["results"]
    assert out["fresh_process"] is True and row["images"] == 8 and row["rounds"] == 2
    assert row["pid"] != os.getpid()
    import platform

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert row["host_alloc"] == ("retain" if glibc else "system")  # as in a fastssl-train process


def test_the_peers_keep_glibcs_allocator_in_their_own_process(demo_data, capsys):
    from fastssl.cli.bench import main

    rc = main(["loader", "--backend", "baseline", "--data", str(demo_data), "--recipe", "simclr", "--batch-size", "8",
               "--workers", "0", "--max-batches", "1", "--size", "16", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["host_alloc"] == "system"


def test_bench_loader_device_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    """``--device cuda`` where torch sees no GPU: exit 2 with one line naming the fix, before any work."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from fastssl.cli.bench import main

    rc = main(["loader", "--device", "cuda", "--make-imagenet-like", str(tmp_path / "set"), "--measure",
               "--backend", "torch", "--json"])
    assert rc == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cap.err and cap.out == ""
    assert lines[0].startswith("fastssl-bench loader: --device cuda but ") and "--device cpu" in lines[0]
    assert not (tmp_path / "set").exists()                              # nothing written first
    assert main(["loader", "--device", "tpu0", "--data", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_loader_make_and_measure_with_the_step_goal(tmp_path, capsys):
    """``--make-imagenet-like DIR --measure`` (what ``scripts/gpu_check.sh`` runs, there with ``--device cuda``):
    the JPEG set written by shards of worker processes equals the serial writer's, no .beton without an ffcv
    arm, rows as JSON lines on stderr, and the goal against the step benchmark's ResNet-50 figure."""
    from fastssl.cli.bench import main
    from fastssl.cli.bench_loader import step_goal
    from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

    step = tmp_path / "step.json"  # `fastssl-bench step --suite gpu` stdout: one JSON line per case
    step.write_text(json.dumps({"case": "dino_vits16_bf16", "error": "timeout"}) + "\n" + json.dumps(
        {"case": "simclr_rn50_bf16_compiled", "variants": [{"images_per_s": 1e9}]}) + "\n")
    rc = main(["loader", "--make-imagenet-like", str(tmp_path / "set"), "--measure", "--n", "20", "--workers", "2",
               "--backend", "torch", "--recipe", "simclr", "--stage", "full", "--batch-size", "4",
               "--max-batches", "2", "--size", "32", "--step-json", str(step), "--json"])
    assert rc == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["images_per_second"] > 0 and out["images"] == 8 and "device" not in out    # CPU: no GPU name
    assert out["data"]["images"] == 20 and "beton" not in out["data"]
    assert not (tmp_path / "set" / "train.beton").exists()
    rows = [json.loads(line) for line in cap.err.splitlines() if line.startswith("{")]
    assert [r["row"]["backend"] for r in rows] == ["torch"]
    serial = write_jpeg_folder(SyntheticImages(10, 2, (350, 400), seed=0, split="train"), tmp_path / "serial")
    made = sorted(p.relative_to(tmp_path / "set" / "train") for p in (tmp_path / "set" / "train").rglob("*.jpg"))
    assert made == sorted(p.relative_to(serial) for p in serial.rglob("*.jpg"))
    assert all((tmp_path / "set" / "train" / p).read_bytes() == (serial / p).read_bytes() for p in made)
    goal = out["goal"]
    assert goal["loader_images_per_second"] == out["images_per_second"]
    assert goal["met"] is False and goal["loader_over_step"] < 1                 # nothing feeds 1e9 images/s
    assert "error" in step_goal(out["results"], tmp_path / "missing.json")      # a missing yardstick says so
    step.write_text(json.dumps({"simclr_rn50_bf16_compiled": {"variants": [{"images_per_s": 1e-3}]}}))  # --out
    assert step_goal(out["results"], step)["met"] is True


def test_ffcv_area_resize_is_a_loader_argument(demo_data, monkeypatch, capsys):
    """``area_resize`` replaces the module global the benchmark used to flip: ``ffcv-opencv`` passes False,
    every other arm the default, and only the ffcv back-end takes it."""
    import pytest
    import torch

    from fastssl.pipelines import Batch
    from fastssl.pipelines import loader as loader_mod
    from fastssl.pipelines.recipes import preset

    pytest.importorskip("ffcv")
    from fastssl.pipelines import ffcv_backend

    assert not hasattr(ffcv_backend, "AREA_RESIZE")
    views = preset("simclr")
    for v in views:
        v.size = 16
    L = loader_mod.build_loader(None, views, str(demo_data / "train.beton"), 8, "cpu", workers=1,
                                photometric=False, area_resize=False)
    assert L.area_resize is False
    b = next(iter(L))
    assert [tuple(v.shape) for v in b.views] == [(8, 16, 16, 3)] * 2
    assert loader_mod.build_loader(None, views, str(demo_data / "train.beton"), 8, "cpu", workers=1).area_resize
    with pytest.raises(ValueError, match="ffcv back-end"):
        loader_mod.build_loader(None, views, str(demo_data / "train"), 8, "cpu", workers=0, area_resize=False)

    seen = []

    def fake_build_loader(data_cfg, views, src, batch_size, device, **kw):
        seen.append((kw["backend"], kw["area_resize"], src.endswith(".beton")))
        return [Batch(views=[torch.zeros(batch_size, 16, 16, 3, dtype=torch.uint8)], labels=None, indices=None)]

    monkeypatch.setattr(loader_mod, "build_loader", fake_build_loader)
    from fastssl.cli.bench import main

    assert main(["loader", "--backend", "ffcv,ffcv-opencv,torch", "--data", str(demo_data), "--stage", "loader",
                 "--batch-size", "8", "--size", "16", "--json", "--same-process"]) == 0  # the patch lives here
    assert seen == [("ffcv", True, True), ("ffcv", False, True), ("torch", True, False)]
    capsys.readouterr()


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
               "--stage", "full", "--batch-size", "8", "--workers", "1", "--max-batches", "2", "--size", "32", "--json",
               "--same-process"])
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
