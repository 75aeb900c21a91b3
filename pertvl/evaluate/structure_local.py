"""`pertvl eval structure-local`: the structure test (pertvl.evaluate.structure) with every candidate
scored by GLoRIA's local image–report similarity S(I, T) instead of the global cosine.

Why a second score: the paper scores Table IV by the cosine of global embeddings, and a globally
pooled image embedding may keep little of *where* a finding is (left or right) or which finding
sits where; the local branch's region features keep it and L_local trains S(I, T) directly.
Same candidates, controls (wrong image, mean image — the mean of the region features;
no text-only anchor: a text has no regions), counterfactuals, text-disjoint subset and JSON schema
as `structure`, with "score": "local"; flat metrics structure_local/*. Needs the local branch:
an ONNX export or a run.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from pertvl.evaluate.evaluation import Evaluation, Suite
from pertvl.evaluate.structure import add_structure_arguments
from pertvl.evaluate.structure import run as run_structure
from pertvl.evaluate.structure_result import SCHEMA, StructureResult


def run(encoder: Any, data: Iterable[Any], options: argparse.Namespace) -> StructureResult:
    return run_structure(encoder, data, options, score="local")


EVALUATION = Evaluation(
    name="structure-local",
    help="the structure test (Table IV) scored by the local branch's S(I, T) instead of the global cosine",
    description="As `pertvl eval structure`, with each candidate report scored by GLoRIA's local "
    "image-report similarity (region and word features; needs --export or --run). Writes NAME.json, "
    "NAME.md and NAME.png.",
    add_arguments=add_structure_arguments,
    run=run,
    result_type=StructureResult,
    schemas=(SCHEMA,),
    title="Clinical semantic structure, local score S(I, T)",
    suites=frozenset({Suite.DEMO, Suite.ABLATE}),
)
