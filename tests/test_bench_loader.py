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
