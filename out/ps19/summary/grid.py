"""Print the lr grid (validation mIoU per seed, mean) and the test runs of out/ps19 as markdown."""
import json, pathlib, statistics as st, collections, sys
root = pathlib.Path(__file__).resolve().parent
if root.name == "summary":
    root = root.parent
runs = collections.defaultdict(dict)
for f in sorted(root.glob("*/results.json")):
    if f.parent.name == "summary" or f.parent.name.startswith(("grid_", "test_")):  # merged copies
        continue
    data = json.loads(f.read_text())
    for r in (data["results"] if isinstance(data, dict) else data):
        runs[(r["model"], r["eval"], r["variant"], r["lr"])][r["seed"]] = (r["final"]["instance_miou"] if r["finite"] else float("nan"), r["cpu_seconds"], r["history"]["train_loss"][-1])
for k in sorted(runs):
    v = runs[k]
    ms = [x[0] for x in v.values()]
    print(k, {s: round(x[0], 2) for s, x in sorted(v.items())}, "mean %.2f" % st.mean(ms),
          "±%.2f" % (st.stdev(ms) if len(ms) > 1 else 0), "cpu", [round(x[1]) for x in v.values()],
          "loss", [round(x[2], 3) for x in v.values()])
