"""Collect every run of out/ps19 into summary/runs.json (final scores and times; as out/ps18/summary/runs.json)."""
import json, pathlib, sys
root = pathlib.Path(__file__).resolve().parent
if root.name == "summary":
    root = root.parent
runs = []
for f in sorted(root.glob("*/results.json")):
    if f.parent.name == "summary" or f.parent.name.startswith(("grid_", "test_")):  # merged copies
        continue
    data = json.loads(f.read_text())
    for r in (data["results"] if isinstance(data, dict) else data):
        runs.append({"dir": f.parent.name, "model": r["model"], "variant": r["variant"], "ratio": r["ratio"],
                     "l1_layers": r["l1_layers"], "seed": r["seed"], "lr": r["lr"], "eval": r["eval"],
                     "steps": r["steps"], "miou": round(r["final"]["instance_miou"], 3),
                     "acc": round(r["final"]["accuracy"], 3), "train_loss_last": round(r["history"]["train_loss"][-1], 4),
                     "wall_s": round(r["seconds"], 1), "cpu_s": round(r["cpu_seconds"], 1), "finite": r["finite"]})
out = root / "summary"
out.mkdir(exist_ok=True)
(out / "runs.json").write_text(json.dumps({"note": "every run of out/ps19 (issue 17, AdamW ablation): final scores; "
                                           "histories in the uncommitted results.json files", "runs": runs}, indent=0) + "\n")
print(len(runs), "runs")
