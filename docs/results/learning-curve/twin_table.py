"""The twin test against optimizer steps, one column block per run: group score (global cosine)
overall and per edit type with its 95 % CI, from each evaluation's full result RUN/eval/stepN/twins.json.

    python docs/results/learning-curve/twin_table.py full-s0=runs/learning-curve/full-s0 \
        convirt-s0=runs/learning-curve/convirt-s0 --json twins.json > docs/results/learning-curve/twins.md

--json PATH also writes the numbers: {run: {step: {"all"|edit: [group, ci_low, ci_high]}}} (fractions).

The last block compares the runs' final points: the difference of group scores with a CI from the
two runs' bootstrap CIs as if they were independent (the twin pairs are the same in both runs, so
their outcomes correlate positively and this CI is wider than a paired one: conservative).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

EDITS = ("laterality", "severity", "finding", "negation", "cardiomegaly")


def points(run: Path) -> dict[int, dict]:
    """step -> the twin result's global scores: {"overall": {...}, edit: {...}}."""
    out = {}
    for f in sorted(run.glob("eval/step*/twins.json")):
        d = json.loads(f.read_text())
        g = d["scores"]["global"]
        out[int(d["info"]["step"])] = {"overall": g["overall"], **g["per_edit"], "n": d["pairs_per_edit"],
                                       "null": g["null_random_scores"]["group"]}
    return out


def cell(s: dict, ci: bool = True) -> str:
    lo, hi = s["group_ci95"]
    return f"{100 * s['group']:.1f}" + (f" [{100 * lo:.0f}, {100 * hi:.0f}]" if ci else "")


def diff(a: dict, b: dict) -> str:
    se = math.hypot(*((s["group_ci95"][1] - s["group_ci95"][0]) / (2 * 1.96) for s in (a, b)))
    d = a["group"] - b["group"]
    return f"{100 * d:+.1f} [{100 * (d - 1.96 * se):+.1f}, {100 * (d + 1.96 * se):+.1f}]"


def main(argv: list[str]) -> None:
    json_out = argv[argv.index("--json") + 1] if "--json" in argv else None
    argv = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    runs = {label: points(Path(path)) for label, path in (a.split("=", 1) for a in argv)}
    if json_out:
        Path(json_out).write_text(json.dumps({label: {step: {k: [p[k2]["group"], *p[k2]["group_ci95"]]
                                                             for k, k2 in (("all", "overall"), *((e, e) for e in EDITS))}
                                                      for step, p in pts.items()} for label, pts in runs.items()},
                                             indent=1) + "\n")
    first = next(iter(runs.values()))
    step0 = min(first)
    n = first[step0]["n"]
    print("# Twin test against optimizer steps (group score %, global cosine, [95 % CI])\n")
    print(f"Chance 16.7 %; the random-score null reads {100 * first[step0]['null']:.1f} %. Pairs: "
          + ", ".join(f"{e} {n[e]}" for e in EDITS) + f", all {sum(n[e] for e in EDITS)}.\n")
    print("| run | step | all | " + " | ".join(EDITS) + " |")
    print("| :--- | ---: | ---: | " + " | ".join("---:" for _ in EDITS) + " |")
    for label, pts in runs.items():
        for step, p in sorted(pts.items()):
            print(f"| {label} | {step} | {cell(p['overall'])} | " + " | ".join(cell(p[e]) for e in EDITS) + " |")
    if len(runs) >= 2:
        (la, a), (lb, b) = list(runs.items())[:2]
        last = max(set(a) & set(b))
        print(f"\n**{la} − {lb} at step {last}** (points, conservative 95 % CI):\n")
        print("| all | " + " | ".join(EDITS) + " |")
        print("| ---: | " + " | ".join("---:" for _ in EDITS) + " |")
        print(f"| {diff(a[last]['overall'], b[last]['overall'])} | "
              + " | ".join(diff(a[last][e], b[last][e]) for e in EDITS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
