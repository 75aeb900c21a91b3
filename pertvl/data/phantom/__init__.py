"""The embedded phantom corpus: synthetic chest radiographs whose pixels and report say the same thing.

`pertvl data phantom` writes the images, pairs.jsonl (the findings under extra["findings"], what re-draws
the masks under extra["render"]), labels.csv and summary.json (docs/DATA.md).

Image convention (radiological, PA): the PATIENT'S LEFT IS ON THE IMAGE RIGHT; every "left"/"right" in
findings and reports is the patient's side, so augmentations must never flip these images.
The anatomy is drawn analytically from implicit shapes (a few ms per phantom) and varies per patient;
findings are drawn where they belong and deliberately salient; 0-3 findings per image (~25 % normal)
with clinical co-occurrence priors.

Determinism: phantom i of seed s draws everything from `SeedSequence(s, spawn_key=(i,))`: the same seed
and N give byte-identical files whatever the number of workers.

Modules: findings.py (the truth and the sampler), render.py (pixels and finding masks), language.py
(reports and NLI items), corpus.py (the files), grounding.py (masks and finding words of a sample, the
grounding evaluation's truth), twins.py (twin phantoms, `pertvl data twins`).
"""

from pertvl.data.phantom.corpus import (
    CHEXPERT_COLUMNS,
    GENERATOR_VERSION,
    cli_main,
    generate_phantoms,
    phantom_id,
)
from pertvl.data.phantom.findings import FINDING_TYPES, Finding, sample_findings
from pertvl.data.phantom.language import compose_report, fact_holds, make_nli_items, write_report
from pertvl.data.phantom.render import render_phantom

__all__ = ["CHEXPERT_COLUMNS", "FINDING_TYPES", "GENERATOR_VERSION", "Finding", "cli_main", "compose_report",
           "fact_holds", "generate_phantoms", "make_nli_items", "phantom_id", "render_phantom",
           "sample_findings", "write_report"]
