"""Antonym negatives on the real Open-I findings: how many are made and why the others are not.

    python bench/antonym_stats.py [--reports indiana_reports.csv] [--before b653ac0] [--json OUT]

Counts the `antonym_adjectives` perturbation with the current code and with git revision
`--before`, and why the old rule's negatives are no longer made; prints Markdown tables
(docs/PERTURBATIONS.md); exits 2 when the reports file is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from common import OPENI, REPO, load_findings

from pertvl.data.perturb import ANTONYM_REASONS, Perturber
from pertvl.data.text import clean_text

TYPE = "antonym_adjectives"


def _git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def before_perturber(rev: str, tmp: Path) -> Any:
    """The Perturber of revision `rev` (its perturb.py and antonyms.tsv), imported under another name."""
    src = tmp / "perturb_before.py"
    src.write_text(_git_show(rev, "pertvl/data/perturb.py"))
    tsv = tmp / "antonyms_before.tsv"
    tsv.write_text(_git_show(rev, "pertvl/data/antonyms.tsv"))
    spec = importlib.util.spec_from_file_location("pertvl_perturb_before", src)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Perturber(antonyms_path=tsv)


def count(records: list[Any]) -> dict[str, Any]:
    made = sum(TYPE in r.perturbations for r in records)
    reasons = Counter(r.unavailable[TYPE] for r in records if TYPE in r.unavailable)
    return {"reports": len(records), "made": made, "unavailable": dict(sorted(reasons.items()))}


def changed(r: Any) -> list[int]:
    """Indices of the words that the record's antonym negative changed."""
    return [i for i, (a, b) in enumerate(zip(r.text.split(), r.perturbations[TYPE].split(), strict=True)) if a != b]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=Path, default=OPENI, help="Open-I indiana_reports.csv")
    ap.add_argument("--before", default="b653ac0", help="git revision of the old rule ('' to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the counts here")
    args = ap.parse_args(argv)
    if not args.reports.is_file():
        print(f"antonym_stats: {args.reports} not found (set PERTVL_OPENI_DIR or --reports)", file=sys.stderr)
        return 2
    findings = load_findings(args.reports)
    now = Perturber(seed=args.seed, types=[TYPE], antonyms="reviewed")
    after = now.perturb_many(findings)
    result: dict[str, Any] = {"after": count(after)}
    attrs: Counter[str] = Counter()
    for r in after:
        if TYPE in r.perturbations:
            (i,) = changed(r)
            attrs[now.lexicon.attributes[r.text.split()[i]]] += 1
    result["after_attributes"] = dict(attrs.most_common())

    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            old = before_perturber(args.before, Path(tmp))
            old.seed, old.types = args.seed, (TYPE,)
            before = old.perturb_many(findings)
        result["before"] = count(before)
        texts = list(dict.fromkeys(r.text for r in before if TYPE in r.perturbations))
        scope = dict(zip(texts, now.analyze(texts), strict=True))
        faults: Counter[str] = Counter()
        for r in before:
            if TYPE not in r.perturbations:
                continue
            a, flipped = scope[r.text], changed(r)
            new_words = [r.perturbations[TYPE].split()[i] for i in flipped]
            flags = {
                "flips a word inside a negation scope": any(a.negated[i] for i in flipped),
                "flips a word of a fixed phrase": any(a.fixed[i] for i in flipped),
                "flips more than one word": len(flipped) > 1,
                "writes a word outside the reviewed table": any(w not in now.lexicon.pairs for w in new_words),
            }
            faults.update(k for k, v in flags.items() if v)
            faults["any of these"] += any(flags.values())
        result["before_faults"] = dict(faults)

    print(f"Open-I findings: {len(findings)} reports, {len({clean_text(f) for f in findings})} distinct cleaned texts, "
          f"seed {args.seed}\n")
    cols = ["before", "after"] if args.before else ["after"]
    print("| | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    print("| antonym negative made | " + " | ".join(str(result[c]["made"]) for c in cols) + " |")
    reasons = list(ANTONYM_REASONS) + sorted({k for c in cols for k in result[c]["unavailable"]} - set(ANTONYM_REASONS))
    for reason in reasons:
        print(f"| unavailable: `{reason}` | " + " | ".join(str(result[c]["unavailable"].get(reason, 0)) for c in cols) + " |")
    tables = [("Old negatives that the current rule would not make", "old negative ...", "before_faults"),
              ("Attribute flipped by the current rule", "attribute", "after_attributes")][0 if args.before else 1:]
    for title, column, key in tables:
        print(f"\n{title}:\n\n| {column} | reports |\n|---|---:|")
        for k, v in result[key].items():
            print(f"| {k} | {v} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
