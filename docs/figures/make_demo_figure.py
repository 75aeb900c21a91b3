"""README's figure: two twin pairs of the demo (laterality, negation) under the demo model's twin scores.

    python docs/figures/make_demo_figure.py runs/demo/report/eval docs/figures/demo.png

reads `pertvl eval twins`' twins.json and twins_examples.png (one row per edit type that has pairs, in
the order of pertvl.data.phantom.twins.EDITS) from the demo's report, keeps the two rows and writes the PNG.
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pertvl.data.phantom.twins import EDITS

KEEP = ("laterality", "negation")


def main(eval_dir: str, out_png: str) -> None:
    scores = json.loads((Path(eval_dir) / "twins.json").read_text())
    overall, chance = scores["scores"]["global"]["overall"], scores["chance"]
    sheet = Image.open(Path(eval_dir) / "twins_examples.png").convert("RGB")
    shown = [e for e in EDITS if scores["pairs_per_edit"].get(e)]
    row_h = sheet.height / len(shown)
    rows = [sheet.crop((0, round(i * row_h), sheet.width, round((i + 1) * row_h)))
            for i, edit in enumerate(shown) if edit in KEEP]
    title = (f"demo model (global cosine) on {overall['n']} twin pairs: text {overall['text']:.1%}, "
             f"image {overall['image']:.1%}, group {overall['group']:.1%}  (chance {chance['text']:.0%} / "
             f"{chance['image']:.0%} / {chance['group']:.1%}; any text-only scorer: text 0%)")
    out = Image.new("RGB", (sheet.width, 40 + sum(r.height for r in rows)), "white")
    ImageDraw.Draw(out).text((10, 10), title, fill="black", font=ImageFont.load_default(size=18))
    y = 40
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    out.save(out_png)


if __name__ == "__main__":
    main(*sys.argv[1:3])
