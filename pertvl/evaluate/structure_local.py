"""`pertvl eval structure-local`: the structure test scored by GLoRIA's local S(I, T) on region and
word features instead of the global cosine (a pooled embedding may lose where a finding is). Same
candidates, controls (no text-only anchor) and schema, "score": "local"; metrics structure_local/*.
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
