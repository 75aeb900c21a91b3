"""Write pertvl/data/antonyms_paper.tsv: WordNet 3.0's adjective antonyms, as the authors' code read them.

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn
    python bench/make_paper_antonyms.py --wordnet /tmp/wn/usr/share/wordnet

The paper's code took NLTK's first antonym of the word's lemma in its first adjective sense that
has one; this reads the same plain WordNet files (senses in index order, satellites included) and
keeps pairs of one clean lower-case word each. Pairs of the reviewed table (antonyms.tsv) that
WordNet leaves without an antonym are added, marked "reviewed". pertvl needs no WordNet at run time.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from common import REPO

from pertvl.data.perturb import load_antonyms, packaged_antonyms_path
from pertvl.data.text import clean_text

OUT = REPO / "pertvl" / "data" / "antonyms_paper.tsv"
_MARKER = re.compile(r"\((a|p|ip)\)$")  # WordNet's syntactic markers: galore(ip)

HEADER = """\
# pertvl's paper antonym rule (perturb.antonyms: paper; the antonym_adjectives perturbation, Table I row 9).
#
# Format: word<TAB>antonym<TAB>source; "#" starts a comment. Directed: the word in the first
# column is replaced by the second (WordNet's antonyms are not always symmetric); a word is in
# the first column once. Both are one clean word under pertvl.data.text.clean_text.
#
# source "wordnet": WordNet 3.0's direct adjective antonym, read as the authors' reference code
# (NLTK's WordNet) read it: the first antonym of the word's lemma in its first adjective sense
# (index.adj order) that has one. source "reviewed": a pair of pertvl's reviewed radiology table
# (antonyms.tsv) for a word that WordNet leaves without an antonym. Written by
# bench/make_paper_antonyms.py from Debian's wordnet-base 1:3.0 (docs/PERTURBATIONS.md).
#
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
# THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
# REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION,
# PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANTABILITY OR FITNESS FOR
# ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL
# NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.
# (Permission to use, copy, modify and distribute: the WordNet 3.0 license.)
"""


def _synsets(data_adj: Path) -> dict[int, tuple[list[str], list[tuple[int, int, int]]]]:
    """offset -> (lemmas, antonym pointers (target offset, source word no., target word no.))."""
    out: dict[int, tuple[list[str], list[tuple[int, int, int]]]] = {}
    for line in data_adj.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # the license header
            continue
        f = line.split(" | ", 1)[0].split()
        n_words = int(f[3], 16)
        lemmas = [_MARKER.sub("", f[4 + 2 * k]) for k in range(n_words)]
        i = 4 + 2 * n_words
        ptrs = []
        for k in range(int(f[i])):
            sym, off, _pos, st = f[i + 1 + 4 * k: i + 5 + 4 * k]
            if sym == "!":
                ptrs.append((int(off), int(st[:2], 16), int(st[2:], 16)))
        out[int(f[0])] = (lemmas, ptrs)
    return out


def wordnet_antonyms(wordnet: Path) -> dict[str, str]:
    """word -> its first WordNet adjective antonym (the rule in the module docstring)."""
    synsets = _synsets(wordnet / "data.adj")
    out: dict[str, str] = {}
    for line in (wordnet / "index.adj").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue
        f = line.split()
        lemma, n_senses = f[0], int(f[2])
        offsets = [int(x) for x in f[-n_senses:]]
        found = next((synsets[off][0][tgt - 1]
                      for s in offsets
                      for off, src, tgt in synsets[s][1]
                      if synsets[s][0][src - 1].lower() == lemma), None)
        if found is not None:
            out[lemma] = found
    return out


def _clean_word(w: str) -> bool:
    return clean_text(w, max_words=None) == w and " " not in w and w.replace("-", "").isalpha()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", required=True, help="folder with WordNet 3.0's index.adj and data.adj")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    pairs = {w: a for w, a in wordnet_antonyms(Path(args.wordnet)).items() if _clean_word(w) and _clean_word(a)}
    rows = [(w, a, "wordnet") for w, a in sorted(pairs.items())]
    reviewed = load_antonyms(packaged_antonyms_path()).pairs
    rows += [(w, a, "reviewed") for w, a in sorted(reviewed.items()) if w not in pairs]
    Path(args.out).write_text(HEADER + "\n" + "".join(f"{w}\t{a}\t{s}\n" for w, a, s in rows), encoding="utf-8")
    print(f"{len(rows)} entries ({len(pairs)} from WordNet, {len(rows) - len(pairs)} reviewed) -> {args.out}")


if __name__ == "__main__":
    main()
