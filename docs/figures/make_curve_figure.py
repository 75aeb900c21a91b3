"""README's learning-curve figure: the twin test (no text prior can pass it) and the structure test
(Table IV) against optimizer steps, one colour per run, from a learning-curve result folder.

    python docs/figures/make_curve_figure.py docs/results/learning-curve/full-convirt-s0 docs/figures/learning_curve.png

reads FOLDER/twins.json (docs/results/learning-curve/twin_table.py --json) and FOLDER/curves.json
(`pertvl report curves`).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NULL_GROUP = 17.4  # the twin test's random-score null on these 1,237 pairs (twins.json of any run)


def main(folder: str, out_png: str) -> None:
    twins = json.loads((Path(folder) / "twins.json").read_text())
    curves = json.loads((Path(folder) / "curves.json").read_text())["curves"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for colour, (run, pts) in zip(("tab:blue", "tab:orange"), twins.items(), strict=False):
        steps = sorted(pts, key=int)
        x = [int(s) for s in steps]
        for key, style in (("all", "-"), ("laterality", "--")):
            y, lo, hi = (([100 * pts[s][key][i] for s in steps]) for i in range(3))
            ax1.plot(x, y, style, color=colour, marker="o", ms=3, label=f"{run}: {key}")
            ax1.fill_between(x, lo, hi, color=colour, alpha=0.15)
        c = curves[run]
        for key, style, name in (("eval/structure/overall", "-", "own image"),
                                 ("eval/structure/text_only", ":", "text only")):
            ax2.plot(c["steps"], [100 * v for v in c["series"][key]], style, color=colour, marker="o", ms=3,
                     label=f"{run}: {name}")
    ax1.axhline(100 / 6, color="grey", lw=1, ls="--", label=f"chance 16.7 (null {NULL_GROUP})")
    ax1.set_title("Twin test: group score, all pairs and laterality (95 % CI)", fontsize=10)
    ax2.axhline(100 * curves[next(iter(curves))]["structure_chance"], color="grey", lw=1, ls="--", label="chance")
    ax2.set_title("Structure test (Table IV): own image vs no image", fontsize=10)
    for ax, where in ((ax1, {"loc": "lower right"}), (ax2, {"loc": "center", "bbox_to_anchor": (0.58, 0.5), "ncol": 2})):
        ax.set_xlabel("optimizer step (137 per epoch)")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, **where)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
