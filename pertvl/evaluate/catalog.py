"""The evaluations (`pertvl eval`, `pertvl ablate`, `pertvl demo`, the reports) and the fine-tunes
whose results the comparison table reads. Add an evaluation: a module with `EVALUATION =
Evaluation(...)` and one line in `EVALUATIONS`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pertvl.evaluate import grounding, retrieval, structure, text_structure, twins, zeroshot
from pertvl.evaluate.evaluation import Evaluation, Finetune, MetricInfo, Result, Suite
from pertvl.evaluate.finetune import chexpert, nli

__all__ = ["EVALUATIONS", "FINETUNES", "by_key", "demo_evaluations", "evaluation_for_metric", "in_suite", "metric_info",
           "result_from_json", "result_sources"]

# name -> evaluation, in the order of the reports and the comparison table.
EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (structure.EVALUATION, structure.LOCAL_EVALUATION,
                                                          retrieval.EVALUATION, zeroshot.EVALUATION,
                                                          text_structure.EVALUATION, grounding.EVALUATION,
                                                          twins.EVALUATION)}

# The fine-tunes whose results are comparison columns (Tables II and III), after the evaluations.
FINETUNES: dict[str, Finetune] = {f.name: f for f in (chexpert.FINETUNE, nli.FINETUNE)}


def result_sources() -> list[Evaluation | Finetune]:
    """Everything that writes a result the reports read: evaluations, then fine-tunes (table order)."""
    return [*EVALUATIONS.values(), *FINETUNES.values()]


def in_suite(suite: Suite) -> list[Evaluation]:
    """The evaluations of shard samples a pipeline runs (table order)."""
    return [e for e in EVALUATIONS.values() if suite in e.suites and e.shards]


def demo_evaluations() -> list[Evaluation]:
    return in_suite(Suite.DEMO)


def by_key(key: str) -> Evaluation | Finetune | None:
    """The evaluation (or fine-tune) whose outputs are KEY.json and whose metrics are "KEY/…"."""
    return next((e for e in result_sources() if e.key == key), None)


def result_from_json(d: Mapping[str, Any]) -> Result:
    """Any result from its JSON (by "schema"); ValueError for an unknown schema."""
    schema = d.get("schema") if isinstance(d, Mapping) else None
    for e in result_sources():
        if schema in e.schemas:
            return e.result_type.from_json(d)
    known = [s for e in result_sources() for s in e.schemas]
    raise ValueError(f"unknown result schema {schema!r}; known: {known}")


def evaluation_for_metric(key: str) -> Evaluation | Finetune | None:
    """The evaluation a flat metric key ("structure/overall") belongs to, by its prefix."""
    return by_key(key.split("/", 1)[0])


def metric_info(key: str) -> MetricInfo:
    """How the comparison table shows `key`; unknown metrics: the key itself, 3 decimals."""
    e = evaluation_for_metric(key)
    return e.result_type.metric_info(key) if e is not None else MetricInfo(key, percent=False, order=(key,))
