"""The S11 test tables of RESULTS.md from out/ps19/t_*/results.json: mean ± std over seeds, per seed, CPU s,
and paired (same-seed) differences for the paper's orderings. Usage: tables.py MODEL SEEDS (e.g. pointnet2 0,1,2)."""
import json, pathlib, statistics as st, sys
root = pathlib.Path(__file__).resolve().parent
if root.name == "summary":
    root = root.parent
model, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
VARS = ["baseline", "l1-vanilla", "l1-mgs", "l1-dlc", "l1-mgs-dlc"]
d = {}
for f in root.glob("t_*/results.json"):
    for r in json.loads(f.read_text())["results"]:
        if r["model"] == model:
            d[(r["variant"], r["seed"])] = r
def ms(x):
    return f"{st.mean(x):.2f} ± {st.stdev(x):.2f}" if len(x) > 1 else f"{x[0]:.2f}"
for v in VARS:
    rs = [d[(v, s)] for s in seeds if (v, s) in d]
    if not rs:
        continue
    m = [r["final"]["instance_miou"] for r in rs]
    cpu = [r["cpu_seconds"] for r in rs]
    print(f"| {v} | {rs[0]['lr']:g} | {len(rs)} | {ms(m)} | {ms([r['final']['accuracy'] for r in rs])} | "
          f"{', '.join(f'{x:.1f}' for x in m)} | {min(cpu):.0f}-{max(cpu):.0f} |")
print()
for a, b in [("l1-mgs", "l1-vanilla"), ("l1-dlc", "l1-vanilla"), ("l1-mgs-dlc", "l1-mgs"), ("l1-mgs-dlc", "l1-dlc"),
             ("l1-mgs-dlc", "baseline"), ("l1-dlc", "baseline")]:
    x = [d[(a, s)]["final"]["instance_miou"] - d[(b, s)]["final"]["instance_miou"] for s in seeds
         if (a, s) in d and (b, s) in d]
    if x:
        print(f"| {a} − {b} | {ms(x)} | {', '.join(f'{v:+.1f}' for v in x)} | {sum(v > 0 for v in x)}/{len(x)} |")
