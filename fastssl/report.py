"""Run reports: PNG plots (matplotlib, Agg) and a one-page Markdown comparison of runs."""
from __future__ import annotations

import json
from pathlib import Path

THRESHOLDS = (20, 30, 40, 50, 60, 70, 80, 90)


def load_run(run_dir: str | Path) -> dict:
    d = Path(run_dir)
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (d / "metrics.jsonl").exists() else []
    read = lambda n: json.loads((d / n).read_text()) if (d / n).exists() else {}  # noqa: E731
    cfg = (d / "config.yaml").read_text() if (d / "config.yaml").exists() else ""
    return {"dir": d, "name": d.name, "train": [r for r in rows if r.get("kind") == "train"],
            "eval": [r for r in rows if r.get("kind") == "eval"], "summary": read("summary.json"),
            "offline": read("eval.json"), "env": read("env.json"), "config": cfg}


def time_to_accuracy(evals: list[dict], key: str = "knn_top1", thresholds=THRESHOLDS) -> dict[int, float | None]:
    """First wall-clock second at which ``key`` reached each threshold (None: never)."""
    out: dict[int, float | None] = {}
    for t in thresholds:
        hit = [e["wall"] for e in evals if e.get(key) is not None and e[key] >= t]
        out[t] = min(hit) if hit else None
    return out


def _plot(runs, x, y, path: Path, title: str, source: str = "train") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for r in runs:
        pts = [(e[x], e[y]) for e in r[source] if e.get(x) is not None and e.get(y) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="." if source == "eval" else None, label=r["name"])
            drawn = True
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Plots + ``report.md`` for ``run_dirs`` side by side; returns the Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    plots = [("loss.png", "step", "loss", "train", "training loss"), ("lr.png", "step", "lr", "train", "learning rate"),
             ("throughput.png", "step", "images_per_second", "train", "images/s"),
             ("data_wait.png", "step", "data_wait", "train", "share of step time waiting for data"),
             ("knn_vs_time.png", "wall", "knn_top1", "eval", "kNN top-1 vs wall-clock seconds"),
             ("probe_vs_time.png", "wall", "linear_top1_online", "train", "online linear probe vs wall-clock seconds"),
             ("gpu_memory.png", "step", "gpu_mem_gb", "train", "peak GPU memory (GiB)")]
    made = [name for name, x, y, src, title in plots if _plot(runs, x, y, out / name, title, src)]
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = ["# fastssl report", "", "| run | method | backbone | back-end | epochs | steps | images/s | data-wait | wall (s) "
             "| kNN top-1 | kNN init | linear (offline) | online probe | RankMe |", "|" + "---|" * 14]
    for r in runs:
        s, o = r["summary"], r["offline"]
        lines.append(f"| {r['name']} | {s.get('method', '-')} | {s.get('backbone', '-')} | {s.get('backend', '-')} | "
                     f"{s.get('epochs', '-')} | {s.get('steps', '-')} | {fmt(s.get('images_per_second'))} | "
                     f"{fmt(s.get('data_wait_fraction'), '{:.1%}')} | {fmt(s.get('wall_seconds'))} | "
                     f"{fmt(s.get('knn_top1'))} | {fmt(s.get('knn_top1_init'))} | {fmt(o.get('linear_top1'))} | "
                     f"{fmt(s.get('linear_top1_online'))} | {fmt(s.get('rankme'))} |")
    lines += ["", "## Time to accuracy (kNN top-1, wall-clock seconds of training)", "",
              "| run | " + " | ".join(f">= {t}%" for t in THRESHOLDS) + " |", "|" + "---|" * (len(THRESHOLDS) + 1)]
    for r in runs:
        tta = time_to_accuracy(r["eval"])
        lines.append(f"| {r['name']} | " + " | ".join(fmt(tta[t], "{:.0f}") for t in THRESHOLDS) + " |")
    knn_p = next((r["summary"].get("protocol", {}).get("knn") for r in runs if r["summary"].get("protocol", {}).get("knn")), None)
    if knn_p:
        lines += ["", f"kNN protocol: k={knn_p['k']}, T={knn_p['temperature']}, {knn_p['similarity']}, "
                      f"{knn_p['features']}, eval split {knn_p['eval_split']}."]
    lines += ["", "## Plots", ""] + [f"![{m}]({m})" for m in made]
    for r in runs:
        lines += ["", f"## {r['name']}: environment", "", "```json", json.dumps(r["env"], indent=1), "```",
                  "", f"## {r['name']}: resolved config", "", "```yaml", r["config"].strip(), "```"]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md
