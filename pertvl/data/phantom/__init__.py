"""The embedded phantom corpus: synthetic chest radiographs whose pixels and report say the same thing.

`pertvl data phantom --n N --seed S --size PX --out DIR` writes

* DIR/images/<id>.png   8-bit grayscale PA chest "radiographs" (PX x PX),
* DIR/pairs.jsonl       `pertvl.data.records.Pair` records (study-level split from the seed; labels;
                        the structured findings under extra["findings"], and extra["render"] =
                        {generator, seed, index, size}: what re-draws the findings' masks, see
                        pertvl.data.phantom.grounding),
* DIR/labels.csv        the CheXpert header; Path relative to DIR, Frontal, PA; 1.0/0.0 for the labels
                        the phantom models (No Finding, Cardiomegaly, Lung Lesion = nodule, Edema,
                        Consolidation, Atelectasis, Pneumothorax, Pleural Effusion); blank for the
                        others and for Sex/Age (not modeled),
* DIR/summary.json      counts per finding / label / split, report lengths, timings, version, seed,
* DIR/nli_{train,dev,test}.jsonl   with --nli: a MedNLI-format set (sentence1, sentence2, gold_label,
                        pairID) derived from the true findings, one item per label per phantom, split
                        like the phantoms (val -> dev); see pertvl.data.phantom.language.make_nli_items,
* DIR/preview.png       with --preview: a contact sheet of phantoms captioned with their findings.

Image convention (radiological, PA projection): the image is viewed as if facing the patient, so
the PATIENT'S LEFT IS ON THE IMAGE RIGHT. Every "left"/"right" in findings and reports is the
patient's side: a left pleural effusion whitens the base of the lung on the image right; the heart
bulges to the image right; the gastric bubble lies under the image-right hemidiaphragm.

Anatomy (drawn analytically from implicit shapes on the pixel grid, so a phantom costs a few ms):
body outline with shoulders, two lung fields with apices, costophrenic angles and diaphragm domes
(the right dome higher), heart and mediastinum with aortic knob, trachea, spine, clavicles,
posterior and anterior ribs, and branching vessel markings fanning out from the hila. Each patient
varies in size, position, a few degrees of rotation, lung and heart shape, exposure and noise.

Findings are drawn where they belong and are made deliberately salient (a small CNN at 128-224 px
must be able to see them): pleural effusion (dense fluid at the base with a lateral meniscus,
blunted costophrenic angle; small/moderate/large, left/right/bilateral), pneumothorax (lucent space
without lung markings at the apex and lateral wall, visible visceral pleural line), consolidation
(dense patchy opacity confined to a lobe; the right upper lobe one stops at the minor fissure),
cardiomegaly (cardiothoracic ratio 0.56-0.72 instead of 0.40-0.47), nodule (round dense opacity in
a lobe), atelectasis (plate-like linear basal opacities, elevated hemidiaphragm when moderate) and
pulmonary edema (bilateral perihilar haze, prominent vessels, reticular interstitial pattern).
Each image holds 0-3 findings (~25 % normal studies) with clinical co-occurrence priors (edema with
cardiomegaly and bilateral effusions; no effusion on the side of a pneumothorax). Because left and
right are in the pixels and the words, augmentations must never flip these images horizontally.

Determinism: phantom i of seed s draws everything from `SeedSequence(s, spawn_key=(i,))`, so the
same seed and N give byte-identical images, pairs.jsonl, labels.csv and NLI files whatever the
number of worker processes (PNGs are written with fixed settings and no timestamp chunk).

Modules: findings.py (the truth: vocabulary, Finding, CheXpert labels, the sampler), render.py
(pixels, and finding_masks: where each finding is drawn), language.py (reports and NLI items),
corpus.py (the files and `pertvl data phantom`), grounding.py (masks and finding words of a
sample, from its seed: the grounding evaluation's truth), twins.py (twin phantoms: pairs of images
of one patient that differ in one fact, with reports that differ only in its words; `pertvl data
twins`, evaluated by `pertvl eval twins`).
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

__all__ = [
    "CHEXPERT_COLUMNS",
    "FINDING_TYPES",
    "GENERATOR_VERSION",
    "Finding",
    "cli_main",
    "compose_report",
    "fact_holds",
    "generate_phantoms",
    "make_nli_items",
    "phantom_id",
    "render_phantom",
    "sample_findings",
    "write_report",
]
