"""The evaluations `pertvl eval`, `pertvl ablate`, `pertvl demo` and the reports loop over, and the
fine-tunes (`pertvl finetune`) whose results the comparison table reads the same way.

Add a built-in evaluation: write pertvl/evaluate/NAME.py with `EVALUATION = Evaluation(...)`
(pertvl.evaluate.evaluation) and add its module to `_BUILTIN` below. Add one from outside the
package (a plugin, a test): `register(Evaluation(...))`, in a module loaded with
`pertvl --plugin MODULE` or PERTVL_PLUGINS (docs/ARCHITECTURE.md, "Registries"). A fine-tune's
module holds `FINETUNE = Finetune(...)` (listed in `_BUILTIN_FINETUNES`); the lookups below
(by_key, result_from_json, metric_info) answer for evaluations and fine-tunes alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pertvl.evaluate.evaluation import Evaluation, Finetune, MetricInfo, Result, Suite
from pertvl.registry import Registry

__all__ = ["EVALUATIONS", "FINETUNES", "by_key", "demo_evaluations", "evaluation_for_metric", "in_suite", "metric_info", "register",
           "result_from_json", "result_sources"]

# One line per built-in evaluation, in the order of the reports and the comparison table.
_BUILTIN = (
    "pertvl.evaluate.structure",
    "pertvl.evaluate.structure_local",
    "pertvl.evaluate.retrieval",
    "pertvl.evaluate.zeroshot",
    "pertvl.evaluate.text_structure",
    "pertvl.evaluate.grounding",
)


def _builtin() -> list[tuple[str, Evaluation]]:
    entries = [importlib.import_module(m).EVALUATION for m in _BUILTIN]
    return [(e.name, e) for e in entries]


EVALUATIONS: Registry[Evaluation] = Registry("evaluation", _builtin())

# The fine-tunes whose results are comparison columns (Tables II and III), after the evaluations.
_BUILTIN_FINETUNES = (
    "pertvl.evaluate.finetune.chexpert",
    "pertvl.evaluate.finetune.nli",
)

FINETUNES: Registry[Finetune] = Registry(
    "fine-tune", [(f.name, f) for f in (importlib.import_module(m).FINETUNE for m in _BUILTIN_FINETUNES)])


def result_sources() -> list[Evaluation | Finetune]:
    """Everything that writes a result the reports read: evaluations, then fine-tunes (table order)."""
    return [*EVALUATIONS.values(), *FINETUNES.values()]


def register(evaluation: Evaluation, *, replace: bool = False) -> Evaluation:
    """Add an evaluation (its `pertvl eval NAME`, outputs, metrics and suites come with it)."""
    if not isinstance(evaluation, Evaluation):
        raise ValueError(f"register: expected a pertvl.evaluate.evaluation.Evaluation, got {type(evaluation).__name__}")
    clash = [e.name for e in result_sources() if e.key == evaluation.key and e.name != evaluation.name]
    if clash:
        raise ValueError(f"register: key {evaluation.key!r} of {evaluation.name!r} is taken by {clash[0]!r}")
    return EVALUATIONS.register(evaluation.name, evaluation, replace=replace)


def in_suite(suite: Suite) -> list[Evaluation]:
    """The evaluations a pipeline runs (registry order)."""
    return [e for e in EVALUATIONS.values() if suite in e.suites]


def demo_evaluations() -> list[Evaluation]:
    """`pertvl demo`'s evaluations: the DEMO suite's that read shard samples."""
    from pertvl.evaluate.evaluation import Source

    return [e for e in in_suite(Suite.DEMO) if e.source is Source.SHARDS]


def by_key(key: str) -> Evaluation | Finetune | None:
    """The evaluation (or fine-tune) whose outputs are KEY.json and whose metrics are "KEY/…"."""
    return next((e for e in result_sources() if e.key == key), None)


def result_from_json(d: Mapping[str, Any]) -> Result:
    """Read any registered result back from its JSON (dispatch on "schema").

    Raises:
        ValueError: a schema no registered evaluation reads.
    """
    schema = d.get("schema") if isinstance(d, Mapping) else None
    for e in result_sources():
        if schema in e.schemas:
            return e.result_type.from_json(d)
    known = [s for e in result_sources() for s in e.schemas]
    raise ValueError(f"unknown result schema {schema!r}; registered: {known}")


def evaluation_for_metric(key: str) -> Evaluation | Finetune | None:
    """The evaluation a flat metric key ("structure/overall") belongs to, by its prefix."""
    return by_key(key.split("/", 1)[0])


def metric_info(key: str) -> MetricInfo:
    """How the comparison table shows `key`; unknown metrics: the key itself, 3 decimals."""
    e = evaluation_for_metric(key)
    return e.result_type.metric_info(key) if e is not None else MetricInfo(key, percent=False, order=(key,))
