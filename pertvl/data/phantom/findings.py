"""The truth of a phantom: findings (type, side, severity, location), their vocabulary and CheXpert
labels, and the sampler that draws 0-3 findings per image with clinical co-occurrence priors.

Left and right are always the PATIENT's sides (see pertvl.data.phantom for the image convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Finding types, in the canonical order used for storage, counts and captions.
FINDING_TYPES = ("pleural_effusion", "pneumothorax", "consolidation", "cardiomegaly", "nodule", "atelectasis",
                 "edema")

# The CheXpert label each finding type sets (nodule -> Lung Lesion).
CHEXPERT_OF_TYPE = {"pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
                    "consolidation": "Consolidation", "cardiomegaly": "Cardiomegaly", "nodule": "Lung Lesion",
                    "atelectasis": "Atelectasis", "edema": "Edema"}

# Labels the phantom models (1.0/0.0), in CheXpert column order. All other CheXpert columns are blank.
MODELED_LABELS = ("No Finding", "Cardiomegaly", "Lung Lesion", "Edema", "Consolidation", "Atelectasis",
                  "Pneumothorax", "Pleural Effusion")

SEVERITIES = {"pleural_effusion": ("small", "moderate", "large"),
              "pneumothorax": ("small", "moderate", "large"), "consolidation": ("small", "large"),
              "cardiomegaly": ("mild", "moderate", "severe"), "nodule": ("small", "large"),
              "atelectasis": ("mild", "moderate"), "edema": ("mild", "moderate", "severe")}

LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")

# Allowed sides per type; a lobe fixes the side of consolidation and nodule.
SIDES = {"pleural_effusion": ("left", "right", "bilateral"), "pneumothorax": ("left", "right"),
         "consolidation": ("left", "right"), "cardiomegaly": (None,), "nodule": ("left", "right"),
         "atelectasis": ("left", "right"), "edema": ("bilateral",)}

LOCATIONS = {"consolidation": LOBES, "nodule": LOBES, "atelectasis": ("right lower lobe", "left lower lobe")}

# Words by which a sentence names a type, a side and a severity. The tests read reports with these.
TYPE_KEYWORDS = {"pleural_effusion": ("effusion", "effusions"), "pneumothorax": ("pneumothorax",),
                 "consolidation": ("consolidation",),
                 "cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"), "nodule": ("nodule", "nodular"),
                 "atelectasis": ("atelectasis",), "edema": ("edema",)}

# Surface words of each severity (consolidation: radiologists' extent words; cardiomegaly: adverbs too).
SEVERITY_WORDS = {("consolidation", "small"): ("small", "focal", "patchy"),
                  ("consolidation", "large"): ("large", "dense", "extensive"),
                  ("cardiomegaly", "mild"): ("mild", "mildly"),
                  ("cardiomegaly", "moderate"): ("moderate", "moderately"),
                  ("cardiomegaly", "severe"): ("severe", "severely", "marked", "markedly")}

NLI_LABELS = ("entailment", "contradiction", "neutral")

PARENCHYMAL = ("consolidation", "nodule", "atelectasis", "edema")

NEGATABLE = ("pneumothorax", "pleural_effusion", "consolidation", "edema", "nodule")


def other_side(side: str) -> str:
    """The other side of a one-sided finding (left <-> right)."""
    return "left" if side == "right" else "right"


def severity_words(ftype: str, severity: str) -> tuple[str, ...]:
    """The words a report may use for `severity` of a finding of type `ftype`."""
    return SEVERITY_WORDS.get((ftype, severity), (severity,))


@dataclass(frozen=True)
class Finding:
    """One finding of a phantom. `side` is the patient's side; `location` a lobe where it applies."""

    type: str
    severity: str
    side: str | None = None
    location: str | None = None

    def __post_init__(self) -> None:
        if self.type not in FINDING_TYPES:
            raise ValueError(f"finding type must be one of {FINDING_TYPES}, got {self.type!r}")
        if self.severity not in SEVERITIES[self.type]:
            raise ValueError(f"{self.type} severity must be one of {SEVERITIES[self.type]}, got {self.severity!r}")
        if self.side not in SIDES[self.type]:
            raise ValueError(f"{self.type} side must be one of {SIDES[self.type]}, got {self.side!r}")
        allowed = LOCATIONS.get(self.type)
        if allowed is None:
            if self.location is not None:
                raise ValueError(f"{self.type} takes no location, got {self.location!r}")
        else:
            if self.location not in allowed:
                raise ValueError(f"{self.type} location must be one of {allowed}, got {self.location!r}")
            if not self.location.startswith(self.side or "?"):
                raise ValueError(f"{self.type} side {self.side!r} disagrees with location {self.location!r}")

    def covers(self, side: str | None) -> bool:
        """True when this finding is on `side` (None: anywhere)."""
        return side is None or self.side == side or self.side == "bilateral" or self.side is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | Finding) -> Finding:
        if isinstance(d, Finding):
            return d
        try:
            return cls(type=d["type"], severity=d["severity"], side=d.get("side"), location=d.get("location"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a finding record (needs type and severity): {d!r}") from e

    def caption(self) -> str:
        """Short human caption, e.g. 'L effusion (small)'."""
        side = {"left": "L ", "right": "R ", "bilateral": "bilat ", None: ""}[self.side]
        where = self.location.split(" ", 1)[1].replace(" lobe", "") + " " if self.location else ""
        name = {"pleural_effusion": "effusion", "pneumothorax": "PTX"}.get(self.type, self.type)
        return f"{side}{where}{name} ({self.severity})"


def as_findings(findings: Iterable[Finding | dict[str, Any]]) -> list[Finding]:
    """Validate and order findings canonically; at most one finding per type."""
    out = [Finding.from_json(f) for f in findings]
    types = [f.type for f in out]
    if len(set(types)) != len(types):
        raise ValueError(f"a phantom holds at most one finding per type, got {types}")
    return sorted(out, key=lambda f: FINDING_TYPES.index(f.type))


def consistent(findings: Sequence[Finding]) -> bool:
    """Whether the sampler could draw these findings: no effusion on the side of a pneumothorax, no
    nodule in the consolidated lobe (one finding per type is as_findings' rule)."""
    by = {f.type: f for f in findings}
    ptx, eff = by.get("pneumothorax"), by.get("pleural_effusion")
    if ptx and eff and eff.side in (ptx.side, "bilateral"):
        return False
    nod, cons = by.get("nodule"), by.get("consolidation")
    return not (nod and cons and nod.location == cons.location)


def mirrored(f: Finding) -> Finding | None:
    """`f` moved to the other side (its lobe too); None when it is not one-sided or has no twin lobe
    (the right middle lobe)."""
    if f.side not in ("left", "right"):
        return None
    side = other_side(f.side)
    try:
        return Finding(f.type, f.severity, side, None if f.location is None else side + f.location[len(f.side):])
    except ValueError:
        return None


def chexpert_labels(findings: Sequence[Finding]) -> dict[str, float]:
    """The modeled CheXpert labels (1.0/0.0) of a phantom."""
    present = {CHEXPERT_OF_TYPE[f.type] for f in findings}
    labels = {name: (1.0 if name in present else 0.0) for name in MODELED_LABELS}
    labels["No Finding"] = 0.0 if findings else 1.0
    return labels


_N_FINDINGS_P = (0.25, 0.40, 0.23, 0.12)  # 0..3 findings per image; ~25 % normal studies

_TYPE_WEIGHT = {"pleural_effusion": 1.0, "consolidation": 0.8, "cardiomegaly": 0.75, "atelectasis": 0.6,
                "nodule": 0.55, "pneumothorax": 0.5, "edema": 0.45}

# Co-occurrence: edema comes with cardiomegaly and (bilateral) effusions; pneumothorax rarely with edema.
_AFFINITY = {frozenset(("edema", "cardiomegaly")): 3.0, frozenset(("edema", "pleural_effusion")): 2.5,
             frozenset(("cardiomegaly", "pleural_effusion")): 1.6,
             frozenset(("consolidation", "pleural_effusion")): 1.4,
             frozenset(("atelectasis", "pleural_effusion")): 1.5, frozenset(("pneumothorax", "edema")): 0.2,
             frozenset(("pneumothorax", "pleural_effusion")): 0.5, frozenset(("nodule", "edema")): 0.5}


def _balanced(weights: dict[str, float]) -> dict[str, float]:
    """Lobe weights scaled so that each side draws half: the right lung's three lobes would otherwise
    put more one-sided findings on the right, and then "left" alone would hint at a counterfactual."""
    side = {s: sum(w for lb, w in weights.items() if lb.startswith(s)) for s in ("left", "right")}
    return {lb: w / (2 * side[lb.split()[0]]) for lb, w in weights.items()}


# Where consolidations and nodules are drawn (relative lobe frequencies within each lung).
_LOBE_WEIGHT = {
    "consolidation": _balanced({"right upper lobe": 0.2, "right middle lobe": 0.15, "right lower lobe": 0.25,
                                "left upper lobe": 0.17, "left lower lobe": 0.23}),
    "nodule": _balanced({"right upper lobe": 0.3, "right middle lobe": 0.1, "right lower lobe": 0.2,
                         "left upper lobe": 0.25, "left lower lobe": 0.15}),
}


def pick(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """One of `options`, uniformly or with probabilities proportional to `weights`."""
    if weights is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def sample_findings(rng: np.random.Generator) -> list[Finding]:
    """A phantom's findings drawn from the corpus priors: 0-3, in canonical order, `consistent`."""
    k = int(rng.choice(4, p=_N_FINDINGS_P))
    chosen: list[str] = []
    for _ in range(k):
        cand = [t for t in FINDING_TYPES if t not in chosen]
        w = [_TYPE_WEIGHT[t] * math.prod(_AFFINITY.get(frozenset((t, c)), 1.0) for c in chosen) for t in cand]
        chosen.append(pick(rng, cand, w))
    out: list[Finding] = []
    ptx_side = eff_side = None
    if "pneumothorax" in chosen:
        ptx_side = pick(rng, ["left", "right"], [1, 1])
        out.append(Finding("pneumothorax", pick(rng, ["small", "moderate", "large"], [5, 3, 2]), ptx_side))
    if "pleural_effusion" in chosen:
        if "edema" in chosen:
            eff_side = pick(rng, ["bilateral", "left", "right"], [7, 1.5, 1.5])
        else:
            eff_side = pick(rng, ["left", "right", "bilateral"], [4, 4, 2])
        if ptx_side is not None and eff_side in (ptx_side, "bilateral"):
            eff_side = other_side(ptx_side)
        out.append(Finding("pleural_effusion", pick(rng, ["small", "moderate", "large"], [5, 3.5, 1.5]), eff_side))
    if "atelectasis" in chosen:
        side = pick(rng, ["left", "right"], [1, 1])
        if eff_side in ("left", "right") and rng.random() < 0.7:
            side = eff_side
        out.append(Finding("atelectasis", pick(rng, ["mild", "moderate"], [6, 4]), side, f"{side} lower lobe"))
    cons_lobe = None
    if "consolidation" in chosen:
        cons_lobe = pick(rng, LOBES, [_LOBE_WEIGHT["consolidation"][lb] for lb in LOBES])
        out.append(Finding("consolidation", pick(rng, ["small", "large"], [55, 45]), cons_lobe.split()[0], cons_lobe))
    if "nodule" in chosen:
        lobes = [lb for lb in LOBES if lb != cons_lobe]
        w = [_LOBE_WEIGHT["nodule"][lb] for lb in lobes]
        lobe = pick(rng, lobes, w)
        out.append(Finding("nodule", pick(rng, ["small", "large"], [65, 35]), lobe.split()[0], lobe))
    if "cardiomegaly" in chosen:
        out.append(Finding("cardiomegaly", pick(rng, ["mild", "moderate", "severe"], [45, 35, 20])))
    if "edema" in chosen:
        out.append(Finding("edema", pick(rng, ["mild", "moderate", "severe"], [45, 35, 20]), "bilateral"))
    return as_findings(out)
