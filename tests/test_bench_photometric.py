"""``fastssl-bench photometric``: its JSON, on the CPU (the compiled arm is a slow test's and a GPU call's)."""
import json


from fastssl.cli.bench_photometric import main


def test_json_rows_ratios_and_differences(tmp_path, one_torch_thread):
    out = tmp_path / "photometric.json"
    rc = main(["--device", "cpu", "--recipe", "dino", "--batch", "4", "--size", "32", "--local-size", "16",
               "--impls", "torch,cv2", "--steps", "1", "--warmup", "0", "--rounds", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "photometric" and res["views"][:2] == [32, 32] and 16 in res["views"]
    rows = {r["impl"]: r for r in res["rows"]}
    assert set(rows) == {"torch", "cv2"}
    assert rows["torch"]["speedup_vs_torch"] == 1.0 and rows["torch"]["max_abs_diff_vs_torch"] == 0.0
    for r in rows.values():
        assert len(r["round_ms"]) == 2 and r["ms_per_batch"] > 0 and r["images_per_second"] > 0
    # OpenCV works on uint8 between operations: the same function, within a few grey levels (normalised units).
    assert 0 < rows["cv2"]["max_abs_diff_vs_torch"] < 0.5


def test_unknown_impl_is_one_line(capsys):
    assert main(["--device", "cpu", "--impls", "torch,fast"]) == 2
    assert "fast" in capsys.readouterr().err
